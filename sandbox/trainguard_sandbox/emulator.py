"""A Kubernetes API emulator faithful enough to run the real kopf operator against.

kmock's ``KubernetesEmulator`` (by kopf's author) serves discovery, CRUD, lists and watches
from memory. It is deliberately simple, and several of its simplifications break an operator
that relies on real API-server semantics. This subclass closes those gaps, and is shared by
the operator test tier and by ``trainguard-operator sandbox``:

- uid, resourceVersion, generation and creationTimestamp are set on create (and
  ``generateName`` is honoured, as kopf posts Events with it);
- every write bumps a cluster-wide resourceVersion; spec changes bump ``generation``;
- JSON patches (with kopf's ``test`` on resourceVersion) and merge patches are applied
  as the API server does, and a failed ``test`` answers 422;
- the status subresource is isolated: writes to ``/status`` change only ``.status``,
  writes to the main endpoint never change it, and create drops it;
- list answers carry the real resourceVersion, and a watch resumes from a
  resourceVersion instead of replaying every object (410 Gone when too old);
- label and field selectors filter lists and watches;
- deleting an object garbage-collects its dependents (ownerReferences), in the background
  propagation style, and finalizers hold deletion as usual.

- custom resources are admitted as the server admits them: mutating webhooks registered in
  MutatingWebhookConfigurations are called over HTTPS (verified with their caBundle) on
  CREATE and UPDATE, then unknown fields are pruned, structural defaults applied and the
  CRD's OpenAPI schema and CEL rules checked (trainguard_sandbox.crd); a refusal answers
  422 naming the field, as the server does; ``?dryRun=All`` admits without storing.

- requests are authenticated and authorized as kube-apiserver does (trainguard_sandbox.rbac):
  bearer tokens minted through the TokenRequest API (``serviceaccounts/<name>/token``) name
  ServiceAccounts, whose requests are checked against the stored Roles, ClusterRoles and
  bindings, refused with kube-apiserver's 403 body (``refusals`` records each), and refused
  when they would grant RBAC permissions they do not hold; a request without credentials is
  the cluster admin.

An in-memory write costs microseconds, a real one milliseconds. For benchmarks the emulator
can charge every write a real server's cost by kind, RBAC contention in a burst included, and
cap the writes per second (``service_times``, trainguard_sandbox.servicetime); off by default.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import datetime
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import apps, parsing, rendering  # the extension points kmock's own subclasses use
from kubernetes.utils.quantity import parse_quantity

from trainguard_sandbox import admission, rbac, servicetime, vap
from trainguard_sandbox import crd as crd_checks

_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads ``/api/v1/namespaces`` (the Namespace collection) and
    ``/api/v1/namespaces/<name>`` (one Namespace) as the namespace prefix of a namespaced path,
    and fails on the first with a 500: kopf's namespace observer, which a namespaced operator
    runs (``--namespace``), could never start here. Parsed as kube-apiserver routes them."""
    parts = path.strip('/').split('/')
    if (len(parts) in (3, 4, 5) and parts[0] == 'api' and parts[2] == 'namespaces'
            and (len(parts) < 5 or parts[4] in ('status', 'finalize'))):
        return parsing.ParsedPath('', parts[1], 'namespaces', None, parts[3] if len(parts) > 3 else None,
                                  parts[4] if len(parts) > 4 else None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path   # rendering.Request._parse looks it up at every request
_USER: contextvars.ContextVar[rbac.User] = contextvars.ContextVar('user', default=rbac.ADMIN)
_VERBS = {kmock.action.LIST: 'list', kmock.action.WATCH: 'watch', kmock.action.FETCH: 'get',
          kmock.action.CREATE: 'create', kmock.action.UPDATE: 'patch', kmock.action.DELETE: 'delete'}
WATCH_LOG_LIMIT = 200_000  # events kept for resuming watches; older resourceVersions get 410 Gone


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message)


@attrs.define
class _LoggedEvent:
    resource_version: int
    resource: kmock.resource
    event: dict[str, Any]


@attrs.define(kw_only=True)
class FaithfulEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API-server semantics an operator depends on."""

    _last_resource_version: int = attrs.field(default=0, init=False)
    _watch_log: list[_LoggedEvent] = attrs.field(factory=list, init=False)
    _watch_changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    # (group, version, plural) -> (kind, openAPIV3Schema) of each registered CRD version
    crd_schemas: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] = attrs.field(factory=dict, init=False)
    # MutatingWebhookConfigurations by name, kept current by _publish (no scan per write)
    _webhook_configs: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)
    # A server's cost of a write, by kind (off by default; benchmarks/operator_scale.py sets it).
    service_times: servicetime.ServiceTimes | None = None
    _service_clock: servicetime.ServiceClock | None = attrs.field(default=None, init=False)
    _webhook_clients: admission.WebhookClients = attrs.field(factory=admission.WebhookClients, init=False)
    tokens: rbac.Tokens = attrs.field(factory=rbac.Tokens, init=False)
    policy: rbac.Policy = attrs.field(factory=rbac.Policy, init=False)
    refusals: list[tuple[rbac.User, rbac.Attributes, str]] = attrs.field(factory=list, init=False)
    admission_policies: vap.Policies = attrs.field(factory=vap.Policies, init=False)
    # Stand-ins for other projects' pod webhooks (a test's Kueue adds its scheduling gate here).
    pod_create_hooks: list[Callable[[dict[str, Any]], None]] = attrs.field(factory=list, init=False)

    async def __aexit__(self, *exc_info: Any) -> Any:
        await self._webhook_clients.close()
        return await super().__aexit__(*exc_info)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock does not guess an action for PUT; serve it as a full replacement.
        self.fallback['put'] << self._serve_update

    # -- state changes --------------------------------------------------------------------

    def _next_resource_version(self) -> str:
        self._last_resource_version += 1
        return str(self._last_resource_version)

    def _has_status_subresource(self, resource: kmock.resource) -> bool:
        return resource in self.resources and 'status' in self.resources[resource].subresources

    # -- authentication and authorization -------------------------------------------------

    def mint_token(self, namespace: str, service_account: str, pod: tuple[str, str] | None = None) -> str:
        """A token for a ServiceAccount, as the TokenRequest API (or the kubelet) hands one out;
        ``pod`` (name, uid): bound to that pod, as the kubelet's projected token is."""
        return self.tokens.mint(rbac.service_account_user(namespace, service_account, pod))

    @staticmethod
    def _attributes(request: rendering.Request) -> rbac.Attributes:
        if request.resource is None or request.resource.plural is None:
            return rbac.Attributes(verb=_http_verb(request), path=request.url.path, resource_request=False)
        if request.method == kmock.method.PUT and request.name is not None:
            verb = 'update'
        elif request.action == kmock.action.DELETE and request.name is None:
            verb = 'deletecollection'
        else:
            verb = _VERBS.get(request.action) or _http_verb(request)
        return rbac.Attributes(verb=verb, group=request.resource.group or '', resource=request.resource.plural,
                               subresource=request.subresource or '', namespace=request.namespace or '',
                               name=request.name or '')

    def _authorize(self, request: rendering.Request) -> rbac.User:
        headers = {name.lower(): value for name, value in request.headers.items()}
        user = self.tokens.authenticate(headers.get('authorization'))
        if user is None:
            raise _error(401, 'Unauthorized', 'Unauthorized')
        if user.is_master:
            return user   # no attributes to work out: a benchmark's burst pays nothing for RBAC
        attributes = self._attributes(request)
        if not self.policy.allows(user, attributes):
            message = rbac.forbidden_message(user, attributes)
            self.refusals.append((user, attributes, message))
            raise kmock.KubernetesError(status=403, reason='Forbidden', message=message, details={
                'name': attributes.name, 'group': attributes.group, 'kind': attributes.resource})
        return user

    def _confirm_no_escalation(self, user: rbac.User, plural: str, namespace: str | None,
                               obj: Mapping[str, Any]) -> None:
        """Writing a role or binding grants nothing its writer does not hold (or ``escalate``/``bind``)."""
        if plural not in rbac.RBAC_PLURALS or user.is_master:
            return
        name = (obj.get('metadata') or {}).get('name', '')
        target = rbac.Attributes(verb='escalate' if plural in ('roles', 'clusterroles') else 'bind',
                                 group=rbac.RBAC_GROUP, namespace=namespace or '', name=name,
                                 resource=plural if plural in ('roles', 'clusterroles') else '')
        if plural in ('roles', 'clusterroles'):
            rules = list(obj.get('rules') or [])
        else:
            ref = obj.get('roleRef') or {}
            target = dataclasses.replace(target, resource='clusterroles' if ref.get('kind') == 'ClusterRole'
                                         else 'roles', name=ref.get('name', ''))
            rules = self.policy.bound_role_rules(obj, namespace)
        if self.policy.allows(user, target):
            return
        missing = self.policy.not_held(user, rules, namespace)
        if missing:
            message = rbac.escalation_message(user, plural, name, missing)
            self.refusals.append((user, self._attributes_for_write(plural, namespace, name), message))
            raise kmock.KubernetesError(status=403, reason='Forbidden', message=message,
                                        details={'name': name, 'group': rbac.RBAC_GROUP, 'kind': plural})

    @staticmethod
    def _attributes_for_write(plural: str, namespace: str | None, name: str) -> rbac.Attributes:
        return rbac.Attributes(verb='create', group=rbac.RBAC_GROUP, resource=plural, namespace=namespace or '',
                               name=name)

    async def _serve_pod_subresource(self, request: rendering.Request) -> aiohttp.web.Response:
        """``pods/binding`` (what the scheduler posts) and ``pods/eviction`` (a drain, Kueue, a user).

        An eviction marks the pod ``DisruptionTarget=True`` (reason EvictionByEvictionAPI, as
        1.28+ does) and deletes it with its grace period. PodDisruptionBudgets are not checked.
        """
        key = (kmock.resource('', 'v1', 'pods'), request.namespace, request.name)
        body = request.data if isinstance(request.data, dict) else {}
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                raise _error(404, 'NotFound', f'pods "{request.name}" not found')
            new = copy.deepcopy(self.objects[key].raw)
            if request.subresource == 'binding':
                if (new.get('spec') or {}).get('schedulingGates'):
                    raise _error(409, 'Conflict', f'pod {request.name} has non-empty .spec.schedulingGates')
                new.setdefault('spec', {})['nodeName'] = (body.get('target') or {}).get('name', '')
            else:
                status = new.setdefault('status', {})
                status['conditions'] = [condition for condition in status.get('conditions') or []
                                        if condition.get('type') != 'DisruptionTarget'] + [{
                    'type': 'DisruptionTarget', 'status': 'True', 'reason': 'EvictionByEvictionAPI',
                    'message': 'Eviction API: evicting', 'lastTransitionTime': _now()}]
            new['metadata']['resourceVersion'] = self._next_resource_version()
            self.objects[key].history.append(new)
            await self._publish(key[0], 'MODIFIED', new)
            if request.subresource == 'eviction':
                await self._delete(key[0], request.namespace, request.name,
                                   (body.get('deleteOptions') or {}).get('gracePeriodSeconds'))
        return aiohttp.web.json_response({'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                                          'code': 201}, status=201)

    async def _serve_token_request(self, request: rendering.Request) -> aiohttp.web.Response:
        """TokenRequest: ``POST .../serviceaccounts/<name>/token`` (what ``kubectl create token`` sends)."""
        serviceaccounts = kmock.resource('', 'v1', 'serviceaccounts')
        key = (serviceaccounts, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise _error(404, 'NotFound', f'serviceaccounts "{request.name}" not found')
        assert request.namespace is not None and request.name is not None
        body = request.data if isinstance(request.data, dict) else {}
        bound = (body.get('spec') or {}).get('boundObjectRef') or {}
        pod: tuple[str, str] | None = None
        if bound.get('kind') == 'Pod':   # kube-apiserver checks the pod exists, with that UID
            pod_key = (kmock.resource('', 'v1', 'pods'), request.namespace, bound.get('name'))
            stored = self.objects[pod_key] if pod_key in self.objects else None  # noqa: SIM401 (kmock's .get differs)
            if stored is None or stored.deleted or (bound.get('uid') and stored.raw['metadata']['uid'] != bound['uid']):
                raise _error(404, 'NotFound', f'pods "{bound.get("name")}" not found')
            pod = (bound['name'], stored.raw['metadata']['uid'])
        seconds = int((body.get('spec') or {}).get('expirationSeconds') or 3600)
        expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
        return aiohttp.web.json_response({
            'apiVersion': 'authentication.k8s.io/v1', 'kind': 'TokenRequest',
            'metadata': {'name': request.name, 'namespace': request.namespace},
            'spec': {'audiences': (body.get('spec') or {}).get('audiences') or ['https://kubernetes.default.svc'],
                     'expirationSeconds': seconds},
            'status': {'token': self.mint_token(request.namespace, request.name, pod),
                       'expirationTimestamp': expires.strftime('%Y-%m-%dT%H:%M:%SZ')}}, status=201)

    async def _handle(self, request: rendering.Request) -> Any:
        _USER.set(self._authorize(request))
        if request.resource is None or request.resource.plural is None:
            return await apps.RawHandler._handle(self, request)  # discovery and other paths: kmock's DSL
        if (request.resource.plural, request.subresource) == ('serviceaccounts', 'token') and request.name:
            return await self._serve_token_request(request)
        if (request.resource.group, request.resource.plural) == ('', 'pods') and request.name \
                and request.subresource in ('eviction', 'binding') and request.method == kmock.method.POST:
            return await self._serve_pod_subresource(request)
        is_put = request.name is not None and request.method == kmock.method.PUT
        dry_run = request.params.get('dryRun') == 'All'
        if is_put or request.action in (kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE):
            await self._charge_write(request.resource.plural)
        if request.action == kmock.action.CREATE:
            admitted = await self._admit(request, 'CREATE', request.data if isinstance(request.data, dict) else {},
                                         None)
            if dry_run:
                return aiohttp.web.json_response(admitted)
            if admitted is not request.data:  # _create stores request.data; kmock serves it back
                request.data.clear()
                request.data.update(admitted)
            async with self._lock:
                await self._create(request)
        elif request.name is not None and request.action == kmock.action.DELETE:
            async with self._lock:
                await self._delete(request.resource, request.namespace, request.name, _grace(request))
        elif request.name is not None and (request.action == kmock.action.UPDATE or is_put):
            written = await self._update(request, dry_run=dry_run)
            if dry_run:
                return aiohttp.web.json_response(written)
        # Resource requests are served directly, not through kmock's reaction routing: that
        # routing checks each request against every earlier one, which is fine for a test's
        # hundred requests but quadratic for a sandbox or a benchmark serving thousands.
        if request.action == kmock.action.WATCH:
            return await self._stream(request)
        serve = {
            kmock.action.LIST: self._serve_list, kmock.action.FETCH: self._serve_fetch,
            kmock.action.CREATE: self._serve_create, kmock.action.UPDATE: self._serve_update,
            kmock.action.DELETE: self._serve_delete,
        }.get(request.action) if not is_put else self._serve_update
        if serve is None:
            raise _error(405, 'MethodNotAllowed', f'{request.method} is not supported on {request.url.path}')
        return aiohttp.web.json_response(await serve(request))

    async def _charge_write(self, plural: str) -> None:
        """Wait for this write's turn at the server's throughput, then for its kind's service time."""
        if self.service_times is None:
            return
        if self._service_clock is None:
            self._service_clock = servicetime.ServiceClock(self.service_times)
        await self._service_clock.charge(plural)

    # -- admission ------------------------------------------------------------------------

    async def _admit(self, request: rendering.Request, operation: str, obj: dict[str, Any],
                     old: dict[str, Any] | None) -> dict[str, Any]:
        """Mutating webhooks, then the CRD's defaulting, schema and CEL rules, as the server orders them.

        Called outside the emulator's lock: a webhook is an HTTPS round trip to another server.
        """
        resource = request.resource
        assert resource is not None
        crd = self.crd_schemas.get((resource.group, resource.version, resource.plural))
        kind = crd[0] if crd else str(obj.get('kind') or resource.plural)
        if crd is not None:
            unknown = crd_checks.unknown_fields(crd[1], obj) if request.params.get('fieldValidation') == 'Strict' \
                else []
            if unknown:   # kubectl's default; without it the server drops them silently
                listed = ', '.join(f'unknown field "{path}"' for path in unknown)
                raise _error(400, 'BadRequest', f'{kind} in version "{resource.version}" cannot be handled as a '
                                                f'{kind}: strict decoding error: {listed}')
            obj = crd_checks.apply_defaults(crd[1], crd_checks.prune(crd[1], copy.deepcopy(obj)))
        configs = list(self._webhook_configs.values())
        if configs and request.subresource is None:
            name = (obj.get('metadata') or {}).get('name') or request.name or ''
            try:
                obj, _ = await admission.mutate(configs, admission.AdmissionRequest(
                    group=resource.group or '', version=resource.version or '', plural=resource.plural or '',
                    kind=kind, operation=operation, namespace=request.namespace, name=name, obj=obj, old=old,
                    dry_run=request.params.get('dryRun') == 'All'), self._webhook_clients)
            except admission.AdmissionRefused as refused:
                raise _error(refused.code, 'InternalError' if refused.code >= 500 else 'BadRequest',
                             str(refused)) from refused
        self._confirm_no_escalation(_USER.get(), resource.plural or '', request.namespace, obj)
        if (resource.group, resource.plural) == ('', 'pods') and request.subresource is None:
            _admit_pod(obj, old, self.pod_create_hooks)
        if crd is not None:
            admitted, refusals = crd_checks.admit(crd[1], obj, old)
            if refusals:
                group = f'.{resource.group}' if resource.group else ''
                causes = [str(refusal) for refusal in refusals]
                listed = causes[0] if len(causes) == 1 else f'[{", ".join(causes)}]'
                name = (obj.get('metadata') or {}).get('name') or request.name
                raise _error(422, 'Invalid', f'{kind}{group} "{name}" is invalid: {listed}')
            obj = admitted
        if self.admission_policies.bindings:   # validating admission comes last, on the object as stored
            user = _USER.get()
            try:
                self.admission_policies.validate(vap.Request(
                    operation=operation, group=resource.group or '', version=resource.version or '',
                    plural=resource.plural or '', subresource=request.subresource or '',
                    namespace=request.namespace or '', name=(obj.get('metadata') or {}).get('name') or request.name
                    or '', username=user.name, groups=user.groups, extra=dict(user.extra), obj=obj, old=old))
            except vap.Refused as refused:
                raise _error(refused.code, refused.reason, refused.message) from refused
        return obj

    async def _stream(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """A watch as the API server streams it: JSON lines, ended after ?timeoutSeconds."""
        response = aiohttp.web.StreamResponse(headers={'Content-Type': 'application/json'})
        await response.prepare(request._raw_request)
        timeout = float(request.params['timeoutSeconds']) if request.params.get('timeoutSeconds') else None
        try:
            async with asyncio.timeout(timeout):
                async for item in self._serve_watch(request):
                    if isinstance(item, dict):
                        await response.write(json.dumps(item).encode() + b'\n')
        except (TimeoutError, ConnectionResetError):
            pass  # the server-side timeout, or the client went away
        await response.write_eof()
        return response

    async def _create(self, request: rendering.Request) -> None:
        assert request.resource is not None
        body: dict[str, Any] = request.data if isinstance(request.data, dict) else {}
        metadata = body.setdefault('metadata', {})
        if not metadata.get('name'):
            if not metadata.get('generateName'):
                raise _error(422, 'Invalid', 'metadata.name: Required value: name or generateName is required')
            metadata['name'] = metadata['generateName'] + secrets.token_hex(3)[:5]
        if request.namespace is not None:
            metadata['namespace'] = request.namespace
        key = (request.resource, metadata.get('namespace'), metadata['name'])
        if key in self.objects and not self.objects[key].deleted:
            raise _error(409, 'AlreadyExists',
                         f'{request.resource.plural} "{metadata["name"]}" already exists')
        if self._has_status_subresource(request.resource):
            body.pop('status', None)  # the API server ignores status on create
            if (request.resource.group, request.resource.plural) == ('', 'pods'):
                # kube-apiserver's pod strategy: every new pod is Pending, with its QoS class.
                body['status'] = {'phase': 'Pending', 'qosClass': _qos_class(body)}
                _mark_gated(body)
            elif (request.resource.group, request.resource.plural) == ('', 'services'):
                body['status'] = {'loadBalancer': {}}
        metadata['uid'] = str(uuid.uuid4())
        metadata['resourceVersion'] = self._next_resource_version()
        metadata['generation'] = 1
        metadata['creationTimestamp'] = _now()
        metadata.pop('deletionTimestamp', None)
        if key in self.objects:
            self.objects[key].create(body)
        else:
            self.objects[key] = body
        await self._publish(request.resource, 'ADDED', self.objects[key].raw)

    async def _update(self, request: rendering.Request, *, dry_run: bool) -> dict[str, Any]:
        """Patch or replace, admit outside the lock, store if nothing changed meanwhile (else retry).

        The API server does the same (GuaranteedUpdate): a patch is re-applied on a conflict,
        while a PUT that names an outdated resourceVersion is answered 409.
        """
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        for _ in range(10):
            async with self._lock:
                old, patched = self._patched(key, request)
            new = self._isolate_status(request.resource, request.subresource, old, patched)
            new = await self._admit(request, 'UPDATE', new, old)
            if dry_run:
                return new
            async with self._lock:
                current = self.objects[key] if key in self.objects and not self.objects[key].deleted else None
                if current is None:
                    raise kmock.KubernetesObjectNotFoundError()
                if current.raw['metadata']['resourceVersion'] == old['metadata']['resourceVersion']:
                    await self._store_update(key, old, new)
                    return new
        raise _error(409, 'Conflict', 'the object kept changing while it was admitted; try again')

    def _patched(self, key: tuple[kmock.resource, str | None, str],
                 request: rendering.Request) -> tuple[dict[str, Any], dict[str, Any]]:
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        old = self.objects[key].raw
        headers = {name.lower(): value for name, value in request.headers.items()}
        content_type = headers.get('content-type', '').split(';')[0].strip()
        if request.method == kmock.method.PUT:
            sent_version = (request.data or {}).get('metadata', {}).get('resourceVersion')
            if sent_version and sent_version != old['metadata']['resourceVersion']:
                raise _error(409, 'Conflict', 'the object has been modified; please apply your '
                                              'changes to the latest version and try again')
            return old, copy.deepcopy(request.data)
        if content_type == 'application/json-patch+json':
            try:
                return old, jsonpatch.apply_patch(old, request.data or [])
            except jsonpatch.JsonPatchTestFailed as e:
                raise _error(422, 'Invalid', f'the server rejected our request due to an error in our '
                                             f'request: {e}') from e
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise _error(422, 'Invalid', str(e)) from e
        # Merge patch; strategic merge patch is treated the same (lists are replaced), which is
        # what every caller in this project sends for the objects it patches.
        return old, jsonpatch_merge(old, request.data or {})

    async def _store_update(self, key: tuple[kmock.resource, str | None, str], old: dict[str, Any],
                            new: dict[str, Any]) -> None:
        new_meta = new.setdefault('metadata', {})
        for immutable in ('uid', 'creationTimestamp', 'namespace', 'name', 'generation', 'deletionTimestamp'):
            if immutable in old.get('metadata', {}):
                new_meta[immutable] = old['metadata'][immutable]
            else:
                new_meta.pop(immutable, None)
        if _without_meta_and_status(new) != _without_meta_and_status(old):
            new_meta['generation'] = int(old['metadata'].get('generation', 1)) + 1
        new_meta['resourceVersion'] = old['metadata']['resourceVersion']
        if new == old:
            return  # a no-op write keeps the resourceVersion, as the API server does
        new_meta['resourceVersion'] = self._next_resource_version()
        self.objects[key].history.append(new)
        if new_meta.get('deletionTimestamp') and not new_meta.get('finalizers'):
            await self._remove(key)
        else:
            await self._publish(key[0], 'MODIFIED', new)

    def _isolate_status(self, resource: kmock.resource, subresource: str | None,
                        old: dict[str, Any], patched: dict[str, Any]) -> dict[str, Any]:
        if not self._has_status_subresource(resource):
            return patched
        if subresource == 'status':
            new = copy.deepcopy(old)
            if 'status' in patched:
                new['status'] = patched['status']
            else:
                new.pop('status', None)
            return new
        new = copy.deepcopy(patched)
        if 'status' in old:
            new['status'] = copy.deepcopy(old['status'])
        else:
            new.pop('status', None)
        return new

    async def _delete(self, resource: kmock.resource, namespace: str | None, name: str,
                      grace: int | None = None) -> None:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        obj = self.objects[key].raw
        meta = obj.get('metadata', {})
        if (resource.group, resource.plural) == ('', 'pods'):
            grace = _pod_grace(obj, grace)
            if meta.get('deletionTimestamp'):
                if grace == 0 and not meta.get('finalizers'):
                    await self._remove(key)   # the kubelet's last word: its processes are gone
                return
            if grace > 0:   # a running pod: the kubelet sends SIGTERM and removes it when it is done
                new = copy.deepcopy(obj)
                new['metadata'].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=grace,
                                       resourceVersion=self._next_resource_version())
                self.objects[key].history.append(new)
                await self._publish(resource, 'MODIFIED', new)
                return
        if meta.get('deletionTimestamp'):
            return
        if meta.get('finalizers'):
            new = copy.deepcopy(obj)
            new['metadata']['deletionTimestamp'] = _now()
            new['metadata']['resourceVersion'] = self._next_resource_version()
            self.objects[key].history.append(new)
            await self._publish(resource, 'MODIFIED', new)
        else:
            await self._remove(key)

    async def _remove(self, key: tuple[kmock.resource, str | None, str]) -> None:
        """Delete for real, then collect dependents as the garbage collector would."""
        resource = key[0]
        last = copy.deepcopy(self.objects[key].raw)
        last['metadata']['resourceVersion'] = self._next_resource_version()
        self.objects[key].history.append(last)
        self.objects[key].delete()
        await self._publish(resource, 'DELETED', last)
        owner_uid = last['metadata'].get('uid')
        dependents = [
            dep_key for dep_key, dep in list(self.objects.items())
            if not dep.deleted
            if any(ref.get('uid') == owner_uid for ref in dep.raw.get('metadata', {}).get('ownerReferences', []))
        ]
        for dep_resource, dep_namespace, dep_name in dependents:
            await self._delete(dep_resource, dep_namespace, dep_name)

    async def _publish(self, resource: kmock.resource, event_type: str, obj: Mapping[str, Any]) -> None:
        if resource.group == rbac.RBAC_GROUP and resource.plural in rbac.RBAC_PLURALS:
            self.policy.observe(resource.plural, event_type, copy.deepcopy(dict(obj)))
        if resource.group == vap.GROUP and resource.plural in (vap.POLICIES, vap.BINDINGS):
            self.admission_policies.observe(resource.plural, event_type, copy.deepcopy(dict(obj)))
        if (resource.group, resource.version, resource.plural) == admission.WEBHOOK_CONFIGS:
            if event_type == 'DELETED':
                self._webhook_configs.pop(obj['metadata']['name'], None)
            else:
                self._webhook_configs[obj['metadata']['name']] = copy.deepcopy(dict(obj))
        version = int(obj['metadata']['resourceVersion'])
        self._watch_log.append(_LoggedEvent(version, resource, {'type': event_type, 'object': copy.deepcopy(obj)}))
        if len(self._watch_log) > WATCH_LOG_LIMIT:
            del self._watch_log[: len(self._watch_log) - WATCH_LOG_LIMIT]
        async with self._watch_changed:
            self._watch_changed.notify_all()

    # -- reads ----------------------------------------------------------------------------

    def _matching(self, request: rendering.Request) -> list[dict[str, Any]]:
        selector = _Selector.from_params(request.params)
        return [
            obj.raw for (resource, namespace, name), obj in self.objects.items()
            if resource == request.resource and not obj.deleted
            if request.namespace is None or namespace == request.namespace
            if request.name is None or name == request.name
            if selector.matches(obj.raw)
        ]

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = self._matching(request)
            version = str(self._last_resource_version)
        # Not .get(): kmock's ResourcesArray creates an entry on a missing key.
        info = self.resources[request.resource] if request.resource in self.resources else None  # noqa: SIM401
        kind = (info.kind if info and info.kind else request.resource.plural) + 'List'
        return {'apiVersion': 'v1', 'kind': kind, 'metadata': {'resourceVersion': version}, 'items': items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b''  # send the headers now, as kmock's own watch does, so clients see the stream open
        assert request.resource is not None
        selector = _Selector.from_params(request.params)
        since = request.params.get('resourceVersion', '')
        async with self._lock:
            if since in ('', '0'):
                # No resourceVersion: synthetic ADDED events for what exists now, then changes.
                initial = [{'type': 'ADDED', 'object': obj} for obj in self._matching(request)]
                cursor = self._last_resource_version
            else:
                cursor = int(since)
                oldest = self._watch_log[0].resource_version if self._watch_log else cursor + 1
                if cursor + 1 < oldest and cursor < self._last_resource_version:
                    gone = {'kind': 'Status', 'apiVersion': 'v1', 'status': 'Failure', 'code': 410,
                            'reason': 'Expired', 'message': f'too old resource version: {cursor}'}
                    yield {'type': 'ERROR', 'object': gone}
                    return
                initial = []
        for event in initial:
            yield event
        while True:
            for logged in self._events_after(cursor):
                cursor = logged.resource_version
                obj = logged.event['object']
                meta = obj.get('metadata', {})
                if logged.resource != request.resource:
                    continue
                if request.namespace is not None and meta.get('namespace') != request.namespace:
                    continue
                if request.name is not None and meta.get('name') != request.name:
                    continue
                if not selector.matches(obj):
                    continue
                yield logged.event
            async with self._watch_changed:
                if not self._events_after(cursor):
                    await self._watch_changed.wait()

    def _events_after(self, version: int) -> list[_LoggedEvent]:
        # The log is ordered by resourceVersion: bisect would be faster, but the log is scanned
        # from the end, where watchers almost always are.
        result: list[_LoggedEvent] = []
        for logged in reversed(self._watch_log):
            if logged.resource_version <= version:
                break
            result.append(logged)
        result.reverse()
        return result


def _admit_pod(obj: dict[str, Any], old: Mapping[str, Any] | None,
               hooks: Iterable[Callable[[dict[str, Any]], None]]) -> None:
    """Scheduling gates as kube-apiserver keeps them: set at creation (where other projects'
    webhooks add theirs), afterwards only removed; a gated pod is marked PodScheduled=False,
    reason SchedulingGated, and no scheduler (here: no pod runner) takes it until the last goes."""
    if old is None:
        for hook in hooks:
            hook(obj)
    gates = [gate.get('name') for gate in (obj.get('spec') or {}).get('schedulingGates') or []]
    if old is not None:
        before = {gate.get('name') for gate in (old.get('spec') or {}).get('schedulingGates') or []}
        added = [gate for gate in gates if gate not in before]
        if added:
            raise _error(422, 'Invalid', f'Pod "{obj["metadata"].get("name")}" is invalid: spec.schedulingGates: '
                                         f'Forbidden: only deletion is allowed, but found new scheduling gate '
                                         f'\'{added[0]}\'')
    _mark_gated(obj)


def _qos_class(pod: Mapping[str, Any]) -> str:
    """The pod's QoS class as kube-apiserver computes it (pkg/apis/core/helper/qos): Guaranteed
    when every container limits CPU and memory and requests (defaulted to the limits) equal them;
    BestEffort with no request or limit at all; Burstable otherwise."""
    spec = pod.get('spec') or {}
    containers = [*(spec.get('containers') or []), *(spec.get('initContainers') or [])]
    guaranteed, anything = True, False
    for container in containers:
        resources = container.get('resources') or {}
        limits, requests = resources.get('limits') or {}, resources.get('requests') or {}
        wanted = {name: value for name, value in {**limits, **requests}.items() if name in ('cpu', 'memory')}
        anything = anything or any(parse_quantity(value) != 0 for value in wanted.values())
        for name in ('cpu', 'memory'):
            if name not in limits or parse_quantity(requests.get(name, limits[name])) != parse_quantity(limits[name]):
                guaranteed = False
    if not anything:
        return 'BestEffort'
    return 'Guaranteed' if guaranteed else 'Burstable'


def _mark_gated(pod: dict[str, Any]) -> None:
    """PodScheduled=False/SchedulingGated while the pod has gates (the condition goes with the last)."""
    gated = bool((pod.get('spec') or {}).get('schedulingGates'))
    status = pod.get('status') or {}
    conditions = [c for c in status.get('conditions') or [] if not (c.get('type') == 'PodScheduled'
                                                                     and c.get('reason') == 'SchedulingGated')]
    if gated:
        conditions.append({'type': 'PodScheduled', 'status': 'False', 'reason': 'SchedulingGated',
                           'message': 'Scheduling is blocked due to non-empty scheduling gates'})
    if conditions != (status.get('conditions') or []):
        pod['status'] = {**status, 'conditions': conditions}


def _grace(request: rendering.Request) -> int | None:
    """The delete's gracePeriodSeconds: the query parameter, else the DeleteOptions body; None: the default."""
    raw = request.params.get('gracePeriodSeconds')
    if raw is None and isinstance(request.data, dict):
        raw = request.data.get('gracePeriodSeconds')
    try:
        return None if raw is None else max(0, int(raw))
    except (TypeError, ValueError):
        raise _error(400, 'BadRequest', f'gracePeriodSeconds must be an integer, got {raw!r}') from None


def _pod_grace(pod: Mapping[str, Any], requested: int | None) -> int:
    """kube-apiserver's rule: a pod no kubelet runs (not bound to a node) or one that has finished
    is deleted at once; otherwise the requested grace, else the pod's terminationGracePeriodSeconds."""
    spec, status = pod.get('spec') or {}, pod.get('status') or {}
    if not spec.get('nodeName') or status.get('phase') in ('Succeeded', 'Failed'):
        return 0
    if requested is not None:
        return requested
    default = spec.get('terminationGracePeriodSeconds')
    return default if isinstance(default, int) else 30


def _http_verb(request: rendering.Request) -> str:
    """A non-resource request's verb is the HTTP method, lower-cased (kube-apiserver's RequestInfo)."""
    return str(getattr(request.method, 'value', request.method)).lower()


def jsonpatch_merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, null deletes, the rest replaces.

    The jsonpatch package implements RFC 6902 only, and kmock's own merge keeps explicit
    nulls in lists, so this small function is the reference behaviour of the API server.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = jsonpatch_merge(result.get(key), value)
    return result


def _without_meta_and_status(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key not in ('metadata', 'status')}


_REQUIREMENT = re.compile(
    r'^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9._/-]+)\s*'
    r'(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$'
)


@attrs.frozen
class _Selector:
    """Label and field selectors as the API server parses them (equality and set-based)."""

    labels: tuple[tuple[str, str, frozenset[str]], ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> _Selector:
        return cls(labels=tuple(_parse_labels(params.get('labelSelector', ''))),
                   fields=tuple(_parse_fields(params.get('fieldSelector', ''))))

    def matches(self, obj: Mapping[str, Any]) -> bool:
        labels = obj.get('metadata', {}).get('labels') or {}
        for key, op, values in self.labels:
            present = key in labels
            if op == 'exists' and not present:
                return False
            if op == '!exists' and present:
                return False
            if op == 'in' and labels.get(key) not in values:
                return False
            if op == 'notin' and present and labels[key] in values:
                return False
        for path, op, value in self.fields:
            actual = _dig(obj, path.split('.'))
            if (op == '=') != (str(actual) == value if actual is not None else value == ''):
                return False
        return True


def _split_requirements(text: str) -> Iterable[str]:
    depth, start = 0, 0
    for index, char in enumerate(text):
        depth += char == '('
        depth -= char == ')'
        if char == ',' and depth == 0:
            yield text[start:index]
            start = index + 1
    if text[start:].strip():
        yield text[start:]


def _parse_labels(text: str) -> Iterable[tuple[str, str, frozenset[str]]]:
    for requirement in _split_requirements(text):
        match = _REQUIREMENT.match(requirement)
        if not match:
            raise _error(400, 'BadRequest', f'unable to parse requirement: {requirement!r}')
        key = match['key']
        if match['setop']:
            values = frozenset(v.strip() for v in match['values'].split(',') if v.strip())
            yield key, match['setop'], values
        elif match['op'] in ('=', '=='):
            yield key, 'in', frozenset({match['value']})
        elif match['op'] == '!=':
            yield key, 'notin', frozenset({match['value']})
        else:
            yield key, '!exists' if match['neg'] else 'exists', frozenset()


def _parse_fields(text: str) -> Iterable[tuple[str, str, str]]:
    for requirement in _split_requirements(text):
        path, op, value = re.split(r'(!=|==|=)', requirement.strip(), maxsplit=1)
        yield path.strip(), '!=' if op == '!=' else '=', value.strip()


def _dig(obj: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)
    return obj


def register_crd(emulator: kmock.KubernetesEmulator, crd: Mapping[str, Any]) -> None:
    """Serve a CustomResourceDefinition's resource in discovery and store the CRD itself."""
    spec = crd['spec']
    names = spec['names']
    for version in spec['versions']:
        if not version.get('served', True):
            continue
        key = f"{spec['group']}/{version['name']}/{names['plural']}"
        if isinstance(emulator, FaithfulEmulator):
            emulator.crd_schemas[spec['group'], version['name'], names['plural']] = (
                names['kind'], version['schema']['openAPIV3Schema'])
        emulator.resources[key] = kmock.ResourceInfo(
            kind=names['kind'],
            singular=names.get('singular', names['kind'].lower()),
            namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
            verbs={'create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'},
            shortnames=set(names.get('shortNames', [])),
            categories=set(names.get('categories', [])),
            subresources=set(version.get('subresources', {}) or {}),
        )
    crds = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
    stored = copy.deepcopy(dict(crd))
    stored.setdefault('metadata', {}).update(uid=str(uuid.uuid4()), resourceVersion='1', generation=1)
    emulator.objects[crds, None, crd['metadata']['name']] = stored

