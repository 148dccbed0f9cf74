"""What a trainer's token may do, on both identities (trainguard.domain.identity).

The emulator enforces RBAC and evaluates the ValidatingAdmissionPolicy of
manifests/rbac/trainer_policy.yaml with a real CEL implementation, and mints pod-bound tokens
as the kubelet's projected token is (authentication.kubernetes.io/pod-name). Either way a
trainer's token can write the heartbeat of its own run and nothing else: not another run,
not its own run's spec or other annotations, not its status; it cannot read pods or secrets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.operator.conftest import NAMESPACE, PODS, Api
from tests.operator.identities import manifests_rbac
from tests.operator.requests import operator_calls
from tests.operator.test_emulator_rbac import as_user
from tests.operator.test_lifecycle import phase, run_body
from trainguard_sandbox.cluster import trainer_policy

pytestmark = pytest.mark.looptime(noop_cycles=2000)
RUNS_URL = f'/apis/trainguard.io/v1alpha1/namespaces/{NAMESPACE}/trainingruns'
MERGE = {'Content-Type': 'application/merge-patch+json'}
BEAT = {'metadata': {'annotations': {'trainguard.io/progress': json.dumps(
    {'epoch': 1, 'epochs': 2, 'step': 1, 'steps': 16, 'loss': 0.5, 'samplesPerSecond': 3.0,
     'time': '2026-11-25T12:00:00Z'})}}}


async def pod_token(api: Api, pod_name: str) -> str:
    """The token the kubelet mounts into this pod: its ServiceAccount's, bound to the pod."""
    pod = await api.get(pod_name, resource=PODS)
    account = pod['spec']['serviceAccountName']
    status, answer = await as_user(api, None, 'post', f'/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{account}/token',
                                   json={'apiVersion': 'authentication.k8s.io/v1', 'kind': 'TokenRequest', 'spec': {
                                       'boundObjectRef': {'kind': 'Pod', 'apiVersion': 'v1', 'name': pod_name,
                                                          'uid': pod['metadata']['uid']}}})
    assert status == 201, answer
    return answer['status']['token']


async def patch_run(api: Api, token: str, name: str, body: dict[str, Any], subresource: str = '') -> tuple[int, Any]:
    url = f'{RUNS_URL}/{name}' + (f'/{subresource}' if subresource else '')
    return await as_user(api, token, 'patch', url, json=body, headers=MERGE)


async def two_runs(api: Api, operator) -> None:
    await operator.start()
    for name in ('a', 'b'):
        await api.create(run_body(name, device='cpu'))
    for name in ('a', 'b'):
        await api.wait_for_run(name, phase('Pending'))


OTHER_RUN = [('b', BEAT, ''), ('a', {'status': {'phase': 'Succeeded'}}, 'status')]   # another run; its own status
# What RBAC alone cannot refuse a token allowed to patch its run, and the policy does.
OWN_RUN_BEYOND_THE_HEARTBEAT = [
    ('a', {'spec': {'hyperparameters': {'epochs': 99}}}, ''),                  # its own spec
    ('a', {'metadata': {'annotations': {'trainguard.io/original': 'x'}}}, ''),   # another annotation
    ('a', {'metadata': {'labels': {'team': 'x'}}}, ''),                          # a label
]


async def assert_only_its_own_heartbeat(api: Api, token: str, refused: list[tuple[str, dict[str, Any], str]]) -> None:
    status, answer = await patch_run(api, token, 'a', BEAT)
    assert status == 200, answer
    for name, body, subresource in refused:
        status, answer = await patch_run(api, token, name, body, subresource)
        assert status == 403, (name, body, answer)
    for url in (f'/api/v1/namespaces/{NAMESPACE}/pods', f'/api/v1/namespaces/{NAMESPACE}/secrets',
                f'/api/v1/namespaces/{NAMESPACE}/pods/a-1'):
        status, _ = await as_user(api, token, 'get', url)
        assert status == 403, url


class TestNamespaceIdentity:
    """Kubernetes 1.30+ with the policy installed (manifests/default, the chart): the default."""

    @pytest.fixture()
    def operator_rbac(self) -> list[dict[str, Any]]:
        return manifests_rbac() + trainer_policy()

    async def test_a_trainer_writes_only_its_own_runs_heartbeat(self, api, operator):
        await two_runs(api, operator)
        pod = await api.get('a-1', resource=PODS)
        assert pod['spec']['serviceAccountName'] == 'trainguard-trainer'
        await assert_only_its_own_heartbeat(api, await pod_token(api, 'a-1'), OTHER_RUN + OWN_RUN_BEYOND_THE_HEARTBEAT)
        assert (await api.get('a'))['spec']['hyperparameters'].get('epochs') != 99
        status, answer = await patch_run(api, await pod_token(api, 'b-1'), 'a', BEAT)
        assert status == 403 and answer['reason'] == 'Forbidden', answer
        assert answer['message'] == (
            'trainingruns.trainguard.io "a" is forbidden: ValidatingAdmissionPolicy \'trainguard-trainer-own-run\' '
            'with binding \'trainguard-trainer-own-run\' denied request: a trainer may write only its own run: the '
            'token of pod b-1 may not UPDATE TrainingRun a, whose current pod is a-1')

    async def test_a_token_not_bound_to_the_current_pod_writes_nothing(self, api, operator):
        await two_runs(api, operator)
        # A token of the shared account with no pod in it (`kubectl create token trainguard-trainer`).
        status, answer = await as_user(api, None, 'post',
                                       f'/api/v1/namespaces/{NAMESPACE}/serviceaccounts/trainguard-trainer/token',
                                       json={'apiVersion': 'authentication.k8s.io/v1', 'kind': 'TokenRequest'})
        assert status == 201, answer
        status, answer = await patch_run(api, answer['status']['token'], 'a', BEAT)
        assert status == 403 and 'the token of pod (none) may not UPDATE' in answer['message'], answer
        # A pod of an earlier attempt (status.podName moved on) is refused too.
        old_token = await pod_token(api, 'a-1')
        await api.patch('a', {'status': {'podName': 'a-2'}}, subresource='status')
        status, answer = await patch_run(api, old_token, 'a', BEAT)
        assert status == 403 and 'whose current pod is a-2' in answer['message'], answer

    async def test_a_namespace_identity_is_created_once_and_only_the_pod_is_on_its_path(self, api, operator, cluster):
        await two_runs(api, operator)
        await api.create(run_body('c', device='cpu'))
        await api.wait_for_run('c', phase('Pending'))
        writes = [(call.resource, call.name) for call in operator_calls(list(cluster)) if call.verb == 'create'
                  and call.resource in ('serviceaccounts', 'roles', 'rolebindings', 'pods')]
        # The shared identity once (by the first run), then a pod per run; no per-run RBAC.
        assert sorted(writes) == sorted([('serviceaccounts', None), ('roles', None), ('rolebindings', None),
                                         ('pods', None), ('pods', None), ('pods', None)]), writes
        first = [resource for resource, _ in writes]
        assert first[:2] == ['serviceaccounts', 'pods'], first   # the Role and binding follow the first pod


class TestRunIdentity:
    """No policy (Kubernetes 1.28-1.29, or an install without it): a ServiceAccount and Role per
    run. RBAC limits the token to its one run (``resourceNames``) but cannot limit which fields
    of it a patch touches: that narrowing needs the policy (README, "What a trainer may do")."""

    async def test_a_trainer_writes_only_its_own_run(self, api, operator):
        await two_runs(api, operator)
        pod = await api.get('a-1', resource=PODS)
        assert pod['spec']['serviceAccountName'] == 'a-trainer'
        await assert_only_its_own_heartbeat(api, await pod_token(api, 'a-1'), OTHER_RUN)
