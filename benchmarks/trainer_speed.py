"""Trainer benchmarks: overhead against the bare MONAI loop, and time to the first heartbeat
against the time a fresh interpreter takes to import torch and MONAI (both measured in the same
round, interleaved; ratios are printed first).

Prints figures; asserts nothing. Run with `make bench` (or `python benchmarks/trainer_speed.py`).
"""

from __future__ import annotations

import asyncio
import csv
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

import kmock
import psutil
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss, DiceLoss

from trainguard_sandbox.cluster import emulated_cluster
from trainguard_trainer import data
from trainguard_trainer.config import TrainerConfig
from trainguard_trainer.train import build_model, train

EPOCHS = 3
CONFIG = TrainerConfig(device='cpu', batch_size=4, num_workers=0, epochs=EPOCHS, resolution=128, crop_size=128,
                       num_samples=80, heartbeat_seconds=10.0, log_every_steps=10_000, system_log_seconds=3600)
# 3D, three structures, at the CPU-safe 3D limits' scale: 48^3 synthetic volumes, 32^3 patches, batch 2.
CONFIG_3D = TrainerConfig(device='cpu', batch_size=2, num_workers=0, epochs=EPOCHS, resolution=48, crop_size=32,
                          channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1, num_samples=20,
                          spatial_dims=3, num_classes=3, heartbeat_seconds=10.0, log_every_steps=10_000,
                          system_log_seconds=3600)


def bare_monai_loop(config: TrainerConfig) -> list[float]:
    """The same model, data, transforms, loss and optimizer, with nothing of trainguard's around them."""
    torch.manual_seed(config.seed)
    volumes = config.spatial_dims == 3
    classes = config.num_classes or 1
    items = (data.synthetic_volumes(config.num_samples, config.resolution, classes, config.seed) if volumes
             else data.synthetic_items(config.num_samples, config.resolution, config.seed))
    train_items, _ = data.split(items, config.validation_fraction, config.seed)
    loader = DataLoader(Dataset(train_items, data.transforms(config.resolution, config.crop_size, False, True,
                                                             spatial_dims=config.spatial_dims, num_classes=classes)),
                        batch_size=config.batch_size, shuffle=True, num_workers=0)
    model = build_model(config, classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True) if classes > 1 else DiceLoss(sigmoid=True)
    rates = []
    for _ in range(config.epochs):
        start, seen = time.monotonic(), 0
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_function(model(batch['image']), batch['label'])
            loss.backward()
            optimizer.step()
            seen += batch['image'].shape[0]
        rates.append(seen / (time.monotonic() - start))
    return rates


def trainer_loop(config: TrainerConfig, output: pathlib.Path) -> list[float]:
    result = train(dataclasses.replace(config, output_dir=output), sender=lambda payload: None)
    return [row['samples_per_second'] for row in result.history]


def import_seconds() -> float:
    """The baseline of the first heartbeat: a fresh interpreter importing torch and MONAI."""
    start = time.monotonic()
    subprocess.run([sys.executable, '-c', 'import torch, monai'], check=True)
    return time.monotonic() - start


async def first_heartbeats(workdir: pathlib.Path) -> tuple[float, float]:
    """From process start to the first progress annotation the (emulated) API server stored
    (the Starting beat), and to the first Training beat."""
    workdir.mkdir(parents=True, exist_ok=True)
    async with emulated_cluster(workdir / 'kubeconfig') as emulator:
        async with emulator.post('/apis/trainguard.io/v1alpha1/namespaces/default/trainingruns', json={
                'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'bench'},
                'spec': {}}):
            pass
        key = (kmock.resource('trainguard.io', 'v1alpha1', 'trainingruns'), 'default', 'bench')

        def beat() -> dict:
            text = (emulator.objects[key].get('metadata', {}).get('annotations') or {}).get('trainguard.io/progress')
            return json.loads(text) if text else {}

        start = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            sys.executable, '-m', 'trainguard_trainer', '--device', 'cpu', '--batch-size', '4', '--resolution', '128',
            '--crop-size', '128', '--num-samples', '16', '--epochs', '1', '--output-dir', str(workdir / 'out'),
            env={**os.environ, 'KUBECONFIG': str(workdir / 'kubeconfig'), 'TRAINGUARD_RUN_NAME': 'bench'},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            first = training = None
            while training is None:
                phase = beat().get('phase')
                if phase and first is None:
                    first = time.monotonic() - start
                if phase == 'Training':
                    training = time.monotonic() - start
                await asyncio.sleep(0.01)
            assert first is not None
            return first, training
        finally:
            await process.wait()


SETTINGS = {
    'original (batch 32, 2 workers, 256px)': ['--batch-size', '32', '--num-workers', '2', '--resolution', '256',
                                              '--crop-size', '256'],
    'cpu-safe (batch 4, 0 workers, 128px)': ['--batch-size', '4', '--num-workers', '0', '--resolution', '128',
                                             '--crop-size', '128'],
}


def settings_comparison(workdir: pathlib.Path) -> dict[str, dict[str, float]]:
    """The incident's settings against the CPU-safe ones: one epoch each, in its own process."""
    results = {}
    for label, flags in SETTINGS.items():
        output = workdir / label.split()[0]
        command = [sys.executable, '-m', 'trainguard_trainer', '--device', 'cpu', '--epochs', '1',
                   '--num-samples', '80', '--output-dir', str(output), '--log-every-steps', '1000', *flags]
        process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = 0
        while process.poll() is None:
            try:
                tree = [process, *process.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)
        with (output / 'metrics.csv').open() as file:
            row = list(csv.DictReader(file))[-1]
        batch = int(flags[1])
        steps = 64 // batch
        results[label] = {'samples_per_second': float(row['samples_per_second']),
                          'seconds_per_step': round(float(row['seconds']) / steps, 3),
                          'peak_rss_mib': round(peak / 2**20)}
    return results


def main() -> None:
    rounds = int(os.environ.get('BENCH_ROUNDS', '3'))
    bare, guarded, imports, first, training = [], [], [], [], []
    bare_3d, guarded_3d = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(rounds):  # interleaved, so drift of the machine hits both sides alike
            bare += bare_monai_loop(CONFIG)[1:]          # the first epoch warms caches up
            guarded += trainer_loop(CONFIG, pathlib.Path(tmp) / f'run{index}')[1:]
            bare_3d += bare_monai_loop(CONFIG_3D)[1:]
            guarded_3d += trainer_loop(CONFIG_3D, pathlib.Path(tmp) / f'run3d{index}')[1:]
            imports.append(import_seconds())
            beat, step = asyncio.run(first_heartbeats(pathlib.Path(tmp) / f'hb{index}'))
            first.append(beat)
            training.append(step)
        comparison = settings_comparison(pathlib.Path(tmp) / 'settings')

    def ratio(values: list[float], baseline: list[float]) -> float:
        """The median of each round's ratio to its own baseline (same round, same machine state)."""
        return round(statistics.median(value / base for value, base in zip(values, baseline, strict=True)), 3)

    figures = {
        # Ratios first: this machine's speed drifts 2-3x within an hour; a ratio to a baseline
        # measured in the same round does not.
        'ratios': {
            'trainer_to_bare_monai_samples_per_second': round(statistics.median(guarded) / statistics.median(bare), 3),
            'trainer_to_bare_monai_3d_samples_per_second': round(statistics.median(guarded_3d)
                                                                 / statistics.median(bare_3d), 3),
            'first_heartbeat_to_import_torch_monai': ratio(first, imports),
            'first_training_beat_to_import_torch_monai': ratio(training, imports),
        },
        'machine': f'{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, '
                   f'torch {torch.__version__}, load {os.getloadavg()[0]:.2f}',
        'settings': 'batch 4, 128px, 0 workers, default UNet (1.6M parameters), 64 training samples',
        'bare_monai_samples_per_second_median': round(statistics.median(bare), 2),
        'trainer_samples_per_second_median': round(statistics.median(guarded), 2),
        'settings_3d': '3D, 3 structures, 48^3 synthetic volumes, 32^3 patches, batch 2, UNet 8-16-32-64, '
                       '16 training volumes',
        'bare_monai_3d_samples_per_second_median': round(statistics.median(bare_3d), 2),
        'trainer_3d_samples_per_second_median': round(statistics.median(guarded_3d), 2),
        'import_torch_monai_seconds': [round(value, 2) for value in imports],
        'first_heartbeat_seconds': [round(value, 2) for value in first],
        'first_training_beat_seconds': [round(value, 2) for value in training],
        'settings_comparison': comparison,
    }
    print(json.dumps(figures, indent=2))


if __name__ == '__main__':
    main()
