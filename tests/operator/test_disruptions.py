"""Disruptions, suspend and deadlines through the real operator and the emulator's pod API.

No kubelet here: pods are not bound to a node, so kube-apiserver (and the emulator) deletes
them at once, even an eviction; what the operator sees is the pod's last state, with the
DisruptionTarget condition the eviction set. The graceful path (SIGTERM, grace period) runs in
tests/e2e_sandbox/test_disruptions.py, where the sandbox's pod runner binds and stops pods.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.operator.conftest import PODS
from tests.operator.test_lifecycle import events_of, phase, set_pod_phase, start_running

pytestmark = pytest.mark.looptime(noop_cycles=2000)


async def evict(api, pod: str) -> None:
    async with api.emulator.post(f'/api/v1/namespaces/default/pods/{pod}/eviction', json={
            'apiVersion': 'policy/v1', 'kind': 'Eviction', 'metadata': {'name': pod}}) as response:
        assert response.status == 201, await response.text()


async def pod_names(api) -> list[str]:
    return sorted(pod['metadata']['name'] for pod in await api.list(PODS))


async def test_an_evicted_pod_is_retried_without_using_the_backoff_budget(api, operator, operator_memo):
    await operator.start()
    await start_running(api, 'drained', backoffLimit=0)
    await evict(api, 'drained-1')
    run = await api.wait_for_run('drained', lambda r: r['status'].get('attempts') == 2)
    status = run['status']
    assert (status['phase'], status['reason']) == ('Pending', 'Disrupted')
    assert status['disruptions'] == 1 and not status.get('failedAttempts')
    assert status['disruptionHistory'][0]['reason'] == 'EvictionByEvictionAPI'
    assert await pod_names(api) == ['drained-2']
    assert 'Disrupted' in [event['reason'] for event in await events_of(api, 'drained')]
    metrics = operator_memo.runtime.metrics
    assert metrics.disruptions.labels('default', 'EvictionByEvictionAPI')._value.get() == 1
    # A real failure afterwards still ends it: the budget (backoffLimit 0) was never touched.
    await set_pod_phase(api, 'drained-2', 'Failed', terminated={'exitCode': 1, 'reason': 'Error'})
    failed = await api.wait_for_run('drained', phase('Failed'))
    assert failed['status']['reason'] == 'PodFailed' and failed['status']['failedAttempts'] == 1


async def test_a_gang_member_evicted_stops_the_rest_and_the_gang_comes_back_whole(api, operator):
    await operator.start()
    await api.create({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'pair'},
                      'spec': {'device': 'cpu', 'numNodes': 2, 'progressTimeoutSeconds': 60}})
    await api.wait_for_run('pair', phase('Pending'))
    for rank in (0, 1):
        await set_pod_phase(api, f'pair-1-{rank}', 'Running')
    await api.wait_for_run('pair', phase('Running'))
    await evict(api, 'pair-1-1')
    run = await api.wait_for_run('pair', lambda r: r['status'].get('attempts') == 2)
    assert run['status']['disruptions'] == 1
    assert await pod_names(api) == ['pair-2-0', 'pair-2-1']   # rank 0 was stopped, both came back


async def test_too_many_disruptions_fail_the_run(api, operator):
    await operator.start()
    await start_running(api, 'unlucky', maxDisruptions=1)
    await evict(api, 'unlucky-1')
    await api.wait_for_run('unlucky', lambda r: r['status'].get('attempts') == 2)
    await set_pod_phase(api, 'unlucky-2', 'Running')
    await evict(api, 'unlucky-2')
    run = await api.wait_for_run('unlucky', phase('Failed'))
    assert run['status']['reason'] == 'TooManyDisruptions' and run['status']['disruptions'] == 2


async def test_suspend_stops_the_pod_and_no_timer_runs_until_resumed(api, operator):
    await operator.start()
    await start_running(api, 'paused', progressTimeoutSeconds=30, startupTimeoutSeconds=30)
    await api.patch('paused', {'spec': {'suspend': True}})
    await api.wait_for_run('paused', phase('Suspended'))
    assert await pod_names(api) == []
    await asyncio.sleep(300)   # loop time: ten progress timeouts, and every sweep in them
    run = await api.get('paused')
    assert run['status']['phase'] == 'Suspended' and run['status']['attempts'] == 1
    await api.patch('paused', {'spec': {'suspend': False}})
    resumed = await api.wait_for_run('paused', lambda r: r['status'].get('attempts') == 2)
    assert resumed['status']['reason'] == 'Resumed' and not resumed['status'].get('failedAttempts')
    assert await pod_names(api) == ['paused-2']


async def test_a_pod_that_never_starts_fails_at_the_active_deadline(api, operator):
    await operator.start()
    await api.create({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'stuck'},
                      'spec': {'device': 'cpu', 'activeDeadlineSeconds': 120, 'startupTimeoutSeconds': 600}})
    await api.wait_for_run('stuck', phase('Pending'))
    run = await api.wait_for_run('stuck', phase('Failed'), timeout=300)
    assert run['status']['reason'] == 'DeadlineExceeded'
    assert await pod_names(api) == []
