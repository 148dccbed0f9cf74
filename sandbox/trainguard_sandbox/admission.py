"""Mutating admission webhooks, called as kube-apiserver calls them.

For every MutatingWebhookConfiguration stored in the emulator, each webhook whose rules
match the request (API group, version, resource, operation, scope) is sent an
``admission.k8s.io/v1`` AdmissionReview over HTTPS, verified with the configuration's
``caBundle``; its JSONPatch is applied. A webhook that cannot be reached, times out or
answers badly refuses the request under ``failurePolicy: Fail`` (the default) and is skipped
under ``Ignore``; a webhook that denies refuses the request with its message. Only
``clientConfig.url`` can be reached here (a ``service`` reference needs cluster DNS): such
webhooks are treated as unreachable.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import fnmatch
import json
import ssl
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import jsonpatch

WEBHOOK_CONFIGS = ('admissionregistration.k8s.io', 'v1', 'mutatingwebhookconfigurations')


@dataclasses.dataclass(frozen=True)
class AdmissionRequest:
    group: str
    version: str
    plural: str
    kind: str
    operation: str              # CREATE | UPDATE | DELETE | CONNECT
    namespace: str | None
    name: str
    obj: Mapping[str, Any]
    old: Mapping[str, Any] | None
    dry_run: bool = False


class AdmissionRefused(Exception):
    """The request is refused by admission; ``code`` is what the API server answers."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _matches(rule: Mapping[str, Any], request: AdmissionRequest) -> bool:
    def any_of(values: Iterable[str], value: str) -> bool:
        return any(candidate == '*' or fnmatch.fnmatchcase(value, candidate) for candidate in values)

    scope = rule.get('scope', '*')
    if (scope == 'Namespaced' and request.namespace is None) or (scope == 'Cluster' and request.namespace is not None):
        return False
    return (any_of(rule.get('apiGroups', []), request.group) and any_of(rule.get('apiVersions', []), request.version)
            and any_of(rule.get('resources', []), request.plural)
            and any_of(rule.get('operations', []), request.operation))


def _review(request: AdmissionRequest) -> dict[str, Any]:
    kind = {'group': request.group, 'version': request.version, 'kind': request.kind}
    resource = {'group': request.group, 'version': request.version, 'resource': request.plural}
    return {
        'apiVersion': 'admission.k8s.io/v1', 'kind': 'AdmissionReview',
        'request': {
            'uid': str(uuid.uuid4()), 'kind': kind, 'resource': resource, 'requestKind': kind,
            'requestResource': resource, 'name': request.name, 'namespace': request.namespace,
            'operation': request.operation, 'userInfo': {'username': 'sandbox-admin', 'groups': ['system:masters']},
            'object': request.obj, 'oldObject': request.old, 'dryRun': request.dry_run,
            'options': {'apiVersion': 'meta.k8s.io/v1',
                        'kind': 'CreateOptions' if request.operation == 'CREATE' else 'UpdateOptions'},
        },
    }


def _ssl_context(config: Mapping[str, Any]) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH)
    bundle = config.get('caBundle')
    if bundle:
        context = ssl.create_default_context(cadata=base64.b64decode(bundle).decode('ascii'))
    return context


class WebhookClients:
    """Connections to webhook servers, kept open between calls as kube-apiserver keeps them: a
    new TLS connection per admission would charge the webhook server a handshake per request,
    which a real server does not (one pool per CA bundle)."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, config: Mapping[str, Any]) -> aiohttp.ClientSession:
        key = str(config.get('caBundle') or '')
        if key not in self._sessions or self._sessions[key].closed:
            self._sessions[key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_ssl_context(config)))
        return self._sessions[key]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


async def _call(webhook: Mapping[str, Any], review: dict[str, Any], clients: WebhookClients) -> dict[str, Any]:
    config = webhook.get('clientConfig') or {}
    url = config.get('url')
    if not url:
        raise ConnectionError('clientConfig.service cannot be reached from the emulator (no cluster DNS)')
    timeout = aiohttp.ClientTimeout(total=float(webhook.get('timeoutSeconds', 10)))
    async with clients.session(config).post(url, json=review, timeout=timeout) as response:
        if response.status != 200:
            raise ConnectionError(f'the server responded with status {response.status}: {await response.text()}')
        answer = await response.json()
    result = answer.get('response') or {}
    if result.get('uid') != review['request']['uid']:
        raise ValueError(f'expected response.uid={review["request"]["uid"]!r}, got {result.get("uid")!r}')
    return result


async def mutate(configs: Iterable[Mapping[str, Any]], request: AdmissionRequest,
                 clients: WebhookClients) -> tuple[dict[str, Any], list[str]]:
    """The object after every matching mutating webhook, and the warnings they returned."""
    obj = copy.deepcopy(dict(request.obj))
    warnings: list[str] = []
    for config in sorted(configs, key=lambda c: c['metadata']['name']):  # the server's order: by name
        for webhook in config.get('webhooks') or []:
            if not any(_matches(rule, request) for rule in webhook.get('rules') or []):
                continue
            review = _review(dataclasses.replace(request, obj=obj))
            try:
                result = await _call(webhook, review, clients)
            except (aiohttp.ClientError, ConnectionError, TimeoutError, ValueError, ssl.SSLError) as error:
                if webhook.get('failurePolicy', 'Fail') == 'Ignore':
                    continue
                raise AdmissionRefused(500, f'Internal error occurred: failed calling webhook "{webhook["name"]}": '
                                            f'failed to call webhook: {error}') from error
            warnings += result.get('warnings') or []
            if not result.get('allowed'):
                status = result.get('status') or {}
                raise AdmissionRefused(int(status.get('code') or 400),
                                       f'admission webhook "{webhook["name"]}" denied the request: '
                                       f'{status.get("message", "")}')
            if result.get('patch'):
                if result.get('patchType') != 'JSONPatch':
                    raise AdmissionRefused(500, f'webhook "{webhook["name"]}": unsupported patchType')
                obj = jsonpatch.apply_patch(obj, _decoded(result['patch']))
    return obj, warnings


def _decoded(patch: str) -> Any:
    return json.loads(base64.b64decode(patch))
