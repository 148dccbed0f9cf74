"""The CPU-safety policy: which settings hang or crash CPU training in containers, and their safe values.

On CPU nodes, batch 32 with two DataLoader workers at 256px hung in the first batch inside
containers (worker processes, small /dev/shm, oversubscribed threads). The policy forces
workers to 0 and caps batch, resolution and crop, unless GPU nodes are requested or the run
opts out with ``cpuSafety: off``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from trainguard.domain.spec import GPU_RESOURCES, Hyperparameters, RunSpec, parse_hyperparameters

ORIGINAL_ANNOTATION = 'trainguard.io/original-hyperparameters'


@dataclasses.dataclass(frozen=True)
class CpuLimits:
    """Operator configuration (Helm values); these defaults come from the incident."""

    num_workers: int = 0
    max_batch_size: int = 4
    max_resolution: int = 128
    # 3D (spec.model.spatialDims 3): a patch is crop^3 voxels and a batch of volumes is memory a
    # CPU pod runs out of first. 64^3 is 262,144 voxels per patch (a 512^2 image's worth), two
    # patches a step; synthetic volumes at most 96^3 (3.5 MB a volume, float32).
    max_crop_3d: int = 64
    max_batch_3d: int = 2
    max_resolution_3d: int = 96


@dataclasses.dataclass(frozen=True)
class Adjustment:
    field: str
    old: int
    new: int
    reason: str

    def to_api(self) -> dict[str, Any]:
        return {'field': self.field, 'from': self.old, 'to': self.new, 'reason': self.reason}

    def log_line(self) -> str:
        verb = 'Forcing' if self.field == 'numWorkers' else 'Capping'
        return f'[CPU_OPTIMIZATION] {verb} {_SNAKE[self.field]}={self.new} for CPU training (was {self.old})'


_SNAKE = {'numWorkers': 'num_workers', 'batchSize': 'batch_size', 'resolution': 'resolution', 'cropSize': 'crop_size'}


def gpu_requested(spec: RunSpec) -> bool:
    """GPU nodes are requested by device gpu, gpus > 0, or a GPU resource in requests or limits."""
    if spec.device == 'gpu' or spec.gpus > 0:
        return True
    return any(name in section for section in spec.resources.values() for name in GPU_RESOURCES)


def effective_device(spec: RunSpec) -> str:
    if spec.device == 'cpu':
        return 'cpu'
    return 'gpu' if gpu_requested(spec) else 'cpu'


def effective_gpus(spec: RunSpec) -> int:
    """GPUs per pod: device gpu with nothing else means one."""
    if spec.device == 'cpu':
        return 0
    if spec.gpus:
        return spec.gpus
    for section in ('limits', 'requests'):
        for name in GPU_RESOURCES:
            if name in spec.resources.get(section, {}):
                return 0  # the user's own GPU resource stands; nothing to add
    return 1 if spec.device == 'gpu' else 0


_REASONS = {
    'numWorkers': 'DataLoader worker processes hang or exhaust /dev/shm in CPU containers',
    'batchSize': 'large batches stall the first step on CPU',
    'resolution': 'large images make CPU steps minutes long',
    'cropSize': 'the crop cannot exceed the effective resolution',
}


def apply_cpu_safety(hp: Hyperparameters, limits: CpuLimits,
                     spatial_dims: int = 2) -> tuple[Hyperparameters, list[Adjustment]]:
    """Rewrite the settings that hang CPU training; values already inside the limits stay.
    In 3D the batch, the volume and the patch (crop^3 voxels) have limits of their own.

    Idempotent: applied to its own result it changes nothing, which is what lets the
    webhook and the create handler both apply it.
    """
    volume = spatial_dims == 3
    resolution = min(hp.resolution, limits.max_resolution_3d if volume else limits.max_resolution)
    crop = min(hp.crop_size, resolution, limits.max_crop_3d if volume else resolution)
    effective = dataclasses.replace(
        hp,
        num_workers=min(hp.num_workers, limits.num_workers),
        batch_size=min(hp.batch_size, limits.max_batch_3d if volume else limits.max_batch_size),
        resolution=resolution,
        crop_size=crop,
    )
    return effective, adjustments_between(hp, effective)


def adjustments_between(original: Hyperparameters, effective: Hyperparameters) -> list[Adjustment]:
    """One Adjustment per policy field that differs, in the design table's order."""
    old, new = original.to_api(), effective.to_api()
    return [Adjustment(field, old[field], new[field], reason)
            for field, reason in _REASONS.items() if old[field] != new[field]]


def policy_applies(spec: RunSpec) -> bool:
    return spec.cpu_safety == 'enforce' and effective_device(spec) == 'cpu'


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """What the CPU-safety policy does to one run, computed from the stored object."""

    original: Hyperparameters            # what the user wrote
    effective: Hyperparameters           # what the trainer gets
    adjustments: list[Adjustment]
    spec_patch: dict[str, Any] | None    # a merge patch for the run, None when it already holds the result


def plan_rewrite(spec: RunSpec, raw_hyperparameters: Mapping[str, Any], annotations: Mapping[str, str],
                 limits: CpuLimits) -> Rewrite:
    """Idempotent: once the spec holds the safe values and the annotation the user's, no patch.

    The admission webhook and the create handler both call this; whichever runs second
    finds the work done. The user's values come from the annotation once it exists.
    """
    if not policy_applies(spec):
        return Rewrite(spec.hyperparameters, spec.hyperparameters, [], None)
    effective, _ = apply_cpu_safety(spec.hyperparameters, limits, spec.model.spatial_dims)
    recorded = annotations.get(ORIGINAL_ANNOTATION)
    original = _parse_recorded(recorded) if recorded else None
    adjustments = adjustments_between(original or spec.hyperparameters, effective)
    patch: dict[str, Any] = {}
    if not _same(spec.hyperparameters, effective):
        patch['spec'] = {'hyperparameters': effective.to_api()}
    if adjustments and not recorded:
        written = {key: raw_hyperparameters.get(key, value) for key, value in spec.hyperparameters.to_api().items()}
        patch['metadata'] = {'annotations': {ORIGINAL_ANNOTATION: json.dumps(written, sort_keys=True)}}
    return Rewrite(original or spec.hyperparameters, effective, adjustments, patch or None)


def plan_admission(spec: RunSpec, raw_hyperparameters: Mapping[str, Any], annotations: Mapping[str, str],
                   old_annotations: Mapping[str, str], limits: CpuLimits) -> Rewrite:
    """The webhook's rewrite on CREATE (no old object) and UPDATE.

    An UPDATE that omits the original-values annotation (a GitOps tool applying the manifest
    as written, which never had it) keeps the first admission's record: the annotation is put
    back, and the spec is rewritten to the same live values, so a dry run shows no drift.
    """
    kept = old_annotations.get(ORIGINAL_ANNOTATION)
    restore = kept is not None and ORIGINAL_ANNOTATION not in annotations and policy_applies(spec)
    merged = {**annotations, ORIGINAL_ANNOTATION: kept} if restore and kept is not None else annotations
    rewrite = plan_rewrite(spec, raw_hyperparameters, merged, limits)
    if not restore:
        return rewrite
    patch = dict(rewrite.spec_patch or {})
    patch['metadata'] = {'annotations': {ORIGINAL_ANNOTATION: kept}}
    return dataclasses.replace(rewrite, spec_patch=patch)


def _parse_recorded(recorded: str) -> Hyperparameters | None:
    try:
        return parse_hyperparameters(json.loads(recorded), field=f'annotation {ORIGINAL_ANNOTATION}')
    except (ValueError, TypeError, AttributeError):
        return None  # an edited, unreadable annotation: the spec's values stand


def _same(a: Hyperparameters, b: Hyperparameters) -> bool:
    return a.to_api() == b.to_api()
