"""What the operator asked of the API: recorded by the emulator, classified like RBAC does."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import kmock

VERBS = {
    kmock.action.LIST: 'list', kmock.action.WATCH: 'watch', kmock.action.FETCH: 'get',
    kmock.action.CREATE: 'create', kmock.action.UPDATE: 'patch', kmock.action.DELETE: 'delete',
}
WRITE_VERBS = frozenset({'create', 'patch', 'update', 'delete'})


@dataclasses.dataclass(frozen=True)
class Call:
    group: str
    resource: str      # with the subresource, e.g. trainingruns/status
    verb: str
    name: str | None

    @property
    def write(self) -> bool:
        return self.verb in WRITE_VERBS


def operator_calls(requests: Iterable[Any]) -> list[Call]:
    """Resource requests sent by the operator (kopf or the kubernetes client), not by the tests."""
    calls = []
    for request in requests:
        agent = {k.lower(): v for k, v in request.headers.items()}.get('user-agent', '')
        if agent.startswith('kmock/') or request.resource is None or request.resource.plural is None:
            continue
        verb = 'update' if request.method == kmock.method.PUT else VERBS.get(request.action)
        if verb is None:
            continue
        resource = request.resource.plural + (f'/{request.subresource}' if request.subresource else '')
        calls.append(Call(request.resource.group or '', resource, verb, request.name))
    return calls
