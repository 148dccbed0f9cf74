"""The trainer's configuration: one typed object built by the CLI (or by tests directly)."""

from __future__ import annotations

import dataclasses
import pathlib


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    device: str = 'auto'                 # auto | cpu | cuda (gpu is accepted as cuda)
    batch_size: int = 4
    num_workers: int = 0
    epochs: int = 2
    learning_rate: float = 0.01
    resolution: int = 128
    crop_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 2
    dataset: str = 'synthetic'           # synthetic | directory
    dataset_format: str = 'folders'      # directory datasets: folders (images/ + labels/) | decathlon (dataset.json)
    spatial_dims: int = 2                # 2: images; 3: volumes (synthetic volumes are resolution^3)
    num_classes: int = 0                 # labelled structures besides background; 0: the dataset's (else 1)
    spacing: tuple[float, ...] | None = None          # 3D files: resampled to this voxel size (mm); None: median
    intensity_range: tuple[float, float] | None = None  # a CT window mapped to [0, 1]; None: each image's range
    num_samples: int = 64
    data_dir: pathlib.Path = pathlib.Path('/data')
    output_dir: pathlib.Path = pathlib.Path('/output')
    validation_fraction: float = 0.2
    seed: int = 0
    heartbeat_seconds: float = 10.0
    log_every_steps: int = 10
    system_log_seconds: float = 30.0
    data_path: str = 'auto'              # auto | cache | stream (auto: cache on CUDA, stream on CPU)
    stall_report_seconds: float = 0.0    # watchdog: report after this long without a step; 0: off
    startup_report_seconds: float = 0.0  # ... before the first step; 0: off
    attempt: int = 0                     # the operator's attempt number, echoed in the stall report
    collective_timeout_seconds: float = 600.0  # distributed: a collective waiting longer on a peer fails
    checkpoint_interval_seconds: float = 600.0  # a mid-epoch checkpoint at most this often; 0: epoch ends only
    simulate_worker_block_after_items: int | None = None  # test switch: a DataLoader worker fails after N items
    simulate_worker_fault: str = 'block'                   # ... by blocking, SIGSTOP (frozen) or SIGKILL
    simulate_slow_preparation_seconds: float = 0.0         # test switch: each item prepared takes this longer
    simulate_preparation_hang_after_items: int | None = None   # test switch: preparation blocks after N items
    run_name: str = ''                   # empty: local use, heartbeats are only logged
    run_namespace: str = 'default'
    simulate_hang_after_steps: int | None = None
