"""Queues: a run's pods held by Kueue's scheduling gate show Queued, with no clock running; a gang
is admitted, preempted and recreated as one pod group. Kueue is stood in for (tests/kueue_stand_in.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.kueue_stand_in import PRIORITY_LABEL, admission_patch, gate_queued_pods, lower_priority, preemption_status
from tests.operator.conftest import PODS
from tests.operator.test_lifecycle import phase, set_pod_phase

pytestmark = pytest.mark.looptime(noop_cycles=2000)


def gang(name: str, **spec) -> dict:
    return {'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': name},
            'spec': {'device': 'cpu', 'numNodes': 2, 'queueName': 'team-a', 'startupTimeoutSeconds': 30,
                     'progressTimeoutSeconds': 60, 'activeDeadlineSeconds': 90, **spec}}


async def pods_of(api, name: str) -> list[dict]:
    return sorted((pod for pod in await api.list(PODS) if pod['metadata']['name'].startswith(f'{name}-')),
                  key=lambda pod: pod['metadata']['name'])


async def admit(api, name: str) -> None:
    for pod in await pods_of(api, name):
        await api.patch(pod['metadata']['name'], admission_patch(), resource=PODS)


async def test_a_queued_gang_waits_past_every_clock_then_runs_and_is_preempted_whole(api, operator, cluster):
    cluster.pod_create_hooks.append(gate_queued_pods)
    await operator.start()
    await api.create(gang('queued'))
    queued = await api.wait_for_run('queued', phase('Queued'))
    assert 'queue team-a' in queued['status']['message'] and 'kueue.x-k8s.io/admission' in queued['status']['message']
    members = await pods_of(api, 'queued')
    assert [pod['metadata']['labels']['kueue.x-k8s.io/pod-group-name'] for pod in members] == ['queued-1'] * 2
    assert {pod['metadata']['annotations']['kueue.x-k8s.io/pod-group-total-count'] for pod in members} == {'2'}
    await asyncio.sleep(600)   # loop time: past startupTimeoutSeconds (30) and activeDeadlineSeconds (90)
    held = await api.get('queued')
    assert held['status']['phase'] == 'Queued' and held['status']['attempts'] == 1

    await admit(api, 'queued')
    await api.wait_for_run('queued', phase('Pending'))
    for rank in (0, 1):
        await set_pod_phase(api, f'queued-1-{rank}', 'Running')
    await api.wait_for_run('queued', phase('Running'))

    # Preempted: TerminationTarget on every pod of the group, then deleted.
    for pod in await pods_of(api, 'queued'):
        await api.patch(pod['metadata']['name'], preemption_status(), resource=PODS, subresource='status')
    for pod in await pods_of(api, 'queued'):   # (the operator may stop rank 1 itself once rank 0 goes)
        async with api.emulator.delete(f'/api/v1/namespaces/default/pods/{pod["metadata"]["name"]}') as response:
            assert response.status in (200, 404)
    again = await api.wait_for_run('queued', lambda r: r['status'].get('attempts') == 2 and
                                   r['status'].get('phase') == 'Queued')
    assert again['status']['disruptions'] == 1 and again['status']['disruptionHistory'][0]['reason'] == 'Preempted'
    assert not again['status'].get('failedAttempts')
    recreated = await pods_of(api, 'queued')
    assert [pod['metadata']['name'] for pod in recreated] == ['queued-2-0', 'queued-2-1']
    assert all(pod['spec'].get('schedulingGates') for pod in recreated)   # gated again, as one new group
    assert {pod['metadata']['labels']['kueue.x-k8s.io/pod-group-name'] for pod in recreated} == {'queued-2'}


async def test_the_runs_own_queue_label_queues_its_pod(api, operator, cluster):
    cluster.pod_create_hooks.append(gate_queued_pods)
    await operator.start()
    await api.create({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun',
                      'metadata': {'name': 'labelled', 'labels': {'kueue.x-k8s.io/queue-name': 'team-b'}},
                      'spec': {'device': 'cpu'}})
    run = await api.wait_for_run('labelled', phase('Queued'))
    assert 'queue team-b' in run['status']['message']
    (pod,) = await pods_of(api, 'labelled')
    assert pod['metadata']['labels']['kueue.x-k8s.io/queue-name'] == 'team-b'


async def test_runs_without_a_queue_are_untouched(api, operator, cluster):
    cluster.pod_create_hooks.append(gate_queued_pods)
    await operator.start()
    await api.create({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'plain'},
                      'spec': {'device': 'cpu'}})
    await api.wait_for_run('plain', phase('Pending'))
    (pod,) = await pods_of(api, 'plain')
    assert 'kueue.x-k8s.io/queue-name' not in pod['metadata']['labels'] and not pod['spec'].get('schedulingGates')


async def test_a_high_priority_run_preempts_a_low_one_and_both_succeed(api, operator, cluster):
    """Priority end to end, Kueue's part stood in: the runs' priority labels reach their pods, the
    stand-in preempts by them (a quota of one gang), the low run goes back to Queued with a
    disruption on record (not a failure), and both end Succeeded, low after re-admission."""
    priorities = {'low': 100, 'high': 1000}
    cluster.pod_create_hooks.append(gate_queued_pods)
    await operator.start()
    low = gang('low')
    low['metadata']['labels'] = {PRIORITY_LABEL: 'low'}
    low['spec'].pop('activeDeadlineSeconds')
    await api.create(low)
    await api.wait_for_run('low', phase('Queued'))
    await admit(api, 'low')
    for rank in (0, 1):
        await set_pod_phase(api, f'low-1-{rank}', 'Running')
    await api.wait_for_run('low', phase('Running'))

    high = gang('high', template={'metadata': {'labels': {PRIORITY_LABEL: 'high'}}})
    high['spec'].pop('activeDeadlineSeconds')
    await api.create(high)
    await api.wait_for_run('high', phase('Queued'))
    pending = await pods_of(api, 'high')
    assert {pod['metadata']['labels'][PRIORITY_LABEL] for pod in pending} == {'high'}
    victims = lower_priority(await pods_of(api, 'low'), priorities, priorities['high'])
    assert [pod['metadata']['name'] for pod in victims] == ['low-1-0', 'low-1-1']
    assert {pod['metadata']['labels'][PRIORITY_LABEL] for pod in victims} == {'low'}
    for pod in victims:   # Kueue preempts the lower-priority group whole, then admits the higher
        await api.patch(pod['metadata']['name'], preemption_status(), resource=PODS, subresource='status')
    for pod in victims:
        async with api.emulator.delete(f'/api/v1/namespaces/default/pods/{pod["metadata"]["name"]}') as response:
            assert response.status in (200, 404)
    requeued = await api.wait_for_run('low', lambda r: r['status'].get('attempts') == 2 and
                                      r['status'].get('phase') == 'Queued')
    assert requeued['status']['disruptions'] == 1 and not requeued['status'].get('failedAttempts')
    assert {pod['metadata']['labels'][PRIORITY_LABEL] for pod in await pods_of(api, 'low')} == {'low'}

    await admit(api, 'high')
    for rank in (0, 1):
        await set_pod_phase(api, f'high-1-{rank}', 'Running')
    await api.wait_for_run('high', phase('Running'))
    for rank in (0, 1):
        await set_pod_phase(api, f'high-1-{rank}', 'Succeeded', terminated={'exitCode': 0, 'reason': 'Completed'})
    await api.wait_for_run('high', phase('Succeeded'))

    await admit(api, 'low')   # quota free again: re-admitted
    for rank in (0, 1):
        await set_pod_phase(api, f'low-2-{rank}', 'Running')
    await api.wait_for_run('low', phase('Running'))
    for rank in (0, 1):
        await set_pod_phase(api, f'low-2-{rank}', 'Succeeded', terminated={'exitCode': 0, 'reason': 'Completed'})
    done = await api.wait_for_run('low', phase('Succeeded'))
    assert done['status']['disruptions'] == 1 and done['status']['attempts'] == 2
