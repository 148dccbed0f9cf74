"""A shared cluster's doings, end to end on the sandbox (real operator, real trainers, real time):
an eviction mid-epoch, a suspend and resume, an active deadline."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from tests.e2e_sandbox.test_sandbox import pods_of, run, wait_for, wait_for_event
from trainguard_sandbox.app import Sandbox
from trainguard_sandbox.pods import pod_processes_gone

pytestmark = pytest.mark.timeout(300)
# Long enough to be caught mid-epoch: 48 training samples / batch 4 = 12 steps an epoch.
LONG = {'hyperparameters': {'batchSize': 4, 'numWorkers': 0, 'epochs': 30, 'resolution': 64, 'cropSize': 64},
        'model': {'channels': [16, 32, 64], 'strides': [2, 2], 'numResUnits': 1},
        'dataset': {'source': 'synthetic', 'numSamples': 60}, 'progressTimeoutSeconds': 30}


async def wait_for_log(sandbox: Sandbox, pod: str, pattern: str, timeout: float = 120) -> re.Match[str]:
    path = sandbox.workdir / 'pods' / 'default' / f'{pod}.log'
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, path.read_text()) if path.exists() else None
        if found:
            return found
        assert time.monotonic() < deadline, f'{pattern!r} not in {pod}.log within {timeout}s'
        await asyncio.sleep(0.1)


async def test_an_eviction_mid_epoch_is_not_a_failure_and_loses_no_step(sandbox):
    await sandbox.apply(run('drained', backoffLimit=0, output={'claimName': 'drained-output'}, **LONG))
    await wait_for_log(sandbox, 'drained-1', r'epoch 2/30 step \d+/12')
    await sandbox.evict('drained-1')   # kubectl drain
    stopped = await wait_for_log(sandbox, 'drained-1',
                                 r'stopped on SIGTERM after a checkpoint at epoch (\d+) step (\d+)', timeout=60)
    epoch, step = int(stopped[1]), int(stopped[2])
    event = await wait_for_event(sandbox, 'drained', 'Disrupted')
    assert 'EvictionByEvictionAPI' in event['message'] and 'not a failure' in event['message']
    done = await wait_for(sandbox, 'drained', ('Succeeded', 'Failed'), timeout=240)
    status = done['status']
    assert status['phase'] == 'Succeeded', status       # backoffLimit 0, and still no failure
    assert status['attempts'] == 2 and status['disruptions'] == 1 and not status.get('failedAttempts')
    assert status['disruptionHistory'][0]['reason'] == 'EvictionByEvictionAPI'
    assert pods_of(sandbox, 'drained') == ['drained-1', 'drained-2']
    second = (sandbox.workdir / 'pods' / 'default' / 'drained-2.log').read_text()
    # The new attempt starts right after the last finished step: nothing finished is done again.
    # (Stopped at an epoch's last step, the checkpoint is that step or, if the stop came after
    # the epoch's end, the whole epoch: both resume at the next step.)
    resumed = [f'epoch {epoch} of 30, step {step} done'] + ([f'epoch {epoch} of 30 done'] if step == 12 else [])
    assert any(text in second for text in resumed), second[:3000]
    print(f'evicted at epoch {epoch} step {step}; attempt 2 resumed there')


async def test_a_suspended_run_holds_no_pod_is_never_hung_and_resumes(sandbox):
    await sandbox.apply(run('paused', output={'claimName': 'paused-output'}, **{**LONG, 'progressTimeoutSeconds': 6}))
    await wait_for_log(sandbox, 'paused-1', r'epoch 2/30 step \d+/12')
    await sandbox.patch('paused', {'spec': {'suspend': True}})
    suspended = await wait_for(sandbox, 'paused', ('Suspended',), timeout=60)
    assert {c['type']: c['status'] for c in suspended['status']['conditions']}['Suspended'] == 'True'
    assert sandbox.runner is not None
    first = sandbox.runner.instances_of('default', 'paused-1')
    await sandbox.runner.wait_stopped(first, timeout=60)
    assert all(pod_processes_gone(instance) for instance in first)
    await wait_for_log(sandbox, 'paused-1', r'stopped on SIGTERM after a checkpoint')
    # Suspended for longer than progressTimeoutSeconds (6 s) and a few sweeps: never declared hung.
    quiet_until = time.monotonic() + 10
    while time.monotonic() < quiet_until:
        assert (await sandbox.run('paused'))['status']['phase'] == 'Suspended'
        assert await sandbox.get('/api/v1/namespaces/default/pods/paused-1') is None
        await asyncio.sleep(0.5)
    await sandbox.patch('paused', {'spec': {'suspend': False}})
    await wait_for_log(sandbox, 'paused-2', r'resuming from')
    done = await wait_for(sandbox, 'paused', ('Succeeded', 'Failed'), timeout=240)
    assert done['status']['phase'] == 'Succeeded', done['status']
    assert done['status']['attempts'] == 2 and not done['status'].get('failedAttempts')
    assert done['status']['activeSeconds'] > 0 and done['status'].get('activeSince') is None


async def test_a_run_past_its_active_deadline_fails_and_leaves_no_pod(sandbox):
    endless = {**LONG, 'hyperparameters': {**LONG['hyperparameters'], 'epochs': 1000}}
    await sandbox.apply(run('late', activeDeadlineSeconds=12, **endless))
    done = await wait_for(sandbox, 'late', ('Succeeded', 'Failed'), timeout=120)
    assert (done['status']['phase'], done['status']['reason']) == ('Failed', 'DeadlineExceeded'), done['status']
    assert sandbox.runner is not None
    await sandbox.runner.wait_stopped(sandbox.runner.instances_of('default', 'late-1'), timeout=90)
    deadline = time.monotonic() + 30
    while await sandbox.get('/api/v1/namespaces/default/pods/late-1') is not None:
        assert time.monotonic() < deadline, 'the pod of a run past its deadline is still there'
        await asyncio.sleep(0.25)
