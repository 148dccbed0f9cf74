"""The emulator authenticates and authorizes as kube-apiserver does: tokens, RBAC, 403 bodies, escalation.

What a real server refuses must be refused here too, or a missing rule passes every test and
fails on a user's cluster (issue 23: the webhook's validating configuration).
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest

from tests.operator.conftest import NAMESPACE, PODS, Api

SERVICEACCOUNTS = kmock.resource('', 'v1', 'serviceaccounts')
ROLES = kmock.resource('rbac.authorization.k8s.io', 'v1', 'roles')
ROLEBINDINGS = kmock.resource('rbac.authorization.k8s.io', 'v1', 'rolebindings')
CLUSTERROLES = kmock.resource('rbac.authorization.k8s.io', 'v1', 'clusterroles')
CLUSTERROLEBINDINGS = kmock.resource('rbac.authorization.k8s.io', 'v1', 'clusterrolebindings')
BOB = 'system:serviceaccount:default:bob'
POD = {'apiVersion': 'v1', 'kind': 'Pod', 'metadata': {'name': 'p'},
       'spec': {'containers': [{'name': 'c', 'image': 'busybox'}]}}


async def as_user(api: Api, token: str | None, method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """A request with this bearer token; None: without credentials (the emulator's admin)."""
    headers = {**({'Authorization': f'Bearer {token}'} if token else {}), **kwargs.pop('headers', {})}
    async with api.emulator.request(method, url, headers=headers, **kwargs) as response:
        return response.status, await response.json()


async def grant(api: Api, rules: list[dict[str, Any]], *, namespace: str | None = NAMESPACE, name: str = 'bob',
                subject: dict[str, Any] | None = None) -> None:
    """A Role (or, without a namespace, a ClusterRole) with these rules, bound to bob."""
    subject = subject or {'kind': 'ServiceAccount', 'name': 'bob', 'namespace': NAMESPACE}
    kind = 'Role' if namespace else 'ClusterRole'
    await api.create({'apiVersion': 'rbac.authorization.k8s.io/v1', 'kind': kind, 'metadata': {'name': name},
                      'rules': rules}, resource=ROLES if namespace else CLUSTERROLES, namespace=namespace)
    await api.create({'apiVersion': 'rbac.authorization.k8s.io/v1', 'kind': f'{kind}Binding',
                      'metadata': {'name': name}, 'subjects': [subject],
                      'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': kind, 'name': name}},
                     resource=ROLEBINDINGS if namespace else CLUSTERROLEBINDINGS, namespace=namespace)


@pytest.fixture()
async def bob(api: Api) -> str:
    await api.create({'apiVersion': 'v1', 'kind': 'ServiceAccount', 'metadata': {'name': 'bob'}},
                     resource=SERVICEACCOUNTS)
    # The TokenRequest API, as `kubectl create token bob` calls it.
    status, answer = await as_user(api, None, 'post', f'/api/v1/namespaces/{NAMESPACE}/serviceaccounts/bob/token',
                                   json={'apiVersion': 'authentication.k8s.io/v1', 'kind': 'TokenRequest',
                                         'spec': {'expirationSeconds': 600}})
    assert status == 201, answer
    return answer['status']['token']


async def test_a_token_for_a_missing_service_account_is_not_issued(api):
    async with api.emulator.post(f'/api/v1/namespaces/{NAMESPACE}/serviceaccounts/nobody/token', json={}) as answer:
        assert answer.status == 404


async def test_an_unknown_token_is_unauthorized(api, bob):
    status, _ = await as_user(api, 'not-issued', 'get', f'/api/v1/namespaces/{NAMESPACE}/pods')
    assert status == 401


async def test_nothing_granted_is_refused_with_kube_apiservers_body(api, bob):
    status, answer = await as_user(api, bob, 'get', f'/api/v1/namespaces/{NAMESPACE}/pods')
    assert status == 403
    assert answer['reason'] == 'Forbidden' and answer['code'] == 403
    assert answer['message'] == (f'pods is forbidden: User "{BOB}" cannot list resource "pods" in API group "" '
                                 f'in the namespace "{NAMESPACE}"')
    status, answer = await as_user(api, bob, 'get', '/apis/trainguard.io/v1alpha1/trainingruns',
                                   params={'watch': 'true'})
    assert answer['message'] == (f'trainingruns.trainguard.io is forbidden: User "{BOB}" cannot watch resource '
                                 f'"trainingruns" in API group "trainguard.io" at the cluster scope')
    assert [attributes.verb for _, attributes, _ in api.emulator.refusals] == ['list', 'watch']


async def test_discovery_is_open_to_every_authenticated_user(api, bob):
    for path in ('/api', '/api/v1', '/apis', '/version'):
        status, _ = await as_user(api, bob, 'get', path)
        assert status == 200, path


@pytest.mark.parametrize(('rule', 'method', 'url', 'allowed'), [
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['list']}, 'get', '/api/v1/namespaces/default/pods', True),
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['list']}, 'get', '/api/v1/namespaces/other/pods', False),
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['list']}, 'get', '/api/v1/namespaces/default/pods/p', False),
    ({'apiGroups': ['*'], 'resources': ['*'], 'verbs': ['*']}, 'get', '/api/v1/namespaces/default/pods/p', True),
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['get'], 'resourceNames': ['p']}, 'get',
     '/api/v1/namespaces/default/pods/p', True),
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['get'], 'resourceNames': ['q']}, 'get',
     '/api/v1/namespaces/default/pods/p', False),
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['create'], 'resourceNames': ['p']}, 'post',
     '/api/v1/namespaces/default/pods', False),   # a create has no name: a named rule never allows it
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['create']}, 'post', '/api/v1/namespaces/default/pods', True),
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['patch']}, 'patch',
     '/api/v1/namespaces/default/pods/p/status', False),   # a subresource is its own resource
    ({'apiGroups': [''], 'resources': ['pods/status'], 'verbs': ['patch']}, 'patch',
     '/api/v1/namespaces/default/pods/p/status', True),
    ({'apiGroups': [''], 'resources': ['pods'], 'verbs': ['delete']}, 'delete',
     '/api/v1/namespaces/default/pods', False),   # deletecollection
], ids=['list', 'other-namespace', 'list-is-not-get', 'wildcards', 'named', 'other-name', 'create-named',
        'create', 'subresource-not-granted', 'subresource', 'deletecollection'])
async def test_a_role_grants_exactly_its_rules_in_its_namespace(api, bob, rule, method, url, allowed):
    await api.create(POD, resource=PODS)
    await api.create(POD, resource=PODS, namespace='other')
    await grant(api, [rule])
    kwargs: dict[str, Any] = {}
    if method == 'post':
        kwargs['json'] = {**POD, 'metadata': {'name': 'p2'}}
    elif method == 'patch':
        kwargs.update(json={'status': {'phase': 'Running'}}, headers={'Content-Type': 'application/merge-patch+json'})
    status, answer = await as_user(api, bob, method, url, **kwargs)
    assert (status < 300) is allowed, answer


async def test_cluster_roles_bind_cluster_wide_and_groups_are_subjects(api, bob):
    await grant(api, [{'apiGroups': ['apiextensions.k8s.io'], 'resources': ['customresourcedefinitions'],
                       'verbs': ['list']},
                      {'apiGroups': [''], 'resources': ['namespaces'], 'verbs': ['list', 'get']}], namespace=None,
                subject={'kind': 'Group', 'name': 'system:serviceaccounts:default'})
    status, answer = await as_user(api, bob, 'get', '/apis/apiextensions.k8s.io/v1/customresourcedefinitions')
    assert status == 200 and [crd['metadata']['name'] for crd in answer['items']] == ['trainingruns.trainguard.io']
    # The Namespace collection and one Namespace (what a namespaced kopf operator lists and watches).
    status, answer = await as_user(api, bob, 'get', '/api/v1/namespaces')
    assert status == 200 and {ns['metadata']['name'] for ns in answer['items']} >= {'default', 'other'}
    status, answer = await as_user(api, bob, 'get', '/api/v1/namespaces/other')
    assert status == 200 and answer['metadata']['name'] == 'other'
    status, _ = await as_user(api, bob, 'get', '/api/v1/namespaces/default/pods')
    assert status == 403


async def test_writing_a_role_grants_nothing_the_writer_does_not_hold(api, bob):
    await grant(api, [{'apiGroups': ['rbac.authorization.k8s.io'], 'resources': ['roles', 'rolebindings'],
                       'verbs': ['create']},
                      {'apiGroups': [''], 'resources': ['pods'], 'verbs': ['get']}])
    url = f'/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}/roles'

    def role(name: str, verbs: list[str]) -> dict[str, Any]:
        return {'apiVersion': 'rbac.authorization.k8s.io/v1', 'kind': 'Role', 'metadata': {'name': name},
                'rules': [{'apiGroups': [''], 'resources': ['pods'], 'verbs': verbs, 'resourceNames': ['p']}]}
    status, answer = await as_user(api, bob, 'post', url, json=role('held', ['get']))
    assert status < 300, answer
    status, answer = await as_user(api, bob, 'post', url, json=role('escalating', ['get', 'delete']))
    assert status == 403
    assert answer['message'].startswith(f'roles.rbac.authorization.k8s.io "escalating" is forbidden: user "{BOB}" '
                                        '(groups=')
    assert 'attempting to grant RBAC permissions not currently held:\n' \
           "{APIGroups:[''], Resources:['pods'], ResourceNames:['p'], Verbs:['delete']}" in answer['message']
    # A binding to a role whose permissions the writer lacks is escalation too; `bind` allows it.
    await api.create(role('big', ['get', 'delete', 'create']), resource=ROLES)
    binding = {'apiVersion': 'rbac.authorization.k8s.io/v1', 'kind': 'RoleBinding', 'metadata': {'name': 'big'},
               'subjects': [{'kind': 'User', 'name': 'eve'}],
               'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role', 'name': 'big'}}
    bindings = f'/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}/rolebindings'
    status, _ = await as_user(api, bob, 'post', bindings, json=binding)
    assert status == 403
    await grant(api, [{'apiGroups': ['rbac.authorization.k8s.io'], 'resources': ['roles'], 'verbs': ['bind'],
                       'resourceNames': ['big']}], name='binder')
    status, answer = await as_user(api, bob, 'post', bindings, json=binding)
    assert status < 300, answer
