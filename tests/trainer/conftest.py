from __future__ import annotations

import dataclasses
import pathlib

import pytest

from trainguard_trainer.config import TrainerConfig


@pytest.fixture()
def tiny(tmp_path: pathlib.Path) -> TrainerConfig:
    """A model and data small enough that two epochs take about a second on CPU."""
    return TrainerConfig(device='cpu', batch_size=4, num_workers=0, epochs=2, learning_rate=0.01, resolution=64,
                         crop_size=48, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, num_samples=20,
                         output_dir=tmp_path / 'out', heartbeat_seconds=10.0, log_every_steps=2)


@pytest.fixture()
def tiny3d(tmp_path: pathlib.Path) -> TrainerConfig:
    """32^3 volumes, 16^3 patches, a two-level UNet: two epochs in a couple of seconds on CPU."""
    return TrainerConfig(device='cpu', batch_size=2, num_workers=0, epochs=2, learning_rate=0.01, resolution=32,
                         crop_size=16, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, num_samples=8,
                         spatial_dims=3, num_classes=3, output_dir=tmp_path / 'out', heartbeat_seconds=10.0,
                         log_every_steps=2)


class RecordingSender:
    def __init__(self, fail_first: int = 0) -> None:
        self.payloads: list[dict] = []
        self.fail_first = fail_first

    def __call__(self, payload: dict) -> None:
        if self.fail_first:
            self.fail_first -= 1
            raise ConnectionError('API unavailable')
        self.payloads.append(payload)


@pytest.fixture()
def sender() -> RecordingSender:
    return RecordingSender()


def replace(config: TrainerConfig, **changes) -> TrainerConfig:
    return dataclasses.replace(config, **changes)
