"""Datasets: MONAI's synthetic generator (no download, 2D or 3D), images/ + labels/ pairs from a
folder, or a dataset in the Medical Segmentation Decathlon layout (``dataset.json``)."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
from monai.data import create_test_image_2d, create_test_image_3d
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandSpatialCropd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
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


def synthetic_volumes(num_samples: int, size: int, num_classes: int, seed: int,
                      progress: Progress = no_progress) -> list[dict[str, Any]]:
    """Seeded spheres-in-noise volumes (size^3) from MONAI, labelled 0 (background) to
    ``num_classes``: several structures, like an organ atlas."""
    random = np.random.RandomState(seed)
    rad_max = max(2, size // 6)
    rad_min = max(1, rad_max // 2)
    items = []
    for _ in range(num_samples):
        image, label = create_test_image_3d(size, size, size, num_objs=6, rad_max=rad_max, rad_min=rad_min,
                                            noise_max=0.5, num_seg_classes=num_classes, random_state=random)
        items.append({'image': image.astype(np.float32), 'label': label.astype(np.float32)})
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
DATASET_JSON = 'dataset.json'


def _read_header(path: pathlib.Path) -> Any:
    import nibabel  # only for NIfTI datasets

    return nibabel.load(str(path))


def _shape(path: pathlib.Path) -> tuple[int, ...]:
    if path.name.endswith(('.nii', '.nii.gz')):
        return tuple(int(n) for n in _read_header(path).shape)
    from PIL import Image

    with Image.open(path) as image:
        return (image.height, image.width)


def _label_values(path: pathlib.Path) -> set[int]:
    if path.name.endswith(('.nii', '.nii.gz')):
        values = np.asanyarray(_read_header(path).dataobj)
    else:
        from PIL import Image

        with Image.open(path) as image:
            values = np.asarray(image)
    return {int(value) for value in np.unique(values)}


def write_decathlon_dataset(root: pathlib.Path, num_volumes: int, size: int, num_classes: int,
                            seed: int = 0) -> pathlib.Path:
    """A synthetic dataset in the Decathlon layout (imagesTr/, labelsTr/ of NIfTI volumes with
    1.5 mm voxels, dataset.json): for the demo, the tests and trying a run before real data."""
    import nibabel

    (root / 'imagesTr').mkdir(parents=True, exist_ok=True)
    (root / 'labelsTr').mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    training = []
    for index, item in enumerate(synthetic_volumes(num_volumes, size, num_classes, seed)):
        name = f'case_{index:03d}.nii.gz'
        nibabel.save(nibabel.Nifti1Image(item['image'], affine), str(root / 'imagesTr' / name))
        nibabel.save(nibabel.Nifti1Image(item['label'].astype(np.uint8), affine), str(root / 'labelsTr' / name))
        training.append({'image': f'./imagesTr/{name}', 'label': f'./labelsTr/{name}'})
    (root / DATASET_JSON).write_text(json.dumps({
        'name': 'SyntheticSpheres', 'tensorImageSize': '3D', 'modality': {'0': 'synthetic'},
        'labels': {'0': 'background', **{str(value): f'structure-{value}' for value in range(1, num_classes + 1)}},
        'numTraining': num_volumes, 'training': training, 'test': []}, indent=2))
    return root


def _manifest(root: pathlib.Path) -> dict[str, Any]:
    """``root/dataset.json``, read once per check."""
    manifest = root / DATASET_JSON
    if not manifest.is_file():
        raise DatasetError(f'{manifest} does not exist: a decathlon dataset has dataset.json at its root')
    try:
        described = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        raise DatasetError(f'{manifest} is not JSON: {error}') from error
    if not isinstance(described, dict):
        raise DatasetError(f'{manifest} must hold a JSON object')
    return described


def decathlon_labels(root: pathlib.Path, described: dict[str, Any] | None = None) -> dict[int, str]:
    """The ``labels`` of ``root/dataset.json`` (or of ``described``, its contents already read):
    value -> structure name, background "0" included."""
    manifest = root / DATASET_JSON
    described = _manifest(root) if described is None else described
    try:
        labels = {int(key): str(name) for key, name in (described.get('labels') or {}).items()}
    except (AttributeError, TypeError, ValueError) as error:
        raise DatasetError(f'{manifest}: "labels" must map label values ("0", "1", ...) to names') from error
    if not labels or 0 not in labels or len(labels) < 2:
        raise DatasetError(f'{manifest}: "labels" must name the background "0" and at least one structure')
    return labels


def decathlon_items(root: pathlib.Path, progress: Progress = no_progress) -> tuple[list[dict[str, Any]],
                                                                                  dict[int, str]]:
    """The ``training`` pairs of ``root/dataset.json`` (the Medical Segmentation Decathlon layout
    that MSD, nnU-Net and MONAI's tutorials use) and its ``labels``, every pair checked before
    any training: the files exist, image and label have the same shape, and every label value is
    one ``labels`` names. The first bad entry is named (DatasetError); nothing is written.
    Reading a label volume's values is the slow part: ``progress`` is told per pair."""
    manifest = root / DATASET_JSON
    described = _manifest(root)
    labels = decathlon_labels(root, described)
    pairs = described.get('training')
    if not isinstance(pairs, list) or not pairs:
        raise DatasetError(f'{manifest}: "training" must list image and label pairs')
    progress(0, len(pairs))
    items = []
    for index, pair in enumerate(pairs):
        where = f'{DATASET_JSON} training[{index}]'
        if not isinstance(pair, dict) or not isinstance(pair.get('image'), str) or not isinstance(pair.get('label'),
                                                                                                  str):
            raise DatasetError(f'{where}: must be an object with "image" and "label" paths')
        paths = {key: (root / pair[key]).resolve() for key in KEYS}
        for key, path in paths.items():
            if not path.is_file():
                raise DatasetError(f'{where}: {key} {pair[key]} does not exist')
            if not path.name.endswith(IMAGE_SUFFIXES):
                raise DatasetError(f'{where}: {key} {pair[key]} is not a NIfTI or PNG file')
        image_shape, label_shape = _shape(paths['image']), _shape(paths['label'])
        if image_shape[:3] != label_shape[:3]:
            raise DatasetError(f'{where}: image {pair["image"]} is {"x".join(map(str, image_shape))} but label '
                               f'{pair["label"]} is {"x".join(map(str, label_shape))}')
        unknown = sorted(_label_values(paths['label']) - set(labels))
        if unknown:
            raise DatasetError(f'{where}: label {pair["label"]} has value {unknown[0]}, which "labels" does not '
                               f'name ({", ".join(f"{key}: {name}" for key, name in sorted(labels.items()))})')
        items.append({key: str(path) for key, path in paths.items()})
        progress(len(items), len(pairs))
    return items, labels


def median_spacing(items: list[dict[str, Any]]) -> tuple[float, ...] | None:
    """The median voxel size (mm) of the NIfTI images, per axis: what volumes are resampled to
    when the run sets no spacing (nnU-Net's fingerprint does the same). None for PNG images."""
    zooms = [tuple(float(size) for size in _read_header(pathlib.Path(item['image'])).header.get_zooms()[:3])
             for item in items if item['image'].endswith(('.nii', '.nii.gz'))]
    if not zooms:
        return None
    return tuple(round(float(np.median([zoom[axis] for zoom in zooms])), 4) for axis in range(len(zooms[0])))


def _binary(label: Any) -> Any:
    return (label > 0).float() if hasattr(label, 'float') else label > 0


def deterministic_steps(resolution: int, from_files: bool, spatial_dims: int = 2, num_classes: int = 1,
                        spacing: tuple[float, ...] | None = None,
                        intensity_range: tuple[float, float] | None = None) -> list[Any]:
    """Load, channel-first, intensity to [0, 1], and (2D) resize: the part a cache can keep.

    2D images are resized to ``resolution``; 3D volumes keep their anatomy: from files they are
    turned to one orientation (RAS), resampled to ``spacing`` (mm; bilinear for the image,
    nearest for the label) and cropped to the foreground (the body, not the air around it), as
    MONAI's 3D tutorials do. ``intensity_range``: a CT window (e.g. -57, 164 HU) mapped to [0, 1]
    and clipped; otherwise each image is scaled to [0, 1]. A label of one structure becomes
    0/1; several keep their values 0..num_classes."""
    steps: list[Any] = [LoadImaged(keys=KEYS, image_only=True)] if from_files else []
    steps.append(EnsureChannelFirstd(keys=KEYS, channel_dim='no_channel'))
    if spatial_dims == 3 and from_files:
        steps.append(Orientationd(keys=KEYS, axcodes='RAS', labels=(('L', 'R'), ('P', 'A'), ('I', 'S'))))
        if spacing:
            steps.append(Spacingd(keys=KEYS, pixdim=spacing, mode=('bilinear', 'nearest')))
    if intensity_range:
        steps.append(ScaleIntensityRanged(keys='image', a_min=intensity_range[0], a_max=intensity_range[1],
                                          b_min=0.0, b_max=1.0, clip=True))
    else:
        steps.append(ScaleIntensityd(keys='image'))
    if spatial_dims == 3 and from_files:
        steps.append(CropForegroundd(keys=KEYS, source_key='image', allow_smaller=True))
    if spatial_dims == 2:
        steps.append(Resized(keys=KEYS, spatial_size=(resolution, resolution), mode=('bilinear', 'nearest')))
    if num_classes == 1:
        steps.append(Lambdad(keys='label', func=_binary))
    return steps


def random_steps(resolution: int, crop_size: int, train: bool, spatial_dims: int = 2) -> list[Any]:
    """The random crop (training only): applied after the cache, so each epoch sees new crops. In
    3D a patch of crop_size^3 centred on foreground or background alike (RandCropByPosNegLabeld,
    as MONAI's 3D tutorials do): small structures are seen as often as the rest."""
    if not train:
        return []
    if spatial_dims == 3:
        return [RandCropByPosNegLabeld(keys=KEYS, label_key='label', spatial_size=(crop_size,) * 3, pos=1, neg=1,
                                       num_samples=1, image_key='image', allow_smaller=True)]
    if crop_size < resolution:
        return [RandSpatialCropd(keys=KEYS, roi_size=(crop_size, crop_size), random_size=False)]
    return []


def transforms(resolution: int, crop_size: int, from_files: bool, train: bool,
               block_worker_after: int | None = None, worker_fault: str = 'block', spatial_dims: int = 2,
               num_classes: int = 1, spacing: tuple[float, ...] | None = None,
               intensity_range: tuple[float, float] | None = None) -> Compose:
    """The streaming pipeline: every step for every sample, every epoch."""
    extra = ([Lambdad(keys='image', func=_WorkerFault(block_worker_after, worker_fault))]
             if block_worker_after else [])
    return Compose([*deterministic_steps(resolution, from_files, spatial_dims, num_classes, spacing,
                                         intensity_range),
                    *random_steps(resolution, crop_size, train, spatial_dims),
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


def cached_transforms(resolution: int, crop_size: int, from_files: bool, train: bool, device: str,
                      spatial_dims: int = 2, num_classes: int = 1, spacing: tuple[float, ...] | None = None,
                      intensity_range: tuple[float, float] | None = None) -> Compose:
    """For CacheDataset: it caches up to the first random step, so the deterministic part runs
    once and its result is kept on ``device`` (the GPU when it fits); the crop runs each fetch."""
    return Compose([*deterministic_steps(resolution, from_files, spatial_dims, num_classes, spacing,
                                         intensity_range),
                    EnsureTyped(keys=KEYS, track_meta=False, device=device),
                    *random_steps(resolution, crop_size, train, spatial_dims)])


def dataset_bytes(num_samples: int, resolution: int, spatial_dims: int = 2) -> int:
    """float32 image and label per sample at the training resolution (a volume: resolution^3):
    what a cache holds."""
    return num_samples * resolution ** spatial_dims * 4 * 2


def files_bytes(items: list[dict[str, Any]]) -> int:
    """float32 image and label per NIfTI pair at its stored size (headers only): what a cache of
    the volumes would hold, before resampling."""
    total = 0
    for item in items:
        if item['image'].endswith(('.nii', '.nii.gz')):
            total += int(np.prod(_shape(pathlib.Path(item['image'])))) * 4 * 2
    return total


def split(items: list[dict[str, Any]], validation_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded hold-out split; at least one validation item."""
    order = np.random.RandomState(seed + 1).permutation(len(items))
    held_out = max(1, round(len(items) * validation_fraction))
    if held_out >= len(items):
        raise DatasetError(f'{len(items)} samples cannot be split into training and validation')
    return [items[i] for i in order[held_out:]], [items[i] for i in order[:held_out]]
