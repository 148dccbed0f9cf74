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
from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes.client import ApiException

from trainguard import GROUP, PLURAL, VERSION
from trainguard.domain.heartbeat import format_time

log = logging.getLogger(__name__)
MERGE_PATCH = 'application/merge-patch+json'


def _json(response: Any) -> dict[str, Any]:
    """Read the whole body: it also hands the connection back to the pool."""
    return json.loads(response.data)


class KubeApi:
    """Typed calls for exactly what trainguard does; objects go in and come out as plain dicts.

    Responses are read as JSON, not as the client's pydantic models (``_preload_content=False``):
    the models refuse objects with fields they consider required but a server left out (a
    kubelet that has not reported ``imageID`` yet), and a refused response after a successful
    delete would leave the run's status unwritten.
    """

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.client = client
        self.core = kubernetes.client.CoreV1Api(client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In a pod: the service account; elsewhere: $KUBECONFIG, read now (not at import)."""
        if os.environ.get('KUBERNETES_SERVICE_HOST'):
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return cls(kubernetes.client.ApiClient(configuration))
        config_file = os.environ.get('KUBECONFIG') or os.path.expanduser('~/.kube/config')
        return cls(kubernetes.config.new_client_from_config(config_file=config_file))

    def create_if_absent(self, body: Mapping[str, Any]) -> bool:
        """Create a child; an existing one (a handler that ran twice) is left as it is."""
        namespace = body['metadata']['namespace']
        create = {
            'Pod': self.core.create_namespaced_pod,
            'Service': self.core.create_namespaced_service,
            'ServiceAccount': self.core.create_namespaced_service_account,
            'Role': self.rbac.create_namespaced_role,
            'RoleBinding': self.rbac.create_namespaced_role_binding,
        }[body['kind']]
        try:
            _json(create(namespace, dict(body), _preload_content=False))
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    def read_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(self.core.read_namespaced_pod(name, namespace, _preload_content=False))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def delete_pod(self, namespace: str, name: str) -> bool:
        try:
            _json(self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0, _preload_content=False))
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def patch_run(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, dict(patch), _content_type=MERGE_PATCH)

    def patch_run_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {'status': dict(status)}, _content_type=MERGE_PATCH)

    def post_event(self, run: Mapping[str, Any], event_type: str, reason: str, message: str,
                   now: datetime.datetime) -> None:
        """A core/v1 Event on the run; failures are logged, never raised (events are best effort)."""
        metadata = run.get('metadata') or {}
        self._post_event({'apiVersion': f'{GROUP}/{VERSION}', 'kind': 'TrainingRun', 'name': metadata.get('name'),
                          'namespace': metadata.get('namespace'), 'uid': metadata.get('uid')},
                         event_type, reason, message, now)

    def post_pod_event(self, namespace: str, name: str, event_type: str, reason: str, message: str,
                       now: datetime.datetime) -> None:
        """An Event on a Pod (the operator's own, for problems that concern no run)."""
        self._post_event({'apiVersion': 'v1', 'kind': 'Pod', 'name': name, 'namespace': namespace},
                         event_type, reason, message, now)

    def _post_event(self, involved: Mapping[str, Any], event_type: str, reason: str, message: str,
                    now: datetime.datetime) -> None:
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
            self.core.create_namespaced_event(involved.get('namespace'), body)
        except (ApiException, ValueError) as error:
            log.warning('could not post event %s on %s: %s', reason, involved.get('name'), error)
