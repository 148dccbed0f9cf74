"""CPU-runtime guards: threads from the container's CPU limit, workers that fit /dev/shm, the device.

Inside containers, torch sees the node's cores, not the container's CPU quota, and
oversubscribes threads; DataLoader workers pass batches through /dev/shm, which Docker
caps at 64 MiB by default (batch 32 / 256px / 2 workers crashes with "unable to allocate
shared memory"). These guards read the real limits and adapt before training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import shutil
from collections.abc import Callable

log = logging.getLogger(__name__)

PREFETCH_FACTOR = 2  # torch DataLoader's default


def cgroup_cpu_limit(root: pathlib.Path = pathlib.Path('/sys/fs/cgroup')) -> float | None:
    """CPUs allowed by the cgroup quota (v2 cpu.max, else v1 cfs quota/period), None if unlimited."""
    v2 = root / 'cpu.max'
    try:
        if v2.exists():
            quota, _, period = v2.read_text().strip().partition(' ')
            if quota != 'max':
                return int(quota) / int(period or 100000)
            return None
        quota_file, period_file = root / 'cpu' / 'cpu.cfs_quota_us', root / 'cpu' / 'cpu.cfs_period_us'
        if not quota_file.exists():
            quota_file, period_file = root / 'cpu.cfs_quota_us', root / 'cpu.cfs_period_us'
        if quota_file.exists():
            quota_us = int(quota_file.read_text().strip())
            if quota_us > 0:
                return quota_us / int(period_file.read_text().strip())
    except (OSError, ValueError) as error:
        log.warning('could not read the cgroup CPU limit: %s', error)
    return None


def torch_threads(limit: float | None, cores: int) -> int:
    """Threads = the CPU limit (at least 1), never more than the cores."""
    if limit is None:
        return max(1, cores)
    return max(1, min(cores, math.floor(limit)))


def loader_shm_bytes(batch_size: int, crop_size: int, num_workers: int) -> int:
    """Bytes the DataLoader keeps in /dev/shm: workers x prefetch x one batch of float32 images and labels."""
    batch_bytes = batch_size * crop_size * crop_size * 4 * 2
    return num_workers * PREFETCH_FACTOR * batch_bytes


def shm_free_bytes(path: pathlib.Path = pathlib.Path('/dev/shm')) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def safe_num_workers(num_workers: int, batch_size: int, crop_size: int, shm_free: int | None) -> tuple[int, str | None]:
    """Drop to 0 workers, with a [CPU_OPTIMIZATION] line, when the loader would not fit /dev/shm."""
    if num_workers == 0 or shm_free is None:
        return num_workers, None
    needed = loader_shm_bytes(batch_size, crop_size, num_workers)
    if needed <= shm_free:
        return num_workers, None
    return 0, (f'[CPU_OPTIMIZATION] Forcing num_workers=0: /dev/shm has {shm_free / 2**20:.0f} MiB free, '
               f'the DataLoader needs {needed / 2**20:.0f} MiB (was {num_workers})')


class GpuUnavailable(RuntimeError):
    """The run asked for a GPU and CUDA is not usable: training on the CPU instead would run the
    GPU's settings (batch 32, workers, 256px) on a CPU, the hang this project exists to prevent."""


def pick_device(requested: str, cuda_available: bool) -> str:
    """auto chooses; gpu/cuda get CUDA or stop: never a silent fallback to the CPU."""
    if requested in ('gpu', 'cuda'):
        if not cuda_available:
            raise GpuUnavailable('GPU unavailable: CUDA is not available to torch')
        return 'cuda'
    if requested == 'auto':
        return 'cuda' if cuda_available else 'cpu'
    return 'cpu'


@dataclasses.dataclass(frozen=True)
class RuntimeDecision:
    device: str
    threads: int
    num_workers: int
    notes: tuple[str, ...]


def decide_runtime(requested_device: str, num_workers: int, batch_size: int, crop_size: int, *,
                   cuda_available: bool, cgroup_root: pathlib.Path = pathlib.Path('/sys/fs/cgroup'),
                   shm_path: pathlib.Path = pathlib.Path('/dev/shm'), cores: int | None = None) -> RuntimeDecision:
    cores = cores or os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    threads = torch_threads(limit, cores)
    workers, note = safe_num_workers(num_workers, batch_size, crop_size, shm_free_bytes(shm_path))
    notes = [f'torch threads = {threads} (CPU limit {limit if limit is not None else "none"}, {cores} cores)']
    if note:
        notes.append(note)
    return RuntimeDecision(pick_device(requested_device, cuda_available), threads, workers, tuple(notes))


class GpuOutOfMemory(RuntimeError):
    """CUDA ran out of memory: the operator retries the run with half the batch."""


def gpu_unavailable_reason(cuda_build: str | None, device_count: int, init_error: str | None) -> str | None:
    """Why CUDA cannot be used here, in one line, or None when it can."""
    if cuda_build is None:
        return ('GPU unavailable: this torch build is CPU-only (torch.version.cuda is None); '
                'use the CUDA trainer image (TRAINGUARD_TRAINER_GPU_IMAGE)')
    if device_count == 0:
        return ('GPU unavailable: no CUDA device is visible in the container (no nvidia.com/gpu allocated, '
                f'or CUDA_VISIBLE_DEVICES hides them){f": {init_error}" if init_error else ""}')
    if init_error:
        return f'GPU unavailable: CUDA could not initialise (driver and CUDA runtime mismatch?): {init_error}'
    return None


CGROUP_FILES = (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),                  # cgroup v2
                ('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory/memory.usage_in_bytes'))


def memory_free(host_available: int, read: Callable[[str], str | None]) -> int:
    """Bytes this process may still use: the host's available memory, or less when the pod's
    memory limit (its cgroup) leaves less. psutil sees the node's memory, and a cache sized to
    that is what gets a CPU pod OOMKilled. ``read``: a file's text, or None when absent."""
    for limit_file, usage_file in CGROUP_FILES:
        limit, usage = read(limit_file), read(usage_file)
        if limit is None or usage is None or not limit.strip().isdigit() or not usage.strip().isdigit():
            continue   # "max": no limit at this level
        return max(0, min(host_available, int(limit) - int(usage)))
    return host_available


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding='ascii') as file:
            return file.read()
    except OSError:
        return None


def choose_data_path(device: str, requested: str, cache_bytes: int, gpu_free: int | None,
                     ram_free: int | None) -> tuple[str, str]:
    """Where the training data lives: 'gpu-cache', 'cpu-cache' or 'stream', and a log line why.

    On CUDA the input pipeline, not the model, bounds a small UNet: the deterministic part of
    the transforms is cached (on the GPU when it fits in half its free memory, else in half the
    free RAM) and fed by a ThreadDataLoader. On CPU the streaming path stays unless asked
    (benchmarks/README.md has both measured). ``requested`` is --data-path: auto, cache or stream.
    """
    size = f'{cache_bytes / 2**20:.0f} MiB'
    if requested == 'stream' or (device != 'cuda' and requested == 'auto'):
        why = '--data-path stream' if requested == 'stream' else device
        return 'stream', f'data path: streaming transforms ({why})'
    if gpu_free is not None and device == 'cuda' and cache_bytes <= gpu_free // 2:
        return 'gpu-cache', f'data path: CacheDataset on the GPU ({size}) + ThreadDataLoader'
    if ram_free is not None and cache_bytes <= ram_free // 2:
        where = 'too large for the GPU' if device == 'cuda' else 'training on the CPU'
        return 'cpu-cache', f'data path: CacheDataset in RAM ({size}; {where}) + ThreadDataLoader'
    return 'stream', f'data path: streaming transforms: the data ({size}) does not fit in memory for a cache'
