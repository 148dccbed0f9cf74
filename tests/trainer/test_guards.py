from __future__ import annotations

import pytest

from trainguard_trainer.guards import (
    GpuUnavailable,
    cgroup_cpu_limit,
    choose_data_path,
    decide_runtime,
    gpu_unavailable_reason,
    pick_device,
    safe_num_workers,
    torch_threads,
)


@pytest.mark.parametrize(('files', 'expected'), [
    ({'cpu.max': '200000 100000\n'}, 2.0),
    ({'cpu.max': '50000 100000\n'}, 0.5),
    ({'cpu.max': 'max 100000\n'}, None),
    ({'cpu/cpu.cfs_quota_us': '150000', 'cpu/cpu.cfs_period_us': '100000'}, 1.5),
    ({'cpu.cfs_quota_us': '-1', 'cpu.cfs_period_us': '100000'}, None),
    ({}, None),
], ids=['v2-two', 'v2-half', 'v2-unlimited', 'v1-one-and-half', 'v1-unlimited', 'none'])
def test_cgroup_cpu_limit(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


@pytest.mark.parametrize(('limit', 'cores', 'threads'), [
    (None, 8, 8), (2.0, 8, 2), (0.5, 8, 1), (16.0, 4, 4), (2.7, 8, 2)])
def test_threads_follow_the_limit(limit, cores, threads):
    assert torch_threads(limit, cores) == threads


def test_workers_drop_to_zero_when_shm_is_too_small():
    # Docker's default 64 MiB /dev/shm vs batch 32, 256px, 2 workers (the incident): 64 MiB needed + headroom.
    workers, note = safe_num_workers(2, 32, 256, shm_free=60 * 2**20)
    assert workers == 0 and note.startswith('[CPU_OPTIMIZATION] Forcing num_workers=0')
    assert safe_num_workers(2, 4, 128, shm_free=64 * 2**20) == (2, None)
    assert safe_num_workers(0, 32, 256, shm_free=0) == (0, None)


@pytest.mark.parametrize(('requested', 'cuda', 'device'), [
    ('auto', False, 'cpu'), ('auto', True, 'cuda'), ('gpu', True, 'cuda'), ('cuda', True, 'cuda'),
    ('cpu', True, 'cpu')])
def test_device(requested, cuda, device):
    assert pick_device(requested, cuda) == device


@pytest.mark.parametrize('requested', ['gpu', 'cuda'])
def test_a_gpu_run_never_falls_back_to_the_cpu(requested):
    with pytest.raises(GpuUnavailable):
        pick_device(requested, cuda_available=False)


@pytest.mark.parametrize(('build', 'count', 'error', 'expected'), [
    (None, 0, None, 'this torch build is CPU-only'),
    ('12.8', 0, 'Found no NVIDIA driver on your system', 'no CUDA device is visible'),
    ('12.8', 1, 'CUDA driver version is insufficient for CUDA runtime version', 'driver and CUDA runtime mismatch'),
    ('12.8', 1, None, None),
], ids=['cpu-only-build', 'no-device', 'driver-mismatch', 'usable'])
def test_gpu_unavailable_reason_names_which(build, count, error, expected):
    reason = gpu_unavailable_reason(build, count, error)
    assert (reason is None) if expected is None else (expected in reason and reason.startswith('GPU unavailable'))


def test_decide_runtime_reads_the_fakes(tmp_path):
    (tmp_path / 'cpu.max').write_text('100000 100000')
    decision = decide_runtime('auto', 2, 32, 256, cuda_available=False, cgroup_root=tmp_path,
                              shm_path=tmp_path / 'no-such-shm', cores=8)
    assert (decision.device, decision.threads, decision.num_workers) == ('cpu', 1, 2)


@pytest.mark.parametrize(('device', 'requested', 'size', 'gpu_free', 'ram_free', 'path'), [
    ('cpu', 'auto', 10, None, 1000, 'stream'),
    ('cpu', 'cache', 10, None, 1000, 'cpu-cache'),
    ('cuda', 'auto', 10, 1000, 1000, 'gpu-cache'),
    ('cuda', 'auto', 600, 1000, 10_000, 'cpu-cache'),
    ('cuda', 'auto', 600, 1000, 1000, 'stream'),
    ('cuda', 'stream', 10, 1000, 1000, 'stream'),
], ids=['cpu-streams', 'cpu-asked-cache', 'cuda-fits-gpu', 'cuda-fits-ram', 'cuda-fits-nowhere', 'cuda-asked-stream'])
def test_choose_data_path(device, requested, size, gpu_free, ram_free, path):
    chosen, note = choose_data_path(device, requested, size, gpu_free, ram_free)
    assert chosen == path and note.startswith('data path: ')


GiB = 2**30


@pytest.mark.parametrize(('files', 'expected'), [
    ({}, 8 * GiB),                                                                     # no cgroup: the host's
    ({'/sys/fs/cgroup/memory.max': 'max\n', '/sys/fs/cgroup/memory.current': '1\n'}, 8 * GiB),   # v2, no limit
    ({'/sys/fs/cgroup/memory.max': str(4 * GiB), '/sys/fs/cgroup/memory.current': str(GiB)}, 3 * GiB),
    ({'/sys/fs/cgroup/memory/memory.limit_in_bytes': str(2 * GiB),
      '/sys/fs/cgroup/memory/memory.usage_in_bytes': str(GiB)}, GiB),                   # cgroup v1
    ({'/sys/fs/cgroup/memory.max': str(GiB), '/sys/fs/cgroup/memory.current': str(2 * GiB)}, 0),
], ids=['no-cgroup', 'v2-unlimited', 'v2-limit', 'v1-limit', 'over-the-limit'])
def test_a_cache_is_sized_to_the_pods_memory_limit_not_the_nodes(files, expected):
    from trainguard_trainer.guards import memory_free

    assert memory_free(8 * GiB, files.get) == expected
    # A 3 GiB cache fits an 8 GiB node but not a pod limited to 4 GiB with 1 GiB used.
    if expected == 3 * GiB:
        assert choose_data_path('cuda', 'cache', 2 * GiB, None, memory_free(8 * GiB, files.get))[0] == 'stream'
