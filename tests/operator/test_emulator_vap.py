"""The emulator evaluates ValidatingAdmissionPolicies as kube-apiserver 1.36 does (trainguard_sandbox.vap).

Each expectation here was seen on a real kube-apiserver 1.36 first (the apiserver tier runs the
shipped policy against one): an absent request field is an error, not an empty string, and a
policy that errors under failurePolicy Fail refuses the write with the server's words.
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest

from tests.operator.conftest import NAMESPACE, Api
from tests.operator.test_emulator_rbac import as_user, bob, grant  # noqa: F401 (bob is a fixture)
from tests.operator.test_lifecycle import run_body

POLICIES = kmock.resource('admissionregistration.k8s.io', 'v1', 'validatingadmissionpolicies')
BINDINGS = kmock.resource('admissionregistration.k8s.io', 'v1', 'validatingadmissionpolicybindings')


async def install(api: Api, expression: str, *, failure: str = 'Fail', **validation: Any) -> None:
    await api.create({'apiVersion': 'admissionregistration.k8s.io/v1', 'kind': 'ValidatingAdmissionPolicy',
                      'metadata': {'name': 'p'}, 'spec': {
                          'failurePolicy': failure,
                          'matchConstraints': {'resourceRules': [{'apiGroups': ['trainguard.io'], 'apiVersions': ['*'],
                                                                  'operations': ['UPDATE'],
                                                                  'resources': ['trainingruns']}]},
                          'matchConditions': [{'name': 'bob',
                                               'expression': "request.userInfo.username.endsWith(':bob')"}],
                          'validations': [{'expression': expression, **validation}]}},
                     resource=POLICIES, namespace=None)
    await api.create({'apiVersion': 'admissionregistration.k8s.io/v1', 'kind': 'ValidatingAdmissionPolicyBinding',
                      'metadata': {'name': 'b'}, 'spec': {'policyName': 'p', 'validationActions': ['Deny']}},
                     resource=BINDINGS, namespace=None)


async def patch_as(api: Api, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return await as_user(api, token, 'patch', f'/apis/trainguard.io/v1alpha1/namespaces/{NAMESPACE}/trainingruns/r',
                         json=body, headers={'Content-Type': 'application/merge-patch+json'})


@pytest.fixture()
async def run_bob_may_patch(api: Api, bob: str) -> str:  # noqa: F811
    await api.create(run_body('r'))
    await grant(api, [{'apiGroups': ['trainguard.io'], 'resources': ['trainingruns'], 'verbs': ['patch']}])
    return bob


@pytest.mark.parametrize(('expression', 'extra', 'code', 'message'), [
    ("has(object.metadata.labels) && 'team' in object.metadata.labels", {'reason': 'Forbidden',
                                                                         'message': 'team a only'},
     403, "denied request: team a only"),
    ("has(object.metadata.labels)", {}, 422, "denied request: failed expression: has(object.metadata.labels)"),
    ("request.subResource == ''", {}, 422, "denied request: expression 'request.subResource == ''' resulted in "
                                           "error: "),
    ("!has(request.subResource)", {}, 200, ''),
    ("'x' in request.userInfo.extra", {}, 422, "resulted in error"),   # a token without extra has none
], ids=['false-with-reason', 'false-default-reason', 'absent-field-is-an-error', 'absent-field-guarded',
        'absent-extra'])
async def test_a_policy_refuses_as_kube_apiserver_does(api, run_bob_may_patch, expression, extra, code, message):
    await install(api, expression, **extra)
    status, answer = await patch_as(api, run_bob_may_patch, {'metadata': {'annotations': {'x': 'y'}}})
    assert status == code, answer
    if message:
        assert answer['message'].startswith('trainingruns.trainguard.io "r" is forbidden: ValidatingAdmissionPolicy '
                                             "'p' with binding 'b' denied request: "), answer
        assert message in answer['message'], answer


async def test_an_erroring_policy_that_fails_open_admits(api, run_bob_may_patch):
    await install(api, "request.subResource == ''", failure='Ignore')
    status, answer = await patch_as(api, run_bob_may_patch, {'metadata': {'annotations': {'x': 'y'}}})
    assert status == 200, answer


async def test_the_admin_is_not_matched_and_unbound_policies_do_nothing(api, run_bob_may_patch):
    await install(api, 'false')
    await api.patch('r', {'metadata': {'annotations': {'x': 'admin'}}})   # matchConditions: not bob
    await api.delete('b', resource=BINDINGS, namespace=None)
    status, answer = await patch_as(api, run_bob_may_patch, {'metadata': {'annotations': {'x': 'y'}}})
    assert status == 200, answer
