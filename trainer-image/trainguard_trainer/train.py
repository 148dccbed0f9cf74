"""The training loop: MONAI UNet, DiceLoss, Adam; checkpoints, metrics, curves, heartbeats."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
from monai.data import CacheDataset, DataLoader, Dataset, DistributedSampler, ThreadDataLoader
from monai.data.utils import set_rnd
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot

from trainguard_trainer import data, distributed, guards
from trainguard_trainer.config import TrainerConfig
from trainguard_trainer.heartbeat import (
    STALL_ANNOTATION,
    Heartbeat,
    KubernetesSender,
    Sender,
    log_only,
    log_stall_only,
)
from trainguard_trainer.stopping import Action, StopControl, Stopped
from trainguard_trainer.watchdog import Watchdog, loader_workers

log = logging.getLogger('trainguard_trainer')
CHECKPOINT = 'checkpoint.pt'
BEST_CHECKPOINT = 'best.pt'    # the best validation's weights, with its epoch and Dice
METRICS = 'metrics.csv'
CURVES = 'curves.png'


@dataclasses.dataclass
class Result:
    epochs_run: int
    start_epoch: int
    history: list[dict[str, float]]
    heartbeats: int
    steps: int
    world_size: int = 1


def build_model(config: TrainerConfig, num_classes: int = 1) -> UNet:
    """One output channel (sigmoid) for one structure; background plus one per structure
    (softmax) for several."""
    return UNet(spatial_dims=config.spatial_dims, in_channels=1,
                out_channels=1 if num_classes == 1 else num_classes + 1, channels=config.channels,
                strides=config.strides, num_res_units=config.num_res_units)


def build_loss(num_classes: int) -> torch.nn.Module:
    """Dice on a sigmoid for one structure; Dice plus cross-entropy on a softmax over one-hot
    labels for several (MONAI's multi-organ recipe)."""
    if num_classes == 1:
        return DiceLoss(sigmoid=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def _samplers(cluster: distributed.Cluster, train_set: Any, val_set: Any,
              seed: int) -> tuple[DistributedSampler | None, DistributedSampler | None]:
    """Each rank trains on its own shard (reshuffled every epoch) and validates on its own part."""
    if not cluster.distributed:
        return None, None
    return (DistributedSampler(train_set, num_replicas=cluster.world_size, rank=cluster.rank, shuffle=True, seed=seed),
            DistributedSampler(val_set, even_divisible=False, num_replicas=cluster.world_size, rank=cluster.rank,
                               shuffle=False))


class _CacheWithProgress(CacheDataset):
    """MONAI's CacheDataset, saying how far the cache fill is (one call per item cached).

    CacheDataset reports progress only to tqdm; its per-item loader ``_load_cache_item`` (the
    one its thread pool calls) is the place to count, so it is wrapped rather than the fill
    rewritten.
    """

    def __init__(self, *args: Any, on_item: Callable[[], None], **kwargs: Any) -> None:
        self._on_item = on_item
        super().__init__(*args, **kwargs)

    def _load_cache_item(self, idx: int) -> Any:
        item = super()._load_cache_item(idx)
        self._on_item()
        return item


class _Preparation:
    """One counter per stage of data preparation (generating, caching), for the heartbeat."""

    def __init__(self, report: Callable[[str, int, int], None], *, slow_seconds: float = 0.0,
                 hang_after_items: int | None = None) -> None:
        self._report, self._lock = report, threading.Lock()   # CacheDataset fills from a thread pool
        self._stage, self._done, self._total = '', 0, 0
        self._slow_seconds, self._hang_after_items, self._items = slow_seconds, hang_after_items, 0

    def begin(self, stage: str, total: int) -> None:
        with self._lock:
            self._stage, self._done, self._total = stage, 0, total
        self._report(stage, 0, total)

    def item(self) -> None:
        if self._slow_seconds:
            time.sleep(self._slow_seconds)
        with self._lock:
            self._done += 1
            self._items += 1
            stage, done, total, items = self._stage, self._done, self._total, self._items
        self._report(stage, done, total)
        if self._hang_after_items is not None and items >= self._hang_after_items:
            log.warning('simulating a hung data preparation after %d items '
                        '(--simulate-preparation-hang-after-items): blocking forever', items)
            threading.Event().wait()


def structures(config: TrainerConfig) -> int:
    """How many structures (besides background) the model segments: the run's, else as many as
    a decathlon dataset's labels name (read before the model is built; checked in full later),
    else 1."""
    if config.num_classes:
        return config.num_classes
    if config.dataset == 'directory' and config.dataset_format == 'decathlon':
        return len(data.decathlon_labels(config.data_dir)) - 1
    return 1


def _items(config: TrainerConfig, preparation: _Preparation) -> tuple[list[dict[str, Any]], bool, int]:
    """(items, whether they are files, structures besides background)."""
    if config.dataset == 'directory' and config.dataset_format == 'decathlon':
        def checking(done: int, total: int) -> None:   # the first call says how many pairs there are
            if done == 0:
                preparation.begin('checking', total)
            else:
                preparation.item()

        items, labels = data.decathlon_items(config.data_dir, checking)
        found = len(labels) - 1
        if config.num_classes and config.num_classes != found:
            raise data.DatasetError(f'{data.DATASET_JSON} names {found} structures besides background, the run '
                                    f'asks for {config.num_classes} (spec.model.numClasses)')
        log.info('dataset: %d pairs in the decathlon layout, labels %s', len(items),
                 ', '.join(f'{key}: {name}' for key, name in sorted(labels.items())))
        return items, True, found
    num_classes = config.num_classes or 1
    if config.dataset == 'directory':
        return data.directory_items(config.data_dir), True, num_classes
    preparation.begin('generating', config.num_samples)
    progress = lambda done, total: preparation.item()  # noqa: E731
    if config.spatial_dims == 3:
        return data.synthetic_volumes(config.num_samples, config.resolution, num_classes, config.seed,
                                      progress), False, num_classes
    if num_classes != 1:
        raise data.DatasetError('synthetic 2D images have one structure: numClasses must be 1 (or 0)')
    return data.synthetic_items(config.num_samples, config.resolution, config.seed, progress), False, 1


def _loaders(config: TrainerConfig, num_workers: int, device: str,
             cluster: distributed.Cluster = distributed.SINGLE,
             preparation: _Preparation | None = None) -> tuple[DataLoader, DataLoader]:
    preparation = preparation or _Preparation(lambda stage, done, total: None)
    items, from_files, num_classes = _items(config, preparation)
    spacing = config.spacing
    if config.spatial_dims == 3 and from_files and spacing is None:
        spacing = data.median_spacing(items)
        if spacing:
            log.info('dataset: volumes resampled to the median voxel size %s mm', 'x'.join(map(str, spacing)))
    shape = {'spatial_dims': config.spatial_dims, 'num_classes': num_classes, 'spacing': spacing,
             'intensity_range': config.intensity_range}
    dims = config.spatial_dims
    train_items, val_items = data.split(items, config.validation_fraction, config.seed)
    gpu_free = torch.cuda.mem_get_info()[0] if device == 'cuda' else None
    size = data.files_bytes(items) if from_files and dims == 3 else data.dataset_bytes(len(items), config.resolution,
                                                                                        dims)
    path, note = guards.choose_data_path(device, config.data_path, size, gpu_free,
                                         guards.memory_free(psutil.virtual_memory().available, guards.read_text))
    log.info(note)
    generator = torch.Generator().manual_seed(config.seed)
    drop_last = -(-len(train_items) // cluster.world_size) > config.batch_size  # this rank's share
    if path == 'stream':
        train_set = Dataset(train_items, data.transforms(config.resolution, config.crop_size, from_files, train=True,
                                                         block_worker_after=config.simulate_worker_block_after_items,
                                                         worker_fault=config.simulate_worker_fault, **shape))
        val_set = Dataset(val_items, data.transforms(config.resolution, config.crop_size, from_files, train=False,
                                                     **shape))
        pin = device == 'cuda'  # page-locked batches let the host-to-GPU copy overlap the step
        train_sampler, val_sampler = _samplers(cluster, train_set, val_set, config.seed)
        return (DataLoader(train_set, batch_size=config.batch_size, shuffle=train_sampler is None,
                           sampler=train_sampler, num_workers=num_workers, generator=generator, drop_last=drop_last,
                           pin_memory=pin),
                DataLoader(val_set, batch_size=_val_batch(config), sampler=val_sampler, num_workers=0, pin_memory=pin))
    cache_device = 'cuda' if path == 'gpu-cache' else 'cpu'
    preparation.begin('caching', len(train_items) + len(val_items))
    train_set = _CacheWithProgress(train_items, data.cached_transforms(config.resolution, config.crop_size,
                                                                       from_files, True, cache_device, **shape),
                                   on_item=preparation.item, progress=False)
    val_set = _CacheWithProgress(val_items, data.cached_transforms(config.resolution, config.crop_size, from_files,
                                                                   False, cache_device, **shape),
                                 on_item=preparation.item, progress=False)
    train_sampler, val_sampler = _samplers(cluster, train_set, val_set, config.seed)
    # Cached tensors (on the GPU) are batched in this process: worker processes would copy them.
    return (ThreadDataLoader(train_set, batch_size=config.batch_size, shuffle=train_sampler is None,
                             sampler=train_sampler, num_workers=0, generator=generator, drop_last=drop_last),
            ThreadDataLoader(val_set, batch_size=_val_batch(config), sampler=val_sampler, num_workers=0))


def _val_batch(config: TrainerConfig) -> int:
    """Whole volumes are validated one at a time (their sizes differ); images in batches."""
    return 1 if config.spatial_dims == 3 else config.batch_size


def _seed_epoch(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Every random stream of an epoch from (seed, epoch, rank) alone: the shuffle, DataLoader
    workers' seeds, the random crops. A resumed attempt then draws exactly what an uninterrupted
    one would from the step it stopped at, and a 1-node and an N-node run agree per epoch."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)
    set_rnd(loader.dataset, seed * 100_003 + epoch * 101 + rank)


def _system_line(stop: threading.Event, seconds: float) -> None:
    """psutil summary on a timer: it describes the machine, so it may keep going while the loop hangs."""
    process = psutil.Process()
    psutil.cpu_percent()
    while not stop.wait(seconds):
        memory = psutil.virtual_memory()
        log.info('system: cpu %.0f%%, rss %.0f MiB, available %.0f MiB', psutil.cpu_percent(),
                 process.memory_info().rss / 2**20, memory.available / 2**20)


def _evaluate(model: torch.nn.Module, loader: DataLoader, device: str,
              cluster: distributed.Cluster = distributed.SINGLE,
              progress: data.Progress = data.no_progress, *, num_classes: int = 1,
              window: tuple[int, ...] | None = None) -> tuple[float, list[float]]:
    """Mean Dice over the validation set, and Dice per structure; each rank scores its part and
    the sums are combined. ``window``: whole volumes are scored by sliding a patch of this size
    over them (sliding_window_inference), as a 3D model never sees a whole volume at once.
    Several structures: the argmax class per voxel, one-hot, background not scored."""
    metric = DiceMetric(include_background=num_classes == 1, reduction='sum_batch', get_not_nans=True)
    model.eval()
    batches = 0
    with torch.no_grad():
        for batch in loader:
            image, label = batch['image'].to(device), batch['label'].to(device)
            logits = (sliding_window_inference(image, window, sw_batch_size=1, predictor=model) if window
                      else model(image))
            if num_classes == 1:
                prediction = (torch.sigmoid(logits) > 0.5).float()
            else:
                prediction = one_hot(torch.argmax(logits, dim=1, keepdim=True), num_classes + 1)
                label = one_hot(label.long(), num_classes + 1)
            metric(y_pred=prediction, y=label)
            batches += 1
            progress(batches, len(loader))
    model.train()
    if batches:
        sums, counts = metric.aggregate()
        values = [float(value) for value in sums.flatten()] + [float(value) for value in counts.flatten()]
    else:
        values = [0.0] * (2 * num_classes)
    values = distributed.all_sum(cluster, values, device)
    sums, counts = values[:num_classes], values[num_classes:]
    # A structure absent from every validation item (NaN) is not scored.
    per_class = [total / counted if counted else float('nan') for total, counted in zip(sums, counts, strict=True)]
    scored = [value for value in per_class if value == value]
    return (sum(scored) / len(scored) if scored else 0.0), per_class


def _best(history: list[dict[str, float]]) -> dict[str, float] | None:
    """The epoch with the highest validation Dice (the earliest of equals), or None before any."""
    return max(history, key=lambda row: row['val_dice']) if history else None


def _save_best(config: TrainerConfig, model: torch.nn.Module, row: dict[str, float]) -> None:
    """``best.pt``: the weights of the best validation so far, with its epoch and Dice; written
    whole or not at all, like the checkpoint."""
    path = config.output_dir / BEST_CHECKPOINT
    partial = path.with_suffix('.partial')
    torch.save({'model': model.state_dict(), 'epoch': int(row['epoch']), 'dice': row['val_dice']}, partial)
    partial.replace(path)


def _write_outputs(config: TrainerConfig, history: list[dict[str, float]]) -> None:
    config.output_dir.mkdir(parents=True, exist_ok=True)
    with (config.output_dir / METRICS).open('w', newline='') as file:
        writer = csv.DictWriter(file, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = [row['epoch'] for row in history]
    axis.plot(epochs, [row['train_loss'] for row in history], marker='o', label='train Dice loss')
    axis.plot(epochs, [row['val_dice'] for row in history], marker='s', label='validation Dice')
    axis.set_xlabel('epoch')
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(config.output_dir / CURVES, dpi=100)
    plt.close(figure)


def _hang_forever(steps: int) -> None:
    log.warning('simulating a hang after %d steps (--simulate-hang-after-steps): blocking forever', steps)
    threading.Event().wait()


def check_gpu() -> None:
    """Raise GpuUnavailable naming why, when a GPU run finds no usable CUDA (never train on the CPU)."""
    init_error = None
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
        except Exception as error:  # torch raises RuntimeError or AssertionError, by version
            init_error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    reason = guards.gpu_unavailable_reason(torch.version.cuda, torch.cuda.device_count(), init_error)
    if reason is not None:
        raise guards.GpuUnavailable(reason)


def _no_beat(payload: dict[str, Any]) -> None:
    """Ranks other than 0 do not beat: rank 0's heartbeat speaks for the gang, since a hung rank
    stops rank 0 at the next collective."""


def train(config: TrainerConfig, *, sender: Sender | None = None, stall_sender: Sender | None = None,
          clock: Callable[[], float] = time.monotonic,
          wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
          cgroup_root: Any = None, shm_path: Any = None, cluster: distributed.Cluster | None = None) -> Result:
    cluster = cluster or distributed.from_env(os.environ)
    if config.device in ('gpu', 'cuda'):
        check_gpu()
    decision = guards.decide_runtime(
        config.device, config.num_workers, config.batch_size, config.crop_size,
        cuda_available=torch.cuda.is_available(),
        **({'cgroup_root': cgroup_root} if cgroup_root else {}), **({'shm_path': shm_path} if shm_path else {}))
    threads = distributed.threads_per_process(decision.threads, cluster)
    torch.set_num_threads(threads)
    if threads != decision.threads:
        log.info('torch threads = %d per process (%d processes in this pod)', threads, cluster.local_world_size)
    torch.manual_seed(config.seed)
    for note in decision.notes:
        log.info(note)
    effective = {**dataclasses.asdict(config), 'device': decision.device, 'num_workers': decision.num_workers}
    log.info('configuration: %s', json.dumps(effective, default=str, sort_keys=True))

    heartbeat, stall_sender = _beats(config, cluster, sender, stall_sender, clock, wall_clock)
    if cluster.distributed:
        heartbeat.activity('Starting', epochs=config.epochs, detail=f'joining {cluster.world_size} ranks')
    store = distributed.start(cluster, decision.device, config.collective_timeout_seconds)
    try:
        result = _train(config, decision, cluster, heartbeat, stall_sender, clock,
                        distributed.GangPreparation(store, cluster))
    except BaseException:
        distributed.stop(cluster)   # no barrier: a peer may be gone, or stopped elsewhere
        raise
    distributed.stop(cluster, finished=True)
    return result


def _beats(config: TrainerConfig, cluster: distributed.Cluster, sender: Sender | None, stall_sender: Sender | None,
           clock: Callable[[], float], wall_clock: Callable[[], datetime.datetime]) -> tuple[Heartbeat, Sender]:
    """The heartbeat (rank 0's speaks for the gang) and where stall reports go."""
    if not cluster.main:
        sender, stall_sender = _no_beat, log_stall_only  # each rank's stall report still goes to its log
    if sender is None:
        sender = KubernetesSender(config.run_name, config.run_namespace,
                                  retry_cap_seconds=config.heartbeat_seconds) if config.run_name else log_only
    if stall_sender is None:
        stall_sender = (KubernetesSender(config.run_name, config.run_namespace, STALL_ANNOTATION,
                                         retry_cap_seconds=config.heartbeat_seconds)
                        if config.run_name else log_stall_only)
    return Heartbeat(sender, config.heartbeat_seconds, clock, wall_clock, world_size=cluster.world_size), stall_sender


def _train(config: TrainerConfig, decision: guards.RuntimeDecision, cluster: distributed.Cluster,
           heartbeat: Heartbeat, stall_sender: Sender, clock: Callable[[], float],
           gang: distributed.GangPreparation) -> Result:
    running: dict[str, Any] = {'iterator': None}  # the epoch's DataLoader iterator, for its workers
    watchdog = Watchdog(before_first_seconds=config.startup_report_seconds, after_seconds=config.stall_report_seconds,
                        workers=lambda: loader_workers(running['iterator']), send=stall_sender,
                        output_dir=config.output_dir, attempt=config.attempt,
                        context=(f'rank {cluster.rank} of {cluster.world_size}, DistributedDataParallel: '
                                 'every step waits for all ranks' if cluster.distributed else ''))

    # The model, the optimizer (its first parameter group imports torch._dynamo: seconds) and
    # the checkpoint come first, while set-up is held to the startup timeout; after the data is
    # prepared only the first step remains before the next beat.
    heartbeat.activity('Starting', epochs=config.epochs, detail='building the model')
    num_classes = structures(config)
    model = build_model(config, num_classes).to(decision.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_function = build_loss(num_classes)

    history: list[dict[str, float]] = []
    start_epoch, resume_step, carried = 1, 0, (0.0, 0.0)
    checkpoint_path = config.output_dir / CHECKPOINT
    # Only rank 0 has the output volume: it reads the checkpoint and every rank resumes from it.
    state = None
    if cluster.main and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location='cpu' if cluster.distributed else decision.device,
                           weights_only=False)
    state = distributed.broadcast(cluster, state)
    if state is not None:
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        history = state['history']
        if state.get('step'):  # stopped mid-epoch: redo none of its finished steps
            start_epoch, resume_step = state['epoch'], int(state['step'])
            if cluster.main:  # the epoch's sums so far, over every rank, carried by rank 0 alone
                carried = (float(state['epochSeen']), float(state['epochLossSum']))
            log.info('resuming from %s: epoch %d of %d, step %d done', checkpoint_path, state['epoch'],
                     config.epochs, resume_step)
        else:
            start_epoch = state['epoch'] + 1
            log.info('resuming from %s: epoch %d of %d done', checkpoint_path, state['epoch'], config.epochs)
    best = _best(history)
    if best is not None:   # a resumed run reports how good its model already is
        heartbeat.quality(dice=history[-1]['val_dice'], best_dice=best['val_dice'], best_epoch=int(best['epoch']))
    # DistributedDataParallel averages gradients over the ranks in backward(); the checkpoint
    # keeps the bare model's weights, so 1-node and N-node runs resume from each other.
    network: torch.nn.Module = model
    if cluster.distributed:
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[cluster.local_rank] if decision.device == 'cuda' else None)

    def preparing(stage: str, done: int, total: int) -> None:
        gang.report(stage, done, total)
        heartbeat.activity('PreparingData', epochs=config.epochs, done=done, total=total, detail=stage)

    train_loader, val_loader = _loaders(
        config, decision.num_workers, decision.device, cluster,
        _Preparation(preparing, slow_seconds=config.simulate_slow_preparation_seconds,
                     hang_after_items=config.simulate_preparation_hang_after_items))
    gang.report('ready', 1, 1)
    if cluster.distributed and cluster.main:
        def slowest(report: distributed.RankPreparation | None, rank: int) -> None:
            heartbeat.activity('PreparingData', epochs=config.epochs, detail=f'waiting for rank {rank}',
                               **({'done': report.done, 'total': report.total} if report else {}))

        gang.wait_until_all_ready(slowest, config.collective_timeout_seconds, clock)

    def save(epoch: int, step: int, seen: float = 0.0, loss_sum: float = 0.0) -> None:
        """Rank 0 writes; ``step`` 0 means the epoch is complete. A collective: every rank calls it."""
        seen, loss_sum = distributed.all_sum(cluster, [seen, loss_sum], decision.device)
        heartbeat.activity('Checkpointing', epochs=config.epochs, epoch=epoch, step=step or steps_per_epoch,
                           steps=steps_per_epoch)
        if cluster.main:
            config.output_dir.mkdir(parents=True, exist_ok=True)
            partial = checkpoint_path.with_suffix('.partial')
            torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
                        'step': step, 'epochSeen': seen, 'epochLossSum': loss_sum, 'history': history}, partial)
            partial.replace(checkpoint_path)  # a SIGKILL mid-write leaves the previous checkpoint whole
        control.saved()

    control = StopControl(cluster, decision.device, config.checkpoint_interval_seconds, clock)
    control.install()
    stop_system_log = threading.Event()
    threading.Thread(target=_system_line, args=(stop_system_log, config.system_log_seconds), daemon=True).start()
    watchdog.start()
    steps_per_epoch = len(train_loader)
    total_steps = 0
    try:
        window = (config.crop_size,) * 3 if config.spatial_dims == 3 else None
        for epoch in range(start_epoch, config.epochs + 1):
            skip = resume_step if epoch == start_epoch else 0
            before = carried if skip else (0.0, 0.0)
            epoch_start, seen, loss_sum = clock(), 0, 0.0
            _seed_epoch(train_loader, config.seed, epoch, cluster.rank)
            running['iterator'] = iterator = iter(train_loader)
            for step, batch in enumerate(iterator, start=1):
                if step <= skip:
                    continue  # done before the stop: drawn, not trained, so every random stream is where it was
                images = batch['image'].to(decision.device, non_blocking=True)
                labels = batch['label'].to(decision.device, non_blocking=True)
                optimizer.zero_grad()
                loss = loss_function(network(images), labels)
                loss.backward()
                optimizer.step()
                loss_value = float(loss.item())  # one device sync per step, shared by the sum, beat and log
                seen += images.shape[0]
                loss_sum += loss_value * images.shape[0]
                total_steps += 1
                rate = seen * cluster.world_size / max(clock() - epoch_start, 1e-9)  # ranks step together
                heartbeat.beat(epoch=epoch, epochs=config.epochs, step=step, steps=steps_per_epoch,
                               loss=loss_value, samples_per_second=rate)
                watchdog.step()
                if step % config.log_every_steps == 0 or step == steps_per_epoch:
                    remaining = (config.epochs - epoch) * steps_per_epoch + steps_per_epoch - step
                    eta = remaining * (clock() - epoch_start) / step
                    log.info('epoch %d/%d step %d/%d loss %.4f %.1f samples/s ETA %.0fs', epoch, config.epochs,
                             step, steps_per_epoch, loss_value, rate, eta)
                action = control.decide()
                if action is not Action.CONTINUE:
                    save(epoch, step, seen + before[0], loss_sum + before[1])
                    if action is Action.STOP:
                        raise Stopped(epoch, step)
                # In a gang only the last rank freezes: the case where one rank blocks the others.
                if (config.simulate_hang_after_steps is not None and cluster.last
                        and total_steps >= config.simulate_hang_after_steps):
                    _hang_forever(total_steps)
            seconds = clock() - epoch_start
            seen, loss_sum = distributed.all_sum(cluster, [seen + before[0], loss_sum + before[1]], decision.device)
            def validating(done: int, total: int, epoch: int = epoch) -> None:
                heartbeat.activity('Validating', epochs=config.epochs, epoch=epoch, step=steps_per_epoch,
                                   steps=steps_per_epoch, done=done, total=total)
                watchdog.step()   # a batch validated is progress too: no stall report for a long validation

            val_dice, per_class = _evaluate(model, val_loader, decision.device, cluster, validating,
                                            num_classes=num_classes, window=window)
            row = {'epoch': epoch, 'train_loss': round(loss_sum / max(seen, 1), 6), 'val_dice': round(val_dice, 6),
                   'seconds': round(seconds, 3), 'samples_per_second': round(seen / max(seconds, 1e-9), 3)}
            history.append(row)
            if num_classes > 1:   # Dice per structure, in the log and metrics.csv
                row.update({f'val_dice_{index}': round(value, 6) for index, value in enumerate(per_class, 1)})
            log.info('epoch %d/%d done: train loss %.4f, validation Dice %.4f%s, %.1fs', epoch, config.epochs,
                     row['train_loss'], val_dice, '' if num_classes == 1 else ' (' + ', '.join(
                         f'{index}: {value:.4f}' for index, value in enumerate(per_class, 1)) + ')', seconds)
            save(epoch, 0)
            best = _best(history)
            assert best is not None
            if cluster.main:
                _write_outputs(config, history)
                if best is row:   # the best model so far, kept beside the last (best.pt)
                    _save_best(config, model, row)
            heartbeat.quality(dice=val_dice, best_dice=best['val_dice'], best_epoch=int(best['epoch']))
            heartbeat.beat(epoch=epoch, epochs=config.epochs, step=steps_per_epoch, steps=steps_per_epoch,
                           loss=row['train_loss'], samples_per_second=row['samples_per_second'], force=True)
            watchdog.step()  # validation and checkpointing are not a stall
            if epoch < config.epochs and control.decide() is Action.STOP:
                raise Stopped(epoch, steps_per_epoch)
    except torch.cuda.OutOfMemoryError as error:  # a retry with half the batch can fit (exit code 5)
        first = str(error).strip().splitlines()[0] if str(error).strip() else 'CUDA out of memory'
        raise guards.GpuOutOfMemory(f'GPU out of memory at batch size {config.batch_size}: {first}') from error
    finally:
        stop_system_log.set()
        watchdog.stop()
        control.uninstall()
    return Result(config.epochs - start_epoch + 1, start_epoch, history, heartbeat.sent, total_steps,
                  cluster.world_size)
