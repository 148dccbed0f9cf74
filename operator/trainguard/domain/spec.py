"""Parsing and validating a TrainingRun spec into typed values.

The CRD schema refuses most malformed runs at the API server. This parser repeats the
checks that matter for a safe pod, so a run that slipped past (an old CRD, schema
validation off) ends as Failed/InvalidSpec with a message naming the field, instead of
crashing a handler.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from trainguard.domain.errors import SpecError
from trainguard.domain.template import PodTemplate, parse_template

GPU_RESOURCES = ('nvidia.com/gpu', 'amd.com/gpu')
_LABEL_VALUE = re.compile(r'(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?')

# The CRD's defaults, repeated for runs stored before a default existed; a unit test keeps
# them equal to manifests/crd (tests/unit/test_spec.py::test_defaults_match_the_crd).
DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    'batchSize': 32, 'numWorkers': 2, 'epochs': 2, 'learningRate': 0.01, 'resolution': 256, 'cropSize': 256,
}
DEFAULT_MODEL: dict[str, Any] = {'channels': [16, 32, 64, 128, 256], 'strides': [2, 2, 2, 2], 'numResUnits': 2,
                                 'spatialDims': 2, 'numClasses': 0}
DEFAULT_DATASET: dict[str, Any] = {'source': 'synthetic', 'numSamples': 64, 'claimName': '', 'path': '/data',
                                   'format': 'folders'}
MAX_NODES = 64
DEFAULT_TIMEOUTS: dict[str, int] = {'progressTimeoutSeconds': 300, 'startupTimeoutSeconds': 600, 'backoffLimit': 0,
                                   'numNodes': 1, 'maxDisruptions': 20, 'checkpointIntervalSeconds': 600,
                                   'terminationGracePeriodSeconds': 60}




@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    batch_size: int
    num_workers: int
    epochs: int
    learning_rate: float
    resolution: int
    crop_size: int

    def to_api(self) -> dict[str, Any]:
        return {'batchSize': self.batch_size, 'numWorkers': self.num_workers, 'epochs': self.epochs,
                'learningRate': self.learning_rate, 'resolution': self.resolution, 'cropSize': self.crop_size}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int
    spatial_dims: int = 2      # 2: images; 3: volumes
    num_classes: int = 0       # structures besides background; 0: as many as dataset.json names, else 1


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    source: str
    num_samples: int
    claim_name: str
    path: str
    format: str = 'folders'    # directory datasets: folders (images/ + labels/) | decathlon (dataset.json)
    spacing: tuple[float, ...] | None = None             # 3D: voxel size to resample to (mm); None: the median
    intensity_range: tuple[float, float] | None = None   # a window mapped to [0, 1]; None: each image's range


@dataclasses.dataclass(frozen=True)
class RunSpec:
    device: str
    gpus: int
    image: str
    cpu_safety: str
    hyperparameters: Hyperparameters
    model: ModelSpec
    dataset: DatasetSpec
    output_claim: str
    resources: dict[str, dict[str, str]]
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    progress_timeout_seconds: int
    startup_timeout_seconds: int
    backoff_limit: int
    retry_policy: str = 'adapt'   # adapt | same: how a retried attempt's settings follow its failure
    num_nodes: int = 1            # pods per attempt (a gang when > 1)
    max_disruptions: int = 20     # attempts the cluster may take (drain, preemption) before the run fails
    checkpoint_interval_seconds: int = 600  # the trainer's mid-epoch checkpoints; 0: at epoch ends only
    termination_grace_period_seconds: int = 60  # SIGTERM to SIGKILL: the trainer's time to save and exit
    suspend: bool = False         # Job's convention (what Kueue sets): no pods while true
    active_deadline_seconds: int | None = None  # active wall-clock time allowed (suspended time excluded)
    queue_name: str = ''          # Kueue LocalQueue (spec.queueName, or the run's kueue.x-k8s.io/queue-name label)
    template: PodTemplate = dataclasses.field(default_factory=PodTemplate)  # merged into every pod


def _int(raw: Mapping[str, Any], key: str, field: str, default: int, low: int, high: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f'{field}.{key}', f'must be an integer, got {value!r}')
    if not low <= value <= high:
        raise SpecError(f'{field}.{key}', f'must be between {low} and {high}, got {value}')
    return value


def _bool(raw: Mapping[str, Any], key: str, field: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise SpecError(f'{field}.{key}', f'must be true or false, got {value!r}')
    return value


def _str(raw: Mapping[str, Any], key: str, field: str, default: str, choices: Sequence[str] = ()) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise SpecError(f'{field}.{key}', f'must be a string, got {value!r}')
    if choices and value not in choices:
        raise SpecError(f'{field}.{key}', f'must be one of {", ".join(choices)}, got {value!r}')
    return value


def _mapping(raw: Mapping[str, Any], key: str, field: str) -> Mapping[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f'{field}.{key}', f'must be an object, got {value!r}')
    return value


def _int_list(raw: Mapping[str, Any], key: str, field: str, default: list[int], low: int, high: int) -> tuple[int, ...]:
    value = raw.get(key, default)
    if not isinstance(value, list) or not value:
        raise SpecError(f'{field}.{key}', f'must be a non-empty list of integers, got {value!r}')
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
            raise SpecError(f'{field}.{key}[{index}]', f'must be an integer between {low} and {high}, got {item!r}')
    return tuple(value)


def parse_hyperparameters(raw: Mapping[str, Any], field: str = 'spec.hyperparameters') -> Hyperparameters:
    learning_rate = raw.get('learningRate', DEFAULT_HYPERPARAMETERS['learningRate'])
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float) or not 0 < learning_rate <= 10:
        raise SpecError(f'{field}.learningRate', f'must be a number in (0, 10], got {learning_rate!r}')
    hp = Hyperparameters(
        batch_size=_int(raw, 'batchSize', field, DEFAULT_HYPERPARAMETERS['batchSize'], 1, 4096),
        num_workers=_int(raw, 'numWorkers', field, DEFAULT_HYPERPARAMETERS['numWorkers'], 0, 64),
        epochs=_int(raw, 'epochs', field, DEFAULT_HYPERPARAMETERS['epochs'], 1, 100000),
        learning_rate=float(learning_rate),
        resolution=_int(raw, 'resolution', field, DEFAULT_HYPERPARAMETERS['resolution'], 16, 4096),
        crop_size=_int(raw, 'cropSize', field, DEFAULT_HYPERPARAMETERS['cropSize'], 16, 4096),
    )
    if hp.crop_size > hp.resolution:
        raise SpecError(f'{field}.cropSize', f'must be <= resolution ({hp.resolution}), got {hp.crop_size}')
    return hp


def _quantities(raw: Mapping[str, Any], field: str) -> dict[str, str]:
    # The kubernetes client refuses non-string quantities, so every value becomes a string here.
    result: dict[str, str] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float | str) or str(value).strip() == '':
            raise SpecError(f'{field}.{name}', f'must be a quantity like "2" or "4Gi", got {value!r}')
        result[str(name)] = str(value)
    return result


def parse_spec(raw: Mapping[str, Any]) -> RunSpec:
    """Turn ``.spec`` into a RunSpec, or raise SpecError naming the first bad field."""
    if not isinstance(raw, Mapping):
        raise SpecError('spec', f'must be an object, got {raw!r}')
    device = _str(raw, 'device', 'spec', 'auto', ('auto', 'cpu', 'gpu'))
    gpus = _int(raw, 'gpus', 'spec', 0, 0, 16)
    if device == 'cpu' and gpus:
        raise SpecError('spec.gpus', f'must be 0 when spec.device is cpu, got {gpus}')
    model_raw = _mapping(raw, 'model', 'spec')
    model = ModelSpec(
        channels=_int_list(model_raw, 'channels', 'spec.model', DEFAULT_MODEL['channels'], 1, 4096),
        strides=_int_list(model_raw, 'strides', 'spec.model', DEFAULT_MODEL['strides'], 1, 4),
        num_res_units=_int(model_raw, 'numResUnits', 'spec.model', DEFAULT_MODEL['numResUnits'], 0, 8),
        spatial_dims=_int(model_raw, 'spatialDims', 'spec.model', 2, 2, 3),
        num_classes=_int(model_raw, 'numClasses', 'spec.model', 0, 0, 32),
    )
    if len(model.strides) != len(model.channels) - 1:
        raise SpecError('spec.model.strides', f'must have one entry fewer than channels ({len(model.channels)}),'
                                              f' got {len(model.strides)}')
    dataset_raw = _mapping(raw, 'dataset', 'spec')
    dataset = DatasetSpec(
        source=_str(dataset_raw, 'source', 'spec.dataset', 'synthetic', ('synthetic', 'directory')),
        num_samples=_int(dataset_raw, 'numSamples', 'spec.dataset', DEFAULT_DATASET['numSamples'], 2, 100000),
        claim_name=_str(dataset_raw, 'claimName', 'spec.dataset', ''),
        path=_str(dataset_raw, 'path', 'spec.dataset', '/data'),
        format=_str(dataset_raw, 'format', 'spec.dataset', 'folders', ('folders', 'decathlon')),
        spacing=_numbers(dataset_raw, 'spacing', 'spec.dataset', 3, positive=True),
        intensity_range=_window(dataset_raw),
    )
    if model.num_classes > 1 and model.spatial_dims == 2 and dataset.source == 'synthetic':
        raise SpecError('spec.model.numClasses', 'synthetic 2D images have one structure: numClasses must be 0 or 1 '
                                                 '(3D synthetic volumes have as many as asked)')
    if dataset.source == 'directory' and not dataset.claim_name:
        raise SpecError('spec.dataset.claimName', 'is required when spec.dataset.source is directory')
    if not dataset.path.startswith('/'):
        raise SpecError('spec.dataset.path', f'must be an absolute path, got {dataset.path!r}')
    resources_raw = _mapping(raw, 'resources', 'spec')
    resources = {
        section: _quantities(_mapping(resources_raw, section, 'spec.resources'), f'spec.resources.{section}')
        for section in ('limits', 'requests') if resources_raw.get(section)
    }
    node_selector = dict(_mapping(raw, 'nodeSelector', 'spec'))
    for key, value in node_selector.items():
        if not isinstance(value, str):
            raise SpecError(f'spec.nodeSelector.{key}', f'must be a string, got {value!r}')
    tolerations = raw.get('tolerations') or []
    if not isinstance(tolerations, list) or not all(isinstance(item, Mapping) for item in tolerations):
        raise SpecError('spec.tolerations', f'must be a list of tolerations, got {tolerations!r}')
    return RunSpec(
        device=device,
        gpus=gpus,
        image=_str(raw, 'image', 'spec', ''),
        cpu_safety=_str(raw, 'cpuSafety', 'spec', 'enforce', ('enforce', 'off')),
        hyperparameters=parse_hyperparameters(_mapping(raw, 'hyperparameters', 'spec')),
        model=model,
        dataset=dataset,
        output_claim=_str(_mapping(raw, 'output', 'spec'), 'claimName', 'spec.output', ''),
        resources=resources,
        node_selector=node_selector,
        tolerations=[dict(item) for item in tolerations],
        progress_timeout_seconds=_int(raw, 'progressTimeoutSeconds', 'spec', 300, 5, 604800),
        startup_timeout_seconds=_int(raw, 'startupTimeoutSeconds', 'spec', 600, 5, 604800),
        backoff_limit=_int(raw, 'backoffLimit', 'spec', 0, 0, 10),
        retry_policy=_str(raw, 'retryPolicy', 'spec', 'adapt', ('adapt', 'same')),
        num_nodes=_int(raw, 'numNodes', 'spec', 1, 1, MAX_NODES),
        max_disruptions=_int(raw, 'maxDisruptions', 'spec', 20, 0, 1000),
        checkpoint_interval_seconds=_int(raw, 'checkpointIntervalSeconds', 'spec', 600, 0, 86400),
        termination_grace_period_seconds=_int(raw, 'terminationGracePeriodSeconds', 'spec', 60, 1, 3600),
        suspend=_bool(raw, 'suspend', 'spec', False),
        active_deadline_seconds=(_int(raw, 'activeDeadlineSeconds', 'spec', 0, 1, 31_536_000)
                                 if raw.get('activeDeadlineSeconds') is not None else None),
        queue_name=_queue_name(raw),
        template=parse_template(raw.get('template'), dataset.path),
    )


def _numbers(raw: Mapping[str, Any], key: str, field: str, count: int, *,
             positive: bool = False) -> tuple[float, ...] | None:
    value = raw.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != count
            or not all(isinstance(item, int | float) and not isinstance(item, bool) for item in value)
            or (positive and min(value) <= 0)):
        kind = 'positive numbers' if positive else 'numbers'
        raise SpecError(f'{field}.{key}', f'must be {count} {kind}, got {value!r}')
    return tuple(float(item) for item in value)


def _window(raw: Mapping[str, Any]) -> tuple[float, float] | None:
    window = _numbers(raw, 'intensityRange', 'spec.dataset', 2)
    if window is not None and window[0] >= window[1]:
        raise SpecError('spec.dataset.intensityRange', f'the low end must be below the high end, got {list(window)}')
    return (window[0], window[1]) if window else None


def _queue_name(raw: Mapping[str, Any]) -> str:
    """A LocalQueue's name goes into a label value: at most 63 characters of [a-z0-9.-_]."""
    value = _str(raw, 'queueName', 'spec', '')
    if value and not _LABEL_VALUE.fullmatch(value):
        raise SpecError('spec.queueName', f'must be a valid label value (at most 63 letters, digits, "-", "_", "."'
                                          f' starting and ending alphanumeric), got {value!r}')
    return value
