"""The emulator deletes pods as kube-apiserver does: at once when no kubelet runs them, else
gracefully; binding and the Eviction API (DisruptionTarget) as 1.28+ serve them."""

from __future__ import annotations

import pytest

from tests.operator.conftest import NAMESPACE, PODS

POD = {'apiVersion': 'v1', 'kind': 'Pod', 'metadata': {'name': 'p'},
       'spec': {'terminationGracePeriodSeconds': 45, 'containers': [{'name': 'c', 'image': 'busybox'}]}}
BASE = f'/api/v1/namespaces/{NAMESPACE}/pods/p'


async def post(api, path: str, body: dict) -> int:
    async with api.emulator.post(path, json=body) as response:
        return response.status


async def bind(api) -> None:
    assert await post(api, f'{BASE}/binding', {'apiVersion': 'v1', 'kind': 'Binding', 'metadata': {'name': 'p'},
                                               'target': {'kind': 'Node', 'name': 'n1'}}) == 201


async def delete(api, **params: str) -> int:
    async with api.emulator.delete(BASE, params=params) as response:
        return response.status


async def test_a_pod_no_kubelet_runs_is_deleted_at_once(api):
    await api.create(POD, resource=PODS)
    assert await delete(api) == 200
    assert await api.find('p', resource=PODS) is None


@pytest.mark.parametrize(('params', 'grace'), [({}, 45), ({'gracePeriodSeconds': '5'}, 5)], ids=['own', 'asked'])
async def test_a_bound_pod_gets_its_grace_period_and_the_kubelet_finishes_it(api, params, grace):
    await api.create(POD, resource=PODS)
    await bind(api)
    assert (await api.get('p', resource=PODS))['spec']['nodeName'] == 'n1'
    assert await delete(api, **params) == 200
    terminating = await api.get('p', resource=PODS)
    metadata = terminating['metadata']
    assert metadata['deletionTimestamp'] and metadata['deletionGracePeriodSeconds'] == grace
    assert await delete(api, gracePeriodSeconds='0') == 200   # the kubelet, once the processes are gone
    assert await api.find('p', resource=PODS) is None


async def test_a_finished_bound_pod_is_deleted_at_once(api):
    await api.create(POD, resource=PODS)
    await bind(api)
    await api.patch('p', {'status': {'phase': 'Failed'}}, resource=PODS, subresource='status')
    assert await delete(api) == 200
    assert await api.find('p', resource=PODS) is None


async def test_an_eviction_marks_the_pod_and_deletes_it_gracefully(api):
    await api.create(POD, resource=PODS)
    await bind(api)
    assert await post(api, f'{BASE}/eviction', {'apiVersion': 'policy/v1', 'kind': 'Eviction',
                                                'metadata': {'name': 'p'}}) == 201
    evicted = await api.get('p', resource=PODS)
    condition = next(c for c in evicted['status']['conditions'] if c['type'] == 'DisruptionTarget')
    assert (condition['status'], condition['reason']) == ('True', 'EvictionByEvictionAPI')
    assert evicted['metadata']['deletionGracePeriodSeconds'] == 45
    missing = f'/api/v1/namespaces/{NAMESPACE}/pods/missing/eviction'
    assert await post(api, missing, {'metadata': {'name': 'missing'}}) == 404


GATE = 'kueue.x-k8s.io/admission'


async def test_scheduling_gates_hold_a_pod_and_can_only_be_removed(api):
    gated = {**POD, 'spec': {**POD['spec'], 'schedulingGates': [{'name': GATE}]}}
    created = await api.create(gated, resource=PODS)
    condition = next(c for c in created['status']['conditions'] if c['type'] == 'PodScheduled')
    assert (condition['status'], condition['reason']) == ('False', 'SchedulingGated')
    assert await post(api, f'{BASE}/binding', {'apiVersion': 'v1', 'kind': 'Binding', 'metadata': {'name': 'p'},
                                               'target': {'kind': 'Node', 'name': 'n1'}}) == 409
    async with api.emulator.patch(BASE, json={'spec': {'schedulingGates': [{'name': GATE}, {'name': 'other/gate'}]}},
                                  headers={'Content-Type': 'application/merge-patch+json'}) as response:
        assert response.status == 422 and 'only deletion is allowed' in (await response.json())['message']
    released = await api.patch('p', {'spec': {'schedulingGates': None}}, resource=PODS)
    assert not released['spec'].get('schedulingGates')
    assert not [c for c in released.get('status', {}).get('conditions') or [] if c.get('reason') == 'SchedulingGated']
    await bind(api)   # now a scheduler may place it


async def test_a_pod_webhook_stand_in_adds_its_gate_at_creation(api, cluster):
    cluster.pod_create_hooks.append(
        lambda pod: pod['spec'].setdefault('schedulingGates', []).append({'name': GATE}))
    created = await api.create(POD, resource=PODS)
    assert created['spec']['schedulingGates'] == [{'name': GATE}]
