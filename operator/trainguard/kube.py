"""The one module that talks to the Kubernetes API (besides kopf's own watching).

Handlers and the sweeper call these blocking functions from worker threads (kopf runs
sync handlers in its executor), never on the event loop, where the blocking client would
deadlock against the same loop's API emulator in tests.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes
import urllib3
from kubernetes.client import ApiException

from trainguard import GROUP, PLURAL, VERSION
from trainguard.domain.heartbeat import format_time

log = logging.getLogger(__name__)
MERGE_PATCH = 'application/merge-patch+json'
_PATHS = {  # the collection each child kind is created in
    'Pod': '/api/v1/namespaces/{namespace}/pods',
    'Service': '/api/v1/namespaces/{namespace}/services',
    'ServiceAccount': '/api/v1/namespaces/{namespace}/serviceaccounts',
    'Role': '/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles',
    'RoleBinding': '/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings',
    'Event': '/api/v1/namespaces/{namespace}/events',
}
_RUN = f'/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}/{{name}}'
_MUTATING_CONFIGS = '/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations'
# Answers that mean no API server is there to answer (a proxy or load balancer in front of it).
_UNAVAILABLE = frozenset({502, 503, 504})


class KubeApi:
    """Typed calls for exactly what trainguard does; objects go in and come out as plain dicts.

    Every call goes through the official client's ``ApiClient`` (configuration, credentials
    and their refresh, TLS, connection pool, ``ApiException``) but not through its generated
    per-operation methods: those validate their arguments with pydantic, turning a pod dict
    into a full ``V1Pod`` model only to serialise it back, and deserialise responses into
    models. Profiled at a 200-run burst (benchmarks/README.md), that was most of the client's
    CPU. Responses are read as JSON: the models also refuse objects with fields they consider
    required but a server left out (a kubelet that has not reported ``imageID`` yet).
    """

    def __init__(self, client: kubernetes.client.ApiClient, *, timeout: tuple[float, float] = (5.0, 30.0)) -> None:
        self.client = client
        self.timeout = timeout   # (connect, read) for every request: an API that hangs must not hold a worker
        # Told whether each request found an API that answers (trainguard.domain.observer):
        # True for any HTTP answer but 502-504; False for no connection, a timeout, or those.
        self.on_contact: Callable[[bool], None] = lambda answered: None

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In a pod: the service account; elsewhere: $KUBECONFIG, read now (not at import)."""
        if os.environ.get('KUBERNETES_SERVICE_HOST'):
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return cls(kubernetes.client.ApiClient(configuration))
        config_file = os.environ.get('KUBECONFIG') or os.path.expanduser('~/.kube/config')
        return cls(kubernetes.config.new_client_from_config(config_file=config_file))

    def _call(self, method: str, path: str, body: Any = None, *, content_type: str = 'application/json',
              query: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
        """One request; raises ApiException (with ``status``) for a non-2xx answer."""
        headers = {'Accept': 'application/json', **({'Content-Type': content_type} if body is not None else {})}
        request = self.client.param_serialize(method, path, query_params=query or [], body=body,
                                              auth_settings=['BearerToken'], header_params=headers)
        try:
            response = self.client.call_api(*request, _request_timeout=self.timeout)
            data = response.read()  # the whole body: it also hands the connection back to the pool
        except (urllib3.exceptions.HTTPError, OSError):
            self.on_contact(False)
            raise
        self.on_contact(response.status not in _UNAVAILABLE)
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=data.decode('utf-8', 'replace'), data=None)
        return json.loads(data)

    def probe(self) -> bool:
        """Whether the API answers now (GET /version: every identity may read it)."""
        try:
            self._call('GET', '/version')
        except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError):
            return False
        return True

    def trainer_policy_installed(self, name: str) -> bool:
        """Whether the ValidatingAdmissionPolicy ``name`` and its binding of the same name exist.
        No (404: absent, or a server before 1.30 without the API) and unreadable (403) alike
        answer False: the caller then falls back to the identity that needs no policy."""
        base = '/apis/admissionregistration.k8s.io/v1'
        try:
            self._call('GET', f'{base}/validatingadmissionpolicies/{name}')
            self._call('GET', f'{base}/validatingadmissionpolicybindings/{name}')
        except ApiException as error:
            log.info('ValidatingAdmissionPolicy %s or its binding: %s %s', name, error.status, error.reason)
            return False
        return True

    def create_if_absent(self, body: Mapping[str, Any]) -> bool:
        """Create a child; an existing one (a handler that ran twice) is left as it is."""
        path = _PATHS[body['kind']].format(namespace=body['metadata']['namespace'])
        try:
            self._call('POST', path, dict(body))
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def register_mutating_webhooks(self, configuration: Mapping[str, Any]) -> None:
        """Make the named MutatingWebhookConfiguration hold these webhooks: patch, or create when absent.

        Patch first: after the first start the object exists, so a restart costs one request,
        and RBAC can limit ``patch`` to this one name (``create`` cannot be limited by name).
        """
        name = configuration['metadata']['name']
        patch = {'webhooks': configuration['webhooks']}
        for _ in range(3):   # absent -> create; created meanwhile by a peer (409) -> patch again
            try:
                self._call('PATCH', f'{_MUTATING_CONFIGS}/{name}', patch, content_type=MERGE_PATCH)
                return
            except ApiException as error:
                if error.status != 404:
                    raise
            try:
                self._call('POST', _MUTATING_CONFIGS, dict(configuration))
                return
            except ApiException as error:
                if error.status != 409:
                    raise
        raise RuntimeError(f'MutatingWebhookConfiguration {name} kept appearing and disappearing')

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call('GET', f'/api/v1/namespaces/{namespace}/pods/{name}')
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def delete_pod(self, namespace: str, name: str, *, graceful: bool = False) -> bool:
        """At once (a hung pod: nothing to save), or ``graceful``: with the pod's own grace period,
        so the trainer gets SIGTERM, saves a checkpoint and exits before SIGKILL."""
        try:
            self._call('DELETE', f'/api/v1/namespaces/{namespace}/pods/{name}',
                       query=[] if graceful else [('gracePeriodSeconds', 0)])
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def read_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call('GET', _RUN.format(namespace=namespace, name=name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_run(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self._call('PATCH', _RUN.format(namespace=namespace, name=name), dict(patch), content_type=MERGE_PATCH)

    def patch_run_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        return self._call('PATCH', _RUN.format(namespace=namespace, name=name) + '/status', {'status': dict(status)},
                          content_type=MERGE_PATCH)

    def post_event(self, run: Mapping[str, Any], event_type: str, reason: str, message: str,
                   now: datetime.datetime) -> None:
        """A core/v1 Event on the run; failures are logged, never raised (events are best effort)."""
        metadata = run.get('metadata') or {}
        self._post_event({'apiVersion': f'{GROUP}/{VERSION}', 'kind': 'TrainingRun', 'name': metadata.get('name'),
                          'namespace': metadata.get('namespace'), 'uid': metadata.get('uid')},
                         event_type, reason, message, now)

    def post_pod_event(self, namespace: str, name: str, event_type: str, reason: str, message: str,
                       now: datetime.datetime) -> bool:
        """An Event on a Pod (the operator's own, for problems that concern no run); posted or not."""
        return self._post_event({'apiVersion': 'v1', 'kind': 'Pod', 'name': name, 'namespace': namespace},
                                event_type, reason, message, now)

    def _post_event(self, involved: Mapping[str, Any], event_type: str, reason: str, message: str,
                    now: datetime.datetime) -> bool:
        stamp = format_time(now)
        body = {
            'apiVersion': 'v1', 'kind': 'Event',
            'metadata': {'generateName': f'{involved.get("name") or "trainguard"}.',
                         'namespace': involved.get('namespace')},
            'involvedObject': dict(involved),
            'type': event_type, 'reason': reason, 'message': message[:1024],
            'source': {'component': 'trainguard'}, 'reportingComponent': 'trainguard.io/operator',
            'reportingInstance': os.environ.get('HOSTNAME', 'trainguard'),
            'firstTimestamp': stamp, 'lastTimestamp': stamp, 'count': 1,
        }
        try:
            self._call('POST', _PATHS['Event'].format(namespace=involved.get('namespace')), body)
        except (ApiException, ValueError, urllib3.exceptions.HTTPError, OSError) as error:
            log.warning('could not post event %s on %s: %s', reason, involved.get('name'), error)
            return False
        return True
