"""The operator's core behaviours, end to end over HTTP against the emulator, in loop time."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.operator.conftest import EVENTS, NAMESPACE, PODS

# Generous no-op cycles: kopf handler threads call the emulator over real sockets, and loop
# time must not jump ahead while such a request is still in flight on a loaded machine.
pytestmark = pytest.mark.looptime(noop_cycles=2000)

CPU_RUN = {
    'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'cpu'},
    'spec': {'hyperparameters': {'batchSize': 32, 'numWorkers': 2, 'epochs': 2, 'learningRate': 0.01,
                                 'resolution': 256, 'cropSize': 256},
             'progressTimeoutSeconds': 60, 'startupTimeoutSeconds': 120},
}


# What the API server's structural defaulting adds to hyperparameters the user left out.
DEFAULTED = {'epochs': 2, 'learningRate': 0.01, 'resolution': 256, 'cropSize': 256}


def run_body(name: str, **spec: Any) -> dict[str, Any]:
    return {'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': name},
            'spec': {'progressTimeoutSeconds': 60, 'startupTimeoutSeconds': 120, **spec}}


def phase(expected: str):
    return lambda run: (run.get('status') or {}).get('phase') == expected


async def set_pod_phase(api, name: str, pod_phase: str, **container_state: Any) -> None:
    status: dict[str, Any] = {'phase': pod_phase}
    if container_state:
        status['containerStatuses'] = [{'name': 'trainer', 'state': container_state}]
    await api.patch(name, {'status': status}, resource=PODS, subresource='status')


async def beat(api, run: str, **progress: Any) -> None:
    payload = {'epoch': 1, 'epochs': 2, 'step': 1, 'steps': 16, 'loss': 0.9, 'samplesPerSecond': 5.0,
               'time': '2026-11-25T12:00:00Z', **progress}
    await api.patch(run, {'metadata': {'annotations': {'trainguard.io/progress': json.dumps(payload)}}})


async def start_running(api, name: str, **spec: Any) -> dict[str, Any]:
    """Create a CPU run and bring its first pod to Running, as the kubelet would."""
    await api.create(run_body(name, device='cpu', **spec))
    await api.wait_for_run(name, phase('Pending'))
    await set_pod_phase(api, f'{name}-1', 'Running')
    return await api.wait_for_run(name, phase('Running'))


async def beat_and_wait(api, run: str, **progress: Any) -> dict[str, Any]:
    await beat(api, run, **progress)
    step = progress.get('step', 1)
    return await api.wait_for_run(run, lambda r: (r['status'].get('progress') or {}).get('step') == step)


async def events_of(api, run: str) -> list[dict[str, Any]]:
    return [event for event in await api.list(EVENTS) if event['involvedObject']['name'] == run]


async def test_cpu_run_is_rewritten_and_launched(api, operator):
    await operator.start()
    await api.create(CPU_RUN)
    run = await api.wait_for_run('cpu', lambda r: (r.get('status') or {}).get('podName'), what='a pod')
    assert run['spec']['hyperparameters'] == {'batchSize': 4, 'numWorkers': 0, 'epochs': 2, 'learningRate': 0.01,
                                              'resolution': 128, 'cropSize': 128}
    original = json.loads(run['metadata']['annotations']['trainguard.io/original-hyperparameters'])
    assert original == CPU_RUN['spec']['hyperparameters']
    assert [a['field'] for a in run['status']['adjustments']] == ['numWorkers', 'batchSize', 'resolution', 'cropSize']
    assert all(a['reason'] for a in run['status']['adjustments'])
    assert [(a['from'], a['to']) for a in run['status']['adjustments']] == [(2, 0), (32, 4), (256, 128), (256, 128)]
    assert run['status']['phase'] == 'Pending' and run['status']['attempts'] == 1
    assert run['status']['device'] == 'cpu'
    pod = await api.get('cpu-1', resource=PODS)
    args = pod['spec']['containers'][0]['args']
    assert args[args.index('--batch-size') + 1] == '4'
    assert args[args.index('--num-workers') + 1] == '0'
    assert args[args.index('--resolution') + 1] == '128'
    events = await events_of(api, 'cpu')
    optimized = [event for event in events if event['reason'] == 'CPUOptimized']
    assert len(optimized) == 1
    assert '[CPU_OPTIMIZATION] Forcing num_workers=0 for CPU training (was 2)' in optimized[0]['message']
    assert '[CPU_OPTIMIZATION] Capping batch_size=4 for CPU training (was 32)' in optimized[0]['message']


async def test_gpu_run_is_untouched(api, operator):
    await operator.start()
    await api.create(run_body('gpu', device='gpu', hyperparameters={'batchSize': 32, 'numWorkers': 4},
                              tolerations=[{'key': 'dedicated', 'operator': 'Equal', 'value': 'ml',
                                            'effect': 'NoSchedule'}]))
    run = await api.wait_for_run('gpu', lambda r: (r.get('status') or {}).get('podName'))
    assert run['spec']['hyperparameters'] == {'batchSize': 32, 'numWorkers': 4, **DEFAULTED}
    assert 'adjustments' not in run['status'] and run['status']['device'] == 'gpu'
    pod = await api.get('gpu-1', resource=PODS)
    assert pod['spec']['containers'][0]['resources']['limits'] == {'nvidia.com/gpu': '1'}
    toleration = {'key': 'dedicated', 'operator': 'Equal', 'value': 'ml', 'effect': 'NoSchedule'}
    assert toleration in pod['spec']['tolerations']


async def test_cpu_safety_off_is_untouched(api, operator):
    await operator.start()
    await api.create(run_body('off', cpuSafety='off', hyperparameters={'batchSize': 32, 'numWorkers': 2}))
    run = await api.wait_for_run('off', lambda r: (r.get('status') or {}).get('podName'))
    assert run['spec']['hyperparameters'] == {'batchSize': 32, 'numWorkers': 2, **DEFAULTED}
    assert 'trainguard.io/original-hyperparameters' not in (run['metadata'].get('annotations') or {})


async def test_heartbeat_is_mirrored_and_success_is_terminal(api, operator):
    await operator.start()
    await api.create(run_body('ok', device='cpu'))
    await api.wait_for_run('ok', phase('Pending'))
    await set_pod_phase(api, 'ok-1', 'Running', running={'startedAt': '2026-11-25T12:00:00Z'})
    await api.wait_for_run('ok', phase('Running'))
    await beat(api, 'ok', epoch=2, step=8, loss=0.42)
    run = await api.wait_for_run('ok', lambda r: (r['status'].get('progress') or {}).get('step') == 8)
    progress = run['status']['progress']
    assert progress['percent'] == 75 and progress['loss'] == 0.42 and progress['lastProgressTime']
    assert run['status']['epoch'] == '2/2'
    await set_pod_phase(api, 'ok-1', 'Succeeded', terminated={'exitCode': 0, 'reason': 'Completed'})
    run = await api.wait_for_run('ok', phase('Succeeded'))
    ready = next(c for c in run['status']['conditions'] if c['type'] == 'Ready')
    assert ready['status'] == 'True'
    assert run['status']['completionTime']
    phases = {'Pending', 'Running', 'Succeeded', 'Failed'}
    reasons = [event['reason'] for event in await events_of(api, 'ok') if event['reason'] in phases]
    assert reasons == ['Pending', 'Running', 'Succeeded']


async def test_progress_stall_deletes_pod_and_fails(api, operator):
    await operator.start()
    await start_running(api, 'hung')
    await beat_and_wait(api, 'hung', epoch=1, step=8, loss=0.42)
    run = await api.wait_for_run('hung', phase('Failed'), timeout=60 + 15)
    assert run['status']['reason'] == 'ProgressTimeout'
    assert run['status']['message'].startswith('no progress for ')
    assert '(last: epoch 1/2, step 8/16, loss 0.42)' in run['status']['message']
    assert await api.find('hung-1', resource=PODS) is None
    stalled = next(c for c in run['status']['conditions'] if c['type'] == 'Stalled')
    assert stalled['status'] == 'True'


async def test_a_stall_report_reaches_the_status_and_the_event(api, operator):
    await operator.start()
    await start_running(api, 'diag')
    await beat_and_wait(api, 'diag', epoch=1, step=8, loss=0.42)
    summary = 'hung in torch/utils/data/dataloader.py:_try_get_data; DataLoader worker 1 (pid 42) exited with -9'
    await api.patch('diag', {'metadata': {'annotations': {'trainguard.io/stall-report': json.dumps({
        'summary': summary, 'attempt': 1, 'frames': ['torch/utils/data/dataloader.py:1291 _try_get_data'],
        'workers': ['DataLoader worker 1 (pid 42) exited with -9']})}}})
    run = await api.wait_for_run('diag', phase('Failed'), timeout=60 + 15)
    assert run['status']['message'].endswith(f'; {summary}')
    assert run['status']['stallReport'] == {
        'class': 'DataLoaderWorkers', 'summary': summary,
        'frames': ['torch/utils/data/dataloader.py:1291 _try_get_data'],
        'workers': ['DataLoader worker 1 (pid 42) exited with -9']}
    events = await api.wait_for(lambda: _events_with(api, 'diag', 'ProgressTimeout'), what='the stall Event')
    assert summary in events[0]['message']


async def _events_with(api, name: str, reason: str) -> list[dict]:
    return [event for event in await events_of(api, name) if event['reason'] == reason]


async def test_startup_stall_fails_with_startup_timeout(api, operator):
    await operator.start()
    await api.create(run_body('mute', device='cpu'))
    await api.wait_for_run('mute', phase('Pending'))
    await set_pod_phase(api, 'mute-1', 'Running')
    run = await api.wait_for_run('mute', phase('Failed'), timeout=120 + 15)
    assert run['status']['reason'] == 'StartupTimeout'
    assert await api.find('mute-1', resource=PODS) is None


async def test_backoff_limit_retries_then_fails(api, operator):
    await operator.start()
    await api.create(run_body('retry', device='cpu', backoffLimit=1))
    await api.wait_for_run('retry', phase('Pending'))
    await set_pod_phase(api, 'retry-1', 'Running')
    run = await api.wait_for_run('retry', lambda r: r['status'].get('attempts') == 2, timeout=140)
    assert run['status']['podName'] == 'retry-2' and run['status']['reason'] == 'Retrying'
    assert await api.find('retry-1', resource=PODS) is None
    assert await api.find('retry-2', resource=PODS) is not None
    await set_pod_phase(api, 'retry-2', 'Running')
    run = await api.wait_for_run('retry', phase('Failed'), timeout=140)
    assert run['status']['reason'] == 'StartupTimeout' and run['status']['attempts'] == 2
    assert 'after 2 attempts' in run['status']['message']


async def test_oom_killed_fails_with_reason(api, operator):
    await operator.start()
    await api.create(run_body('oom', device='cpu', resources={'limits': {'memory': '1Gi'}}))
    await api.wait_for_run('oom', phase('Pending'))
    await set_pod_phase(api, 'oom-1', 'Failed', terminated={'exitCode': 137, 'reason': 'OOMKilled'})
    run = await api.wait_for_run('oom', phase('Failed'))
    assert run['status']['reason'] == 'OOMKilled'
    assert '1Gi' in run['status']['message']


async def test_a_gpu_run_without_usable_cuda_fails_at_once_without_retry(api, operator):
    await operator.start()
    await api.create(run_body('gpu', device='gpu', backoffLimit=2))
    await api.wait_for_run('gpu', phase('Pending'))
    pod = await api.get('gpu-1', resource=PODS)
    assert pod['spec']['containers'][0]['image'] == 'ghcr.io/trainguard/trainer:0.1.0-cuda'
    assert pod['spec']['containers'][0]['terminationMessagePolicy'] == 'FallbackToLogsOnError'
    line = 'ERROR GPU unavailable: no CUDA device is visible in the container'
    await set_pod_phase(api, 'gpu-1', 'Running', running={'startedAt': '2026-11-25T12:00:00Z'})
    await set_pod_phase(api, 'gpu-1', 'Failed', terminated={'exitCode': 4, 'reason': 'Error',
                                                           'message': f'INFO configuration ...\n{line}'})
    run = await api.wait_for_run('gpu', phase('Failed'))
    assert (run['status']['reason'], run['status']['message'], run['status']['attempts']) == (
        'GPUUnavailable', line, 1)
    assert await api.find('gpu-2', resource=PODS) is None   # a retry cannot help: none is made
    events = await api.wait_for(lambda: _failed_events(api, 'gpu'), what='the Failed event')
    assert events[0]['message'] == line


async def _failed_events(api, name: str) -> list[dict]:
    return [event for event in await events_of(api, name) if event['reason'] == 'Failed']


async def test_an_oom_killed_attempt_is_retried_with_half_the_batch(api, operator):
    await operator.start()
    await api.create(run_body('oomr', device='gpu', backoffLimit=1, hyperparameters={'batchSize': 32}))
    await api.wait_for_run('oomr', phase('Pending'))
    await set_pod_phase(api, 'oomr-1', 'Failed', terminated={'exitCode': 137, 'reason': 'OOMKilled'})
    run = await api.wait_for_run('oomr', lambda r: r['status'].get('attempts') == 2)
    pod = await api.get('oomr-2', resource=PODS)
    args = pod['spec']['containers'][0]['args']
    assert args[args.index('--batch-size') + 1] == '16'
    assert run['spec']['hyperparameters']['batchSize'] == 32
    assert run['status']['attemptHyperparameters']['batchSize'] == 16


async def test_pod_deleted_by_someone_else(api, operator):
    await operator.start()
    await api.create(run_body('victim', device='cpu'))
    await api.wait_for_run('victim', phase('Pending'))
    await api.delete('victim-1', resource=PODS)
    run = await api.wait_for_run('victim', phase('Failed'))
    assert run['status']['reason'] == 'PodDeleted'


async def test_malformed_heartbeat_warns_and_changes_nothing(api, operator):
    await operator.start()
    before = await start_running(api, 'noisy')
    await api.patch('noisy', {'metadata': {'annotations': {'trainguard.io/progress': '{not json'}}})
    await api.wait_for(lambda: _has_event(api, 'noisy', 'MalformedProgress'), what='a Warning event')
    after = await api.get('noisy')
    assert after['status'] == before['status']
    await beat_and_wait(api, 'noisy', step=3)


async def _has_event(api, run: str, reason: str) -> bool:
    return any(event['reason'] == reason and event['type'] == 'Warning' for event in await events_of(api, run))


async def test_invalid_spec_fails_and_others_keep_running(api, operator):
    await operator.start()
    # A spec today's CRD refuses, stored before the CRD had that rule (as etcd may hold it):
    # the emulator admits it with the CRD's schema set aside for this one write.
    schemas = dict(api.emulator.crd_schemas)
    api.emulator.crd_schemas.clear()
    try:
        await api.create(run_body('bad', hyperparameters={'resolution': 64, 'cropSize': 128}))
    finally:
        api.emulator.crd_schemas.update(schemas)
    await api.create(run_body('good', device='cpu'))
    run = await api.wait_for_run('bad', phase('Failed'))
    assert run['status']['reason'] == 'InvalidSpec'
    assert 'spec.hyperparameters.cropSize' in run['status']['message']
    await api.wait_for_run('good', phase('Pending'))


async def test_restart_mid_run_neither_duplicates_nor_misses_the_deadline(api, operator):
    await operator.start()
    await start_running(api, 'survivor')
    await beat_and_wait(api, 'survivor', step=2)
    await operator.stop()
    await operator.start()
    run = await api.wait_for_run('survivor', phase('Failed'), timeout=60 + 15)
    assert run['status']['reason'] == 'ProgressTimeout'
    pods = await api.list(PODS, NAMESPACE)
    assert [pod['metadata']['name'] for pod in pods if pod['metadata']['name'].startswith('survivor')] == []
    assert run['status']['attempts'] == 1
