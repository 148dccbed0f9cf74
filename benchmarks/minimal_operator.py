"""The baseline for the operator's CPU per run: the least a kopf operator can do for a run.

One handler: on creation, create one pod (with the official client, as trainguard does) and
write one status (phase Running, through kopf's own status patch). No rewrite, no heartbeat
mirroring, no gangs, no sweep. ``benchmarks/operator_scale.py`` runs it against the same
emulator as trainguard, interleaved, and prints trainguard's CPU per run as a ratio to it.

Run: ``kopf run --standalone -A benchmarks/minimal_operator.py`` (KUBECONFIG set).
"""

from __future__ import annotations

from typing import Any

import kopf
import kubernetes


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.enabled = False                       # trainguard posts its own Events, few
    settings.watching.server_timeout = 300
    memo.core = kubernetes.client.CoreV1Api(kubernetes.config.new_client_from_config())


@kopf.on.create('trainguard.io', 'v1alpha1', 'trainingruns')
def create_pod(name: str, namespace: str, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
    memo.core.create_namespaced_pod(namespace, {
        'apiVersion': 'v1', 'kind': 'Pod', 'metadata': {'name': f'{name}-1', 'namespace': namespace},
        'spec': {'restartPolicy': 'Never', 'containers': [{'name': 'trainer', 'image': 'trainer'}]}})
    patch.status['phase'] = 'Running'
