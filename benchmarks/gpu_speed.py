"""GPU benchmark: the trainer's samples/s against the batches-on-GPU ceiling, first heartbeat, memory.

Prints figures as JSON; asserts nothing. Needs CUDA; elsewhere it says so and exits 2.
``python benchmarks/gpu_speed.py`` (``GPU_BENCH_SAMPLES``, ``GPU_BENCH_EPOCHS`` resize it).

- trainer, each data path: ``cache`` (CacheDataset on the GPU + ThreadDataLoader, the CUDA
  default) and ``stream`` with 0 and 4 DataLoader workers (the trainer as it was);
- ceiling: the same model, loss, optimizer, batch size and steps, with every batch already on
  the GPU (random permutation per epoch), with and without the trainer's one loss sync a step;
- time from process start to the first heartbeat line, and peak GPU memory.
Steady figures are the median of the epochs after the first (cuDNN autotuning, caching).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from trainguard_trainer import data
from trainguard_trainer.config import TrainerConfig
from trainguard_trainer.train import build_model, train

SAMPLES = int(os.environ.get('GPU_BENCH_SAMPLES', '1600'))   # 1,280 training samples after the 20% hold-out
EPOCHS = int(os.environ.get('GPU_BENCH_EPOCHS', '4'))
CONFIG = TrainerConfig(device='cuda', batch_size=32, num_workers=0, epochs=EPOCHS, resolution=256, crop_size=256,
                       num_samples=SAMPLES, heartbeat_seconds=10.0, log_every_steps=100_000,
                       system_log_seconds=3600)


def trainer_run(config: TrainerConfig) -> dict[str, float]:
    torch.cuda.reset_peak_memory_stats()
    result = train(config, sender=lambda payload: None)
    steady = [row['samples_per_second'] for row in result.history[1:]] or [result.history[0]['samples_per_second']]
    return {'samples_per_second': round(statistics.median(steady), 1),
            'first_epoch_samples_per_second': result.history[0]['samples_per_second'],
            'peak_gpu_mib': round(torch.cuda.max_memory_allocated() / 2**20)}


def ceiling(config: TrainerConfig, sync_each_step: bool) -> float:
    """Batches already on the GPU: what the model, loss and optimizer alone allow."""
    from monai.losses import DiceLoss

    torch.manual_seed(config.seed)
    items = data.synthetic_items(config.num_samples, config.resolution, config.seed)
    train_items, _ = data.split(items, config.validation_fraction, config.seed)
    prepare = data.transforms(config.resolution, config.crop_size, False, train=True)
    prepared = [prepare(item) for item in train_items]
    images = torch.stack([item['image'] for item in prepared]).cuda()
    labels = torch.stack([item['label'] for item in prepared]).cuda()
    model = build_model(config).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_function = DiceLoss(sigmoid=True)
    steps = len(train_items) // config.batch_size
    rates = []
    for _ in range(config.epochs):
        order = torch.randperm(len(train_items), device='cuda')
        torch.cuda.synchronize()
        start = time.perf_counter()
        for step in range(steps):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            optimizer.zero_grad()
            loss = loss_function(model(images[index]), labels[index])
            loss.backward()
            optimizer.step()
            if sync_each_step:
                loss.item()
        torch.cuda.synchronize()
        rates.append(steps * config.batch_size / (time.perf_counter() - start))
    return round(statistics.median(rates[1:] or rates), 1)


def first_heartbeat_seconds(output: pathlib.Path) -> float:
    """Process start to the first heartbeat line, at the benchmark's GPU settings."""
    command = [sys.executable, '-m', 'trainguard_trainer', '--device', 'gpu', '--batch-size', '32',
               '--resolution', '256', '--crop-size', '256', '--num-samples', str(SAMPLES), '--epochs', '1',
               '--output-dir', str(output)]
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    seen = None
    for line in process.stdout:
        if seen is None and 'heartbeat (no run configured)' in line:
            seen = time.monotonic() - start
            process.kill()
    process.wait()
    return round(seen, 2) if seen is not None else float('nan')


def main() -> int:
    if not torch.cuda.is_available():
        print(f'gpu_speed: no usable CUDA device here (torch {torch.__version__}, CUDA build '
              f'{torch.version.cuda}); run it on a GPU machine', file=sys.stderr)
        return 2
    results: dict[str, object] = {
        'machine': f'{torch.cuda.get_device_name()}, {os.cpu_count()} cores, torch {torch.__version__}, '
                   f'Python {platform.python_version()}',
        'settings': {'batch': CONFIG.batch_size, 'resolution': CONFIG.resolution, 'samples': SAMPLES,
                     'epochs': EPOCHS},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        runs = {
            'cache': dataclasses.replace(CONFIG, data_path='cache'),
            'stream_0_workers': dataclasses.replace(CONFIG, data_path='stream'),
            'stream_4_workers': dataclasses.replace(CONFIG, data_path='stream', num_workers=4),
        }
        for name, config in runs.items():
            results[name] = trainer_run(dataclasses.replace(config, output_dir=folder / name))
            print(json.dumps({name: results[name]}), flush=True)
        results['ceiling_samples_per_second'] = ceiling(CONFIG, sync_each_step=False)
        results['ceiling_with_a_sync_per_step'] = ceiling(CONFIG, sync_each_step=True)
        for name in runs:
            results[f'{name}_of_ceiling'] = round(
                results[name]['samples_per_second'] / results['ceiling_samples_per_second'], 3)  # type: ignore[index]
        results['first_heartbeat_s'] = [first_heartbeat_seconds(folder / f'cold-{i}') for i in range(2)]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
