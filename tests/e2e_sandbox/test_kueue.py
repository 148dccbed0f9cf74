"""A queued gang end to end on the sandbox (real trainers, real time), with a Kueue stand-in:
held past its startup timeout, admitted, preempted mid-training, re-queued whole, finished."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e_sandbox.test_disruptions import LONG, wait_for_log
from tests.e2e_sandbox.test_sandbox import run, wait_for
from tests.kueue_stand_in import admission_patch, gate_queued_pods, preemption_status
from trainguard_sandbox.app import Sandbox

pytestmark = pytest.mark.timeout(300)
PODS = '/api/v1/namespaces/default/pods'


async def patch(sandbox: Sandbox, pod: str, body: dict, subresource: str = '') -> None:
    assert sandbox.emulator is not None
    async with sandbox.emulator.patch(f'{PODS}/{pod}{subresource}', json=body,
                                      headers={'Content-Type': 'application/merge-patch+json'}) as response:
        assert response.status == 200, await response.text()


async def test_a_queued_gang_waits_is_admitted_preempted_and_finishes(sandbox):
    assert sandbox.emulator is not None
    sandbox.emulator.pod_create_hooks.append(gate_queued_pods)
    spec = {**LONG, 'hyperparameters': {**LONG['hyperparameters'], 'epochs': 6}}
    await sandbox.apply(run('queued', numNodes=2, queueName='team-a', output={'claimName': 'queued-output'},
                            **{**spec, 'startupTimeoutSeconds': 20}))
    await wait_for(sandbox, 'queued', ('Queued',), timeout=60)
    # Held past its startupTimeoutSeconds (20 s, also the trainers' time to start once admitted)
    # and a few sweeps: still Queued, nothing started.
    held_until = time.monotonic() + 24
    while time.monotonic() < held_until:
        status = (await sandbox.run('queued'))['status']
        assert (status['phase'], status['attempts']) == ('Queued', 1), status
        await asyncio.sleep(0.5)
    assert sandbox.runner is not None and not sandbox.runner.instances_of('default', 'queued-1-0')

    for rank in (0, 1):   # admitted: Kueue lifts the gate from the whole group
        await patch(sandbox, f'queued-1-{rank}', admission_patch())
    await wait_for_log(sandbox, 'queued-1-0', r'epoch 1/6 done')
    for rank in (0, 1):   # preempted: TerminationTarget on every member, then deleted
        await patch(sandbox, f'queued-1-{rank}', preemption_status(), '/status')
    for rank in (0, 1):
        async with sandbox.emulator.delete(f'{PODS}/queued-1-{rank}') as response:
            assert response.status in (200, 404)
    requeued = await wait_for(sandbox, 'queued', ('Queued',), timeout=120)
    assert requeued['status']['attempts'] == 2 and requeued['status']['disruptions'] == 1
    for rank in (0, 1):
        await patch(sandbox, f'queued-2-{rank}', admission_patch())
    done = await wait_for(sandbox, 'queued', ('Succeeded', 'Failed'), timeout=240)
    assert done['status']['phase'] == 'Succeeded', (done['status'].get('reason'), done['status'].get('message'))
    assert not done['status'].get('failedAttempts')
    second = (sandbox.workdir / 'pods' / 'default' / 'queued-2-0.log').read_text()
    assert 'resuming from' in second
