"""The ClusterRole in manifests/rbac is derived from, and checked against, every call the operator makes.

The emulator authorizes every request (the operator runs as manifests/rbac's ServiceAccount,
see tests/operator/conftest.py). This test also records what the real operator sends during
a full lifecycle (create, rewrite, launch, heartbeat, stall, retry, success), checks each
call against the rules, and that the lifecycle uses the rules it expects. It also measures
the write budget of issue 3.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.crd_schema import ROOT
from tests.operator.conftest import PODS
from tests.operator.requests import operator_calls
from tests.operator.test_lifecycle import beat, phase, run_body, set_pod_phase

# Generous no-op cycles: kopf handler threads call the emulator over real sockets, and loop
# time must not jump ahead while such a request is still in flight on a loaded machine.
pytestmark = pytest.mark.looptime(noop_cycles=2000)


def allowed(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(
        (group in rule.get('apiGroups', []) or '*' in rule.get('apiGroups', []))
        and (resource in rule.get('resources', []) or '*' in rule.get('resources', []))
        and (verb in rule.get('verbs', []) or '*' in rule.get('verbs', []))
        for rule in rules
    )


def cluster_role_rules() -> list[dict]:
    return yaml.safe_load((ROOT / 'manifests' / 'rbac' / 'role.yaml').read_text())['rules']


async def test_every_operator_call_is_allowed_by_the_cluster_role(api, operator, cluster):
    await operator.start()
    await api.create(run_body('ok', hyperparameters={'batchSize': 32, 'numWorkers': 2}, progressTimeoutSeconds=900))
    await api.create(run_body('hung', device='cpu', backoffLimit=1))
    await api.create(run_body('gang', device='cpu', numNodes=2))   # its headless Service too
    await api.wait_for_run('ok', phase('Pending'))
    await api.wait_for_run('gang', phase('Pending'))
    await api.wait_for_run('hung', phase('Pending'))
    await set_pod_phase(api, 'ok-1', 'Running')
    await set_pod_phase(api, 'hung-1', 'Running')
    await beat(api, 'ok', step=3)
    # Wait for the beat to be mirrored before the garbage replaces it: otherwise, on a loaded
    # machine, 'ok' may never have a heartbeat and hit its startup timeout while 'hung' retries.
    await api.wait_for_run('ok', lambda r: (r['status'].get('progress') or {}).get('step') == 3)
    await api.patch('ok', {'metadata': {'annotations': {'trainguard.io/progress': 'garbage'}}})
    await api.wait_for_run('hung', lambda r: r['status'].get('attempts') == 2, timeout=200)
    await set_pod_phase(api, 'ok-1', 'Succeeded')
    await api.wait_for_run('ok', phase('Succeeded'))

    calls = operator_calls(list(cluster))
    rules = cluster_role_rules()
    refused = sorted({(c.group, c.resource, c.verb) for c in calls if not allowed(rules, c.group, c.resource, c.verb)})
    assert refused == []
    # The lifecycle above exercises every rule the operator needs outside peering and the webhook.
    used = {(c.group, c.resource, c.verb) for c in calls}
    for expected in [('', 'pods', 'create'), ('', 'pods', 'delete'), ('', 'pods', 'watch'),
                     ('trainguard.io', 'trainingruns/status', 'patch'), ('trainguard.io', 'trainingruns', 'patch'),
                     ('', 'serviceaccounts', 'create'), ('rbac.authorization.k8s.io', 'roles', 'create'),
                     ('rbac.authorization.k8s.io', 'rolebindings', 'create'), ('', 'events', 'create'),
                     ('', 'services', 'create')]:
        assert expected in used, expected


async def test_write_budget_to_running_and_per_heartbeat(api, operator, cluster):
    await operator.start()
    await api.wait_for(lambda: True)
    start = len(list(cluster))
    await api.create(run_body('budget', hyperparameters={'batchSize': 32, 'numWorkers': 2}))
    await api.wait_for_run('budget', phase('Pending'))
    await set_pod_phase(api, 'budget-1', 'Running')
    await api.wait_for_run('budget', phase('Running'))
    await api.wait_for(lambda: True)
    to_running = operator_calls(list(cluster)[start:])
    mark = len(list(cluster))
    for step in range(1, 6):
        await beat(api, 'budget', step=step, time=f'2026-11-25T12:00:0{step}Z')
        await api.wait_for_run('budget', lambda r, s=step: (r['status'].get('progress') or {}).get('step') == s)
    per_beat = operator_calls(list(cluster)[mark:])

    writes = [c for c in to_running if c.write and c.resource != 'events']
    events = [c for c in to_running if c.write and c.resource == 'events']
    beat_writes = [c for c in per_beat if c.write]
    print(f'\nto Running: {len(to_running)} requests, {len(writes)} writes + {len(events)} Events: '
          + json.dumps([f'{c.verb} {c.resource}' for c in writes]))
    print(f'per heartbeat: {len(per_beat) / 5:.1f} requests, {len(beat_writes) / 5:.1f} writes')
    # Budget (issue 3): without the webhook, the CPU rewrite of the spec costs one write on top
    # of the 6 (3 RBAC objects, the pod, Pending and Running status patches).
    assert len(writes) <= 7
    assert len(beat_writes) == 5
    assert await api.find('budget-1', resource=PODS) is not None


async def test_a_pod_that_starts_promptly_costs_one_status_write(api, operator, cluster, monkeypatch):
    """With the first-status grace (default 5 s; 60 here, so a slow machine cannot spend it), the
    first status waits for the pod: Running at once means 3 RBAC objects, the pod, one status."""
    monkeypatch.setenv('TRAINGUARD_FIRST_STATUS_GRACE_SECONDS', '60')
    await operator.start()
    await api.wait_for(lambda: True)
    start = len(list(cluster))
    await api.create(run_body('prompt', cpuSafety='off'))
    await api.wait_for(lambda: api.find('prompt-1', resource=PODS), what='the pod created')
    assert not (await api.get('prompt')).get('status')   # nothing written before the pod is seen
    await set_pod_phase(api, 'prompt-1', 'Running')
    run = await api.wait_for_run('prompt', phase('Running'))
    await api.wait_for(lambda: True)
    writes = [c for c in operator_calls(list(cluster)[start:]) if c.write and c.resource != 'events']
    assert sorted(f'{c.verb} {c.resource}' for c in writes) == [
        'create pods', 'create rolebindings', 'create roles', 'create serviceaccounts',
        'patch trainingruns/status']
    assert run['status']['attempts'] == 1 and run['status']['podName'] == 'prompt-1'


async def test_a_pod_that_does_not_start_gets_pending_once_the_grace_is_over(api, operator, monkeypatch):
    monkeypatch.setenv('TRAINGUARD_FIRST_STATUS_GRACE_SECONDS', '5')
    await operator.start()
    await api.create(run_body('slow', cpuSafety='off'))
    run = await api.wait_for_run('slow', phase('Pending'))   # written by the sweep, in loop time
    assert run['status']['reason'] == 'PodCreated' and run['status']['message'] == 'created trainer pod slow-1'
