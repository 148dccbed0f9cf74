"""Datasets: MONAI's synthetic generator (no download) or images/ + labels/ pairs from a folder."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
from monai.data import create_test_image_2d
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    RandSpatialCropd,
    Resized,
    ScaleIntensityd,
)

IMAGE_SUFFIXES = ('.png', '.nii', '.nii.gz')


class DatasetError(ValueError):
    pass


Progress = Callable[[int, int], None]   # (items done, items in all): a heartbeat while data is prepared


def no_progress(done: int, total: int) -> None:
    return None


def synthetic_items(num_samples: int, resolution: int, seed: int,
                    progress: Progress = no_progress) -> list[dict[str, Any]]:
    """Seeded circles-on-noise images and masks from MONAI, at the training resolution."""
    random = np.random.RandomState(seed)
    rad_max = max(2, resolution // 6)  # circles scale with the image so every size from 16px works
    rad_min = max(1, rad_max // 2)
    items = []
    for _ in range(num_samples):
        image, label = create_test_image_2d(resolution, resolution, num_objs=5, rad_max=rad_max, rad_min=rad_min,
                                            noise_max=0.5, num_seg_classes=1, random_state=random)
        items.append({'image': image.astype(np.float32), 'label': (label > 0).astype(np.float32)})
        progress(len(items), num_samples)
    return items


def _stem(path: pathlib.Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def directory_items(root: pathlib.Path) -> list[dict[str, Any]]:
    """Pairs matched by file name (without extension) between images/ and labels/."""
    images_dir, labels_dir = root / 'images', root / 'labels'
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetError(f'{folder} does not exist: a directory dataset needs images/ and labels/')

    def listing(folder: pathlib.Path) -> dict[str, pathlib.Path]:
        return {_stem(p): p for p in sorted(folder.iterdir()) if p.name.endswith(IMAGE_SUFFIXES)}

    images, labels = listing(images_dir), listing(labels_dir)
    if not images:
        raise DatasetError(f'{images_dir} holds no PNG or NIfTI images')
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        raise DatasetError(f'images and labels do not match by name: {", ".join(unmatched[:5])}'
                           + (f' and {len(unmatched) - 5} more' if len(unmatched) > 5 else ''))
    return [{'image': str(images[key]), 'label': str(labels[key])} for key in sorted(images)]


KEYS = ('image', 'label')


def deterministic_steps(resolution: int, from_files: bool) -> list[Any]:
    """Load, channel-first, intensity to [0, 1], resize, binary label: the part a cache can keep."""
    steps: list[Any] = [LoadImaged(keys=KEYS, image_only=True)] if from_files else []
    return [
        *steps,
        EnsureChannelFirstd(keys=KEYS, channel_dim='no_channel'),
        ScaleIntensityd(keys='image'),
        Resized(keys=KEYS, spatial_size=(resolution, resolution), mode=('bilinear', 'nearest')),
        Lambdad(keys='label', func=lambda label: (label > 0).float() if hasattr(label, 'float') else label > 0),
    ]


def random_steps(resolution: int, crop_size: int, train: bool) -> list[Any]:
    """The random crop (training only): applied after the cache, so each epoch sees new crops."""
    if train and crop_size < resolution:
        return [RandSpatialCropd(keys=KEYS, roi_size=(crop_size, crop_size), random_size=False)]
    return []


def transforms(resolution: int, crop_size: int, from_files: bool, train: bool,
               block_worker_after: int | None = None, worker_fault: str = 'block') -> Compose:
    """The streaming pipeline: every step for every sample, every epoch."""
    extra = ([Lambdad(keys='image', func=_WorkerFault(block_worker_after, worker_fault))]
             if block_worker_after else [])
    return Compose([*deterministic_steps(resolution, from_files), *random_steps(resolution, crop_size, train),
                    *extra, EnsureTyped(keys=KEYS, track_meta=False)])


class _WorkerFault:
    """Test switch: inside a DataLoader worker process, fail after N samples.

    ``block``: the worker waits forever in Python (an NFS read that never returns, a deadlock
    after fork). ``stop``: the whole process freezes (SIGSTOP), as in the incident this project
    comes from; the main process may then wait inside multiprocessing's resource sharer for a
    batch the worker already sent. ``kill``: the process dies (SIGKILL, the OOM killer's way).
    """

    def __init__(self, after: int, fault: str = 'block') -> None:
        self.after, self.fault, self.seen = after, fault, 0

    def __call__(self, image: Any) -> Any:
        import os
        import signal
        import threading

        import torch.utils.data

        if torch.utils.data.get_worker_info() is not None:
            self.seen += 1
            if self.seen > self.after:
                if self.fault == 'stop':
                    os.kill(os.getpid(), signal.SIGSTOP)
                elif self.fault == 'kill':
                    os.kill(os.getpid(), signal.SIGKILL)
                threading.Event().wait()
        return image


def cached_transforms(resolution: int, crop_size: int, from_files: bool, train: bool, device: str) -> Compose:
    """For CacheDataset: it caches up to the first random step, so the deterministic part runs
    once and its result is kept on ``device`` (the GPU when it fits); the crop runs each fetch."""
    return Compose([*deterministic_steps(resolution, from_files),
                    EnsureTyped(keys=KEYS, track_meta=False, device=device),
                    *random_steps(resolution, crop_size, train)])


def dataset_bytes(num_samples: int, resolution: int) -> int:
    """float32 image and label per sample at the training resolution: what a cache holds."""
    return num_samples * resolution * resolution * 4 * 2


def split(items: list[dict[str, Any]], validation_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded hold-out split; at least one validation item."""
    order = np.random.RandomState(seed + 1).permutation(len(items))
    held_out = max(1, round(len(items) * validation_fraction))
    if held_out >= len(items):
        raise DatasetError(f'{len(items)} samples cannot be split into training and validation')
    return [items[i] for i in order[held_out:]], [items[i] for i in order[:held_out]]
