"""ValidatingAdmissionPolicy as kube-apiserver evaluates it, for the emulator.

Hand-written around a real CEL implementation (``cel``): no maintained Python library
evaluates Kubernetes admission policies. It follows kube-apiserver's
``plugin/policy/validating``: a policy applies through a binding; a request must match the
policy's ``matchConstraints.resourceRules`` (groups, versions, operations, ``resource`` or
``resource/subresource``) and every ``matchConditions`` expression; ``variables`` are
evaluated in order, each seeing the earlier ones; every ``validations`` expression must be
true. A false validation is refused with its ``reason`` (Invalid, 422, by default; Forbidden,
403) and ``messageExpression`` (else ``message``, else the expression) in the server's words:
``<plural>.<group> "<name>" is forbidden: ValidatingAdmissionPolicy '<policy>' with binding
'<binding>' denied request: <message>``. An expression that fails to evaluate is refused
(422, ``expression '<expression>' resulted in error: <error>``) under ``failurePolicy:
Fail`` and ignored under ``Ignore``.

What ``request`` carries: ``operation``, ``namespace``, ``name``, ``subResource`` (absent when
none: reading it then is an error, as on kube-apiserver 1.36), ``resource`` (group, version,
resource) and ``userInfo`` (username, groups, extra: a pod-bound token's
``authentication.kubernetes.io/pod-name`` and ``pod-uid``). Not modelled:
``paramKind``/``paramRef``, ``matchResources`` selectors on bindings, ``auditAnnotations``,
``Warn``/``Audit`` actions, and DELETE requests (the emulator admits deletions without policy).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import cel

GROUP = 'admissionregistration.k8s.io'
POLICIES = 'validatingadmissionpolicies'
BINDINGS = 'validatingadmissionpolicybindings'
_CODES = {'Forbidden': 403, 'Invalid': 422, 'Unauthorized': 401, 'RequestEntityTooLarge': 413}


@dataclasses.dataclass(frozen=True)
class Request:
    operation: str            # CREATE | UPDATE
    group: str
    version: str
    plural: str
    subresource: str          # '' when none
    namespace: str
    name: str
    username: str
    groups: tuple[str, ...]
    extra: Mapping[str, tuple[str, ...]]
    obj: Mapping[str, Any]
    old: Mapping[str, Any] | None


class Refused(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


@functools.lru_cache(maxsize=256)
def _compile(expression: str) -> Any:
    return cel.compile(expression)


def _matches(rules: list[Mapping[str, Any]], request: Request) -> bool:
    resource = f'{request.plural}/{request.subresource}' if request.subresource else request.plural
    for rule in rules:
        if not _any(rule.get('apiGroups'), request.group) or not _any(rule.get('apiVersions'), request.version):
            continue
        if not _any(rule.get('operations'), request.operation):
            continue
        if any(candidate in ('*', resource) or (request.subresource and candidate == f'{request.plural}/*')
               for candidate in rule.get('resources') or []):
            return True
    return False


def _any(values: Any, wanted: str) -> bool:
    values = list(values or [])
    return '*' in values or wanted in values


class Policies:
    """The stored policies and bindings (kept current from the emulator's writes)."""

    def __init__(self) -> None:
        self.policies: dict[str, dict[str, Any]] = {}
        self.bindings: dict[str, dict[str, Any]] = {}

    def observe(self, plural: str, event_type: str, obj: Mapping[str, Any]) -> None:
        store = self.policies if plural == POLICIES else self.bindings
        name = obj['metadata']['name']
        if event_type == 'DELETED':
            store.pop(name, None)
        else:
            store[name] = dict(obj)

    def validate(self, request: Request) -> None:
        """Raise Refused for the first binding whose policy denies the request."""
        for binding_name, binding in sorted(self.bindings.items()):
            spec = binding.get('spec') or {}
            policy = self.policies.get(spec.get('policyName', ''))
            if policy is None or 'Deny' not in (spec.get('validationActions') or []):
                continue
            _check(policy, binding_name, request)


def _request_fields(request: Request) -> dict[str, Any]:
    """``request`` as kube-apiserver builds it: a field left empty is absent (reading it is an
    error, so a policy must guard it with has()), e.g. subResource on a request for the object."""
    user: dict[str, Any] = {'username': request.username, 'groups': list(request.groups)}
    if request.extra:
        user['extra'] = {key: list(value) for key, value in request.extra.items()}
    fields: dict[str, Any] = {
        'operation': request.operation, 'namespace': request.namespace, 'name': request.name,
        'resource': {'group': request.group, 'version': request.version, 'resource': request.plural},
        'userInfo': user,
    }
    if request.subresource:
        fields['subResource'] = request.subresource
    return fields


def _context(request: Request, fields: Mapping[str, Any], variables: Mapping[str, Any]) -> Any:
    """A fresh CEL context per expression (``variables`` grows as they are evaluated); the
    request's own fields are built once per policy."""
    context = cel.Context()
    context.add_variable('request', dict(fields))
    context.add_variable('object', dict(request.obj))
    context.add_variable('oldObject', dict(request.old) if request.old is not None else None)
    context.add_variable('variables', dict(variables))
    return context


def _check(policy: Mapping[str, Any], binding_name: str, request: Request) -> None:
    spec = policy.get('spec') or {}
    name = policy['metadata']['name']
    if not _matches(list((spec.get('matchConstraints') or {}).get('resourceRules') or []), request):
        return
    fail_closed = spec.get('failurePolicy', 'Fail') == 'Fail'
    group = f'.{request.group}' if request.group else ''
    prefix = (f'{request.plural}{group} "{request.name}" is forbidden: ValidatingAdmissionPolicy \'{name}\' '
              f'with binding \'{binding_name}\' denied request: ')
    variables: dict[str, Any] = {}
    fields = _request_fields(request)
    expression = ''
    try:
        for condition in spec.get('matchConditions') or []:
            expression = condition['expression']
            if not _compile(expression).execute(_context(request, fields, variables)):
                return
        for variable in spec.get('variables') or []:
            expression = variable['expression']
            variables[variable['name']] = _compile(expression).execute(_context(request, fields, variables))
        for validation in spec.get('validations') or []:
            expression = validation['expression']
            if _compile(expression).execute(_context(request, fields, variables)) is True:
                continue
            reason = validation.get('reason') or 'Invalid'
            message = validation.get('message') or f'failed expression: {expression}'
            if validation.get('messageExpression'):
                expression = validation['messageExpression']
                message = str(_compile(expression).execute(_context(request, fields, variables)))
            raise Refused(_CODES.get(reason, 422), reason, prefix + message)
    except Refused:
        raise
    except Exception as error:   # an expression that cannot be evaluated: kube-apiserver's words
        if fail_closed:
            raise Refused(422, 'Invalid', f"{prefix}expression '{expression}' resulted in error: {error}") from error
