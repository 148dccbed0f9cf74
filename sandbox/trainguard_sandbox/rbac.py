"""Authentication and RBAC authorization as kube-apiserver does them, for the emulator.

Hand-written because no maintained Python library evaluates Kubernetes RBAC; it follows
kube-apiserver's RBAC authorizer (``plugin/pkg/auth/authorizer/rbac``: ``RuleAllows``,
``appliesTo`` for subjects) and its escalation check (``pkg/registry/rbac/validation``:
``ConfirmNoEscalation``, ``Covers``), and its refusal messages word for word, so a client
sees the same 403 body here as on a real server.

- **Identity.** A bearer token the emulator minted (TokenRequest, or ``mint``) names a
  ServiceAccount: user ``system:serviceaccount:<ns>:<name>``, groups
  ``system:serviceaccounts``, ``system:serviceaccounts:<ns>``, ``system:authenticated``.
  An unknown token is 401. A request with no credentials is the emulator's administrator
  (``system:masters``), like the privileged loopback client of kube-apiserver: the tests'
  own client and the sandbox's tooling act as the cluster admin, and what is under test
  runs with a token.
- **Authorization.** ``system:masters`` may do anything. Everyone else gets what the stored
  Roles, ClusterRoles, RoleBindings and ClusterRoleBindings grant, plus the bootstrap
  policy every cluster has for authenticated users (discovery paths, ``system:basic-user``).
  ClusterRole aggregation is not applied: kube-controller-manager does that, and envtest
  (etcd + kube-apiserver) does not run it either.
- **Escalation.** Creating or updating a Role or ClusterRole needs every permission it
  grants (or the ``escalate`` verb); creating a binding needs the bound role's permissions
  (or ``bind`` on it).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

RBAC_GROUP = 'rbac.authorization.k8s.io'
MASTERS = 'system:masters'
AUTHENTICATED = 'system:authenticated'
# system:discovery, system:public-info-viewer and system:basic-user, bound to every
# authenticated user by kube-apiserver's bootstrap policy.
BOOTSTRAP_RULES: tuple[dict[str, Any], ...] = (
    {'nonResourceURLs': ['/api', '/api/*', '/apis', '/apis/*', '/openapi', '/openapi/*', '/version', '/version/',
                         '/healthz', '/livez', '/readyz'], 'verbs': ['get']},
    {'apiGroups': ['authorization.k8s.io'], 'resources': ['selfsubjectaccessreviews', 'selfsubjectrulesreviews'],
     'verbs': ['create']},
    {'apiGroups': ['authentication.k8s.io'], 'resources': ['selfsubjectreviews'], 'verbs': ['create']},
)


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...]
    # userInfo.extra: a pod-bound ServiceAccount token carries its pod's name and UID
    # (authentication.kubernetes.io/pod-name, /pod-uid), as kube-apiserver 1.30+ adds them.
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def is_master(self) -> bool:
        return MASTERS in self.groups


ADMIN = User('system:admin', (MASTERS, AUTHENTICATED))


POD_NAME_EXTRA = 'authentication.kubernetes.io/pod-name'
POD_UID_EXTRA = 'authentication.kubernetes.io/pod-uid'


def service_account_user(namespace: str, name: str, pod: tuple[str, str] | None = None) -> User:
    """``pod``: (name, uid) of the pod the token is bound to, if any."""
    extra = ((POD_NAME_EXTRA, (pod[0],)), (POD_UID_EXTRA, (pod[1],))) if pod else ()
    return User(f'system:serviceaccount:{namespace}:{name}',
                ('system:serviceaccounts', f'system:serviceaccounts:{namespace}', AUTHENTICATED), extra)


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What is asked: kube-apiserver's authorizer.Attributes."""

    verb: str
    group: str = ''
    resource: str = ''
    subresource: str = ''
    namespace: str = ''
    name: str = ''
    path: str = ''           # for non-resource requests
    resource_request: bool = True


class Tokens:
    """Bearer tokens the emulator issued, and whom each names."""

    def __init__(self) -> None:
        self._users: dict[str, User] = {}

    def mint(self, user: User) -> str:
        token = secrets.token_urlsafe(32)
        self._users[token] = user
        return token

    def authenticate(self, authorization: str | None) -> User | None:
        """The user, ADMIN without credentials, None for a token nobody issued (401)."""
        if not authorization:
            return ADMIN
        scheme, _, token = authorization.partition(' ')
        if scheme.lower() != 'bearer':
            return None
        return self._users.get(token.strip())


# -- rules ----------------------------------------------------------------------------------

def _has(values: Iterable[str], wanted: str) -> bool:
    values = list(values or [])
    return '*' in values or wanted in values


def _resource_matches(rule: Mapping[str, Any], resource: str, subresource: str) -> bool:
    combined = f'{resource}/{subresource}' if subresource else resource
    for candidate in rule.get('resources') or []:
        if candidate in ('*', combined):
            return True
        if subresource and candidate in (f'{resource}/*', f'*/{subresource}'):
            return True
    return False


def _path_matches(rule: Mapping[str, Any], path: str) -> bool:
    for candidate in rule.get('nonResourceURLs') or []:
        if candidate == '*' or candidate == path or (candidate.endswith('*') and path.startswith(candidate[:-1])):
            return True
    return False


def rule_allows(rule: Mapping[str, Any], attrs: Attributes) -> bool:
    if not _has(rule.get('verbs') or [], attrs.verb):
        return False
    if not attrs.resource_request:
        return _path_matches(rule, attrs.path)
    if not _has(rule.get('apiGroups') or [], attrs.group) or not _resource_matches(rule, attrs.resource,
                                                                                     attrs.subresource):
        return False
    names = rule.get('resourceNames') or []
    return not names or attrs.name in names   # create has no name: a named rule never allows it


# -- the policy as stored -------------------------------------------------------------------

RBAC_PLURALS = frozenset({'roles', 'clusterroles', 'rolebindings', 'clusterrolebindings'})


class Policy:
    """The RBAC objects the emulator holds (kept current from its writes), asked what a user may do."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], Mapping[str, Any]] = {}  # (plural, namespace, name)

    def observe(self, plural: str, event_type: str, obj: Mapping[str, Any]) -> None:
        metadata = obj.get('metadata') or {}
        key = (plural, metadata.get('namespace'), metadata.get('name', ''))
        if event_type == 'DELETED':
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj

    def _role_rules(self, ref: Mapping[str, Any], namespace: str | None) -> list[Mapping[str, Any]]:
        if ref.get('kind') == 'ClusterRole':
            role = self.objects.get(('clusterroles', None, ref.get('name', '')))
        else:
            role = self.objects.get(('roles', namespace, ref.get('name', '')))
        return list((role or {}).get('rules') or [])

    def _bound(self, user: User, binding: Mapping[str, Any]) -> bool:
        for subject in binding.get('subjects') or []:
            kind, name = subject.get('kind'), subject.get('name')
            if kind == 'User' and name == user.name:
                return True
            if kind == 'Group' and name in user.groups:
                return True
            if kind == 'ServiceAccount' and user.name == f'system:serviceaccount:{subject.get("namespace")}:{name}':
                return True
        return False

    def rules_for(self, user: User, namespace: str | None) -> Iterator[Mapping[str, Any]]:
        """Every rule that applies to the user in this namespace (None: cluster scope only)."""
        if AUTHENTICATED in user.groups:
            yield from BOOTSTRAP_RULES
        for (plural, binding_namespace, _), binding in list(self.objects.items()):
            if plural == 'clusterrolebindings' and self._bound(user, binding):
                yield from self._role_rules(binding.get('roleRef') or {}, None)
            elif (plural == 'rolebindings' and namespace and binding_namespace == namespace
                  and self._bound(user, binding)):
                yield from self._role_rules(binding.get('roleRef') or {}, namespace)

    def allows(self, user: User, attrs: Attributes) -> bool:
        if user.is_master:
            return True
        return any(rule_allows(rule, attrs) for rule in self.rules_for(user, attrs.namespace or None))

    # -- escalation -----------------------------------------------------------------------

    def not_held(self, user: User, rules: Iterable[Mapping[str, Any]], namespace: str | None) -> list[dict[str, Any]]:
        """The rules (broken down) the user does not hold itself: non-empty means escalation."""
        if user.is_master:
            return []
        owned = list(self.rules_for(user, namespace))
        missing = []
        for rule in rules:
            for piece in _breakdown(rule):
                if not any(_covers(owner, piece) for owner in owned):
                    missing.append(piece)
        return missing

    def bound_role_rules(self, binding: Mapping[str, Any], namespace: str | None) -> list[Mapping[str, Any]]:
        return self._role_rules(binding.get('roleRef') or {}, namespace)


def _breakdown(rule: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """One verb, group, resource and name at a time, as kube-apiserver's BreakdownRule."""
    for verb in rule.get('verbs') or []:
        for url in rule.get('nonResourceURLs') or []:
            yield {'nonResourceURLs': [url], 'verbs': [verb]}
        for group in rule.get('apiGroups') or []:
            for resource in rule.get('resources') or []:
                names = rule.get('resourceNames') or []
                for name in names or [None]:
                    piece: dict[str, Any] = {'apiGroups': [group], 'resources': [resource], 'verbs': [verb]}
                    if name is not None:
                        piece['resourceNames'] = [name]
                    yield piece


def _covers(owner: Mapping[str, Any], piece: Mapping[str, Any]) -> bool:
    verb = piece['verbs'][0]
    if not _has(owner.get('verbs') or [], verb):
        return False
    if piece.get('nonResourceURLs'):
        return _path_matches(owner, piece['nonResourceURLs'][0])
    if not _has(owner.get('apiGroups') or [], piece['apiGroups'][0]):
        return False
    resource = piece['resources'][0]
    main, _, sub = resource.partition('/')
    owned_resources = owner.get('resources') or []
    if not ('*' in owned_resources or resource in owned_resources or (sub and f'{main}/*' in owned_resources)):
        return False
    owner_names = owner.get('resourceNames') or []
    if not owner_names:
        return True
    return bool(piece.get('resourceNames')) and piece['resourceNames'][0] in owner_names


# -- kube-apiserver's words -----------------------------------------------------------------

def forbidden_message(user: User, attrs: Attributes) -> str:
    """``forbiddenMessage`` and ``NewForbidden`` of kube-apiserver, composed."""
    if not attrs.resource_request:
        return f'forbidden: User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
    resource = f'{attrs.resource}/{attrs.subresource}' if attrs.subresource else attrs.resource
    where = (f'in the namespace "{attrs.namespace}"' if attrs.namespace else 'at the cluster scope')
    reason = (f'User "{user.name}" cannot {attrs.verb} resource "{resource}" in API group "{attrs.group}" '
              f'{where}')
    qualified = f'{attrs.resource}.{attrs.group}' if attrs.group else attrs.resource
    return f'{qualified} "{attrs.name}" is forbidden: {reason}' if attrs.name else f'{qualified} is forbidden: {reason}'


def escalation_message(user: User, plural: str, name: str, missing: list[dict[str, Any]]) -> str:
    def show(rule: Mapping[str, Any]) -> str:
        if rule.get('nonResourceURLs'):
            return f'{{NonResourceURLs:{rule["nonResourceURLs"]}, Verbs:{rule["verbs"]}}}'
        names = f', ResourceNames:{rule["resourceNames"]}' if rule.get('resourceNames') else ''
        return f'{{APIGroups:{rule["apiGroups"]}, Resources:{rule["resources"]}{names}, Verbs:{rule["verbs"]}}}'
    listed = '\n'.join(show(rule) for rule in missing)
    return (f'{plural}.{RBAC_GROUP} "{name}" is forbidden: user "{user.name}" (groups={list(user.groups)}) is '
            f'attempting to grant RBAC permissions not currently held:\n{listed}')
