"""End to end on the sandbox: the real operator, real trainer processes, the emulated API. Real time."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from trainguard_sandbox.app import Sandbox
from trainguard_sandbox.pods import pod_processes_gone

pytestmark = pytest.mark.timeout(240)

TINY = {'device': 'cpu', 'cpuSafety': 'off',
        'hyperparameters': {'batchSize': 4, 'numWorkers': 0, 'epochs': 2, 'resolution': 32, 'cropSize': 32},
        'model': {'channels': [8, 16], 'strides': [2], 'numResUnits': 0},
        'dataset': {'source': 'synthetic', 'numSamples': 15},
        'progressTimeoutSeconds': 5, 'startupTimeoutSeconds': 90}


def run(name: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun',
            'metadata': {'name': name, 'annotations': annotations or {}}, 'spec': {**TINY, **spec}}


async def wait_for(sandbox: Sandbox, name: str, phases: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = await sandbox.run(name)
        if current and (current.get('status') or {}).get('phase') in phases:
            return current
        await asyncio.sleep(0.25)
    raise AssertionError(f'{name} never reached {phases}: {(await sandbox.run(name) or {}).get("status")}')


async def wait_for_event(sandbox: Sandbox, name: str, reason: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [event for event in await sandbox.events(name) if event['reason'] == reason]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f'no {reason} Event on {name} within {timeout}s'
        await asyncio.sleep(0.1)


def pods_of(sandbox: Sandbox, name: str) -> list[str]:
    assert sandbox.runner is not None
    return sorted(pod.name for pod in sandbox.runner.instances if pod.name.rsplit('-', 1)[0] == name)


async def test_healthy_run_succeeds_with_heartbeats_mirrored(sandbox):
    await sandbox.apply(run('healthy'))
    done = await wait_for(sandbox, 'healthy', ('Succeeded', 'Failed'))
    status = done['status']
    assert status['phase'] == 'Succeeded', status
    assert status['progress']['percent'] == 100 and status['epoch'] == '2/2'
    assert status['progress']['lastProgressTime'] and isinstance(status['progress']['loss'], float)
    assert pods_of(sandbox, 'healthy') == ['healthy-1']


async def test_hung_run_fails_within_its_timeout_and_the_process_is_killed(sandbox):
    await sandbox.apply(run('hung', annotations={'trainguard.io/simulate-hang-after-steps': '2'}))
    await wait_for(sandbox, 'hung', ('Running',))
    last_beat, deadline = None, time.monotonic() + 60
    while last_beat is None:   # wait until the operator has mirrored a heartbeat
        current = await sandbox.run('hung')
        last_beat = ((current or {}).get('status') or {}).get('progress', {}).get('lastProgressTime')
        assert time.monotonic() < deadline, f'no heartbeat mirrored: {(current or {}).get("status")}'
        await asyncio.sleep(0.1)
    seen_at = time.monotonic()
    failed = await wait_for(sandbox, 'hung', ('Failed', 'Succeeded'), timeout=60)
    assert failed['status']['phase'] == 'Failed' and failed['status']['reason'] == 'ProgressTimeout'
    # The trainer's watchdog said where it hung before the pod was deleted.
    assert failed['status']['message'].endswith('hung in trainer-image/trainguard_trainer/train.py:_hang_forever')
    assert failed['status']['stallReport']['class'] == 'Unknown'
    event = await wait_for_event(sandbox, 'hung', 'ProgressTimeout')  # posted just after the status
    assert 'hung in trainer-image/trainguard_trainer/train.py:_hang_forever' in event['message']
    assert time.monotonic() - seen_at <= 5 + 10
    # The runner sees the pod's deletion at its next poll: wait for that, not for a fixed time.
    [instance] = sandbox.runner.instances_of('default', 'hung-1')
    await sandbox.runner.wait_stopped([instance], timeout=10)
    assert instance.killed and pod_processes_gone(instance)


async def test_operator_restart_mid_run_completes_with_one_pod(sandbox):
    await sandbox.apply(run('steady', hyperparameters={**TINY['hyperparameters'], 'epochs': 4}))
    await wait_for(sandbox, 'steady', ('Running',))
    await sandbox.operator.stop()
    await asyncio.sleep(2)
    await sandbox.operator.start()
    done = await wait_for(sandbox, 'steady', ('Succeeded', 'Failed'))
    assert done['status']['phase'] == 'Succeeded', done['status']
    assert done['status']['attempts'] == 1 and pods_of(sandbox, 'steady') == ['steady-1']


async def test_retry_resumes_from_the_first_attempts_checkpoint(sandbox):
    # 12 training samples / batch 4 = 3 steps per epoch: attempt 1 finishes epoch 1 (checkpoint)
    # and hangs in epoch 2; attempt 2 resumes at epoch 2 and has too few steps left to hang.
    await sandbox.apply(run('resumer', annotations={'trainguard.io/simulate-hang-after-steps': '4'},
                            backoffLimit=1, output={'claimName': 'resumer-output'}))
    done = await wait_for(sandbox, 'resumer', ('Succeeded', 'Failed'), timeout=150)
    assert done['status']['phase'] == 'Succeeded', done['status']
    assert done['status']['attempts'] == 2 and pods_of(sandbox, 'resumer') == ['resumer-1', 'resumer-2']
    second_log = (sandbox.workdir / 'pods' / 'default' / 'resumer-2.log').read_text()
    assert 'resuming from' in second_log and 'epoch 1 of 2 done' in second_log
    assert 'epoch 1/2 step' not in second_log


async def test_a_gpu_run_on_a_cpu_only_torch_fails_gpu_unavailable_within_seconds(sandbox):
    """The sandbox's torch is a CPU-only build: the GPU run must stop, not train on the CPU."""
    await sandbox.apply(run('gpu', device='gpu', cpuSafety='enforce', backoffLimit=2,
                            hyperparameters={**TINY['hyperparameters'], 'batchSize': 32, 'numWorkers': 2}))
    started = time.monotonic()
    done = await wait_for(sandbox, 'gpu', ('Succeeded', 'Failed'), timeout=60)
    print(f'GPUUnavailable after {time.monotonic() - started:.1f}s')
    assert done['status']['reason'] == 'GPUUnavailable', done['status']
    assert 'GPU unavailable: this torch build is CPU-only' in done['status']['message']
    assert done['status']['attempts'] == 1 and pods_of(sandbox, 'gpu') == ['gpu-1']


async def test_a_retry_learns_from_a_hang_with_workers_and_succeeds(sandbox):
    """Attempt 1 hangs while it has DataLoader workers; attempt 2 runs with none and finishes."""
    await sandbox.apply(run('learner', annotations={'trainguard.io/simulate-hang-with-workers-after-steps': '2'},
                            backoffLimit=1, hyperparameters={**TINY['hyperparameters'], 'numWorkers': 1}))
    done = await wait_for(sandbox, 'learner', ('Succeeded', 'Failed'), timeout=150)
    status = done['status']
    assert status['phase'] == 'Succeeded' and status['attempts'] == 2, status
    assert done['spec']['hyperparameters']['numWorkers'] == 1           # the spec is untouched
    assert status['attemptHyperparameters']['numWorkers'] == 0
    assert {'field': 'numWorkers', 'from': 1, 'to': 0, 'attempt': 2}.items() <= status['adjustments'][-1].items()
    await wait_for_event(sandbox, 'learner', 'ProgressTimeout')
    adjusted = await wait_for_event(sandbox, 'learner', 'RetryAdjusted')
    assert 'Forcing num_workers=0 for attempt 2' in adjusted['message']
    second_log = (sandbox.workdir / 'pods' / 'default' / 'learner-2.log').read_text()
    assert '"num_workers": 0' in second_log and 'simulating a hang' not in second_log
