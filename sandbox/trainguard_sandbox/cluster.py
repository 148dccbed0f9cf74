"""An emulated cluster on localhost: the faithful emulator, served over HTTP, with a kubeconfig.

Used by the operator test tier and by ``trainguard-operator sandbox``; both run the real
operator over HTTP against it.
"""

from __future__ import annotations

import pathlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import kmock
import yaml

from trainguard_sandbox.emulator import FaithfulEmulator, register_crd

# manifests/ is a link to the repository's manifests/ (one source); wheels carry a copy as package data.
CRD_PATH = pathlib.Path(__file__).parent / 'manifests' / 'crd' / 'trainingruns.trainguard.io.yaml'


def load_crd(path: pathlib.Path = CRD_PATH) -> dict[str, Any]:
    with path.open(encoding='utf-8') as file:
        return yaml.safe_load(file)


def write_kubeconfig(path: pathlib.Path, server_url: str, namespace: str = 'default',
                     token: str | None = None) -> pathlib.Path:
    """A kubeconfig with this bearer token; without one, the emulator's cluster admin."""
    config = {
        'apiVersion': 'v1',
        'kind': 'Config',
        'clusters': [{'name': 'sandbox', 'cluster': {'server': server_url}}],
        'users': [{'name': 'sandbox', 'user': {'token': token} if token else {}}],
        'contexts': [{'name': 'sandbox', 'context': {'cluster': 'sandbox', 'user': 'sandbox',
                                                      'namespace': namespace}}],
        'current-context': 'sandbox',
    }
    path.write_text(yaml.safe_dump(config), encoding='utf-8')
    return path


SYSTEM_NAMESPACE = 'trainguard-system'
RBAC_DIR = pathlib.Path(__file__).parent / 'manifests' / 'rbac'
_PLURALS = {'ServiceAccount': 'serviceaccounts', 'ClusterRole': 'clusterroles', 'Role': 'roles',
            'ClusterRoleBinding': 'clusterrolebindings', 'RoleBinding': 'rolebindings', 'Namespace': 'namespaces',
            'ValidatingAdmissionPolicy': 'validatingadmissionpolicies',
            'ValidatingAdmissionPolicyBinding': 'validatingadmissionpolicybindings'}


def trainer_policy() -> list[dict[str, Any]]:
    """manifests/rbac/trainer_policy.yaml: the policy (and its binding) that narrows the trainers'
    shared per-namespace identity to each pod's own run (trainguard.domain.identity)."""
    return [doc for doc in yaml.safe_load_all((RBAC_DIR / 'trainer_policy.yaml').read_text(encoding='utf-8')) if doc]


def manifests_operator_rbac(namespace: str = SYSTEM_NAMESPACE) -> list[dict[str, Any]]:
    """The operator's ServiceAccount, ClusterRole and binding from manifests/rbac, as kustomize
    places them (manifests/default sets the namespace)."""
    docs = [yaml.safe_load((RBAC_DIR / name).read_text(encoding='utf-8'))
            for name in ('service_account.yaml', 'role.yaml', 'role_binding.yaml')]
    for doc in docs:
        if doc['kind'] == 'ServiceAccount':
            doc['metadata']['namespace'] = namespace
        for subject in doc.get('subjects') or []:
            subject['namespace'] = namespace
    return docs


async def apply_objects(emulator: FaithfulEmulator, docs: list[dict[str, Any]]) -> None:
    """Create these objects as the cluster admin (as ``kubectl apply`` of an install would)."""
    for doc in docs:
        version = doc['apiVersion']
        path = f'/api/{version}' if '/' not in version else f'/apis/{version}'
        namespace = (doc.get('metadata') or {}).get('namespace')
        path += (f'/namespaces/{namespace}' if namespace else '') + f'/{_PLURALS[doc["kind"]]}'
        async with emulator.post(path, json=doc) as response:
            if response.status >= 300:
                raise RuntimeError(f'could not create {doc["kind"]} {doc["metadata"]["name"]}: '
                                   f'{(await response.json()).get("message")}')


async def install_identity(emulator: FaithfulEmulator, docs: list[dict[str, Any]]) -> tuple[str, str]:
    """Apply an install's RBAC (one ServiceAccount among the objects); its user name and a token for it."""
    await apply_objects(emulator, docs)
    account = next(doc['metadata'] for doc in docs if doc['kind'] == 'ServiceAccount')
    return (f'system:serviceaccount:{account["namespace"]}:{account["name"]}',
            emulator.mint_token(account['namespace'], account['name']))


@asynccontextmanager
async def emulated_cluster(
        kubeconfig: pathlib.Path,
        *,
        namespaces: tuple[str, ...] = ('default',),
        port: int | None = None,
        crd: dict[str, Any] | None = None,
        emulator: FaithfulEmulator | None = None,
) -> AsyncIterator[FaithfulEmulator]:
    """Serve the emulator on 127.0.0.1 with the bundled core resources and the TrainingRun CRD."""
    emulator = FaithfulEmulator() if emulator is None else emulator  # kmock handlers are falsy while empty
    emulator.resources.load_bundled()  # without core resources (namespaces) kopf stalls at start-up
    register_crd(emulator, crd or load_crd())
    ns_resource = kmock.resource('', 'v1', 'namespaces')
    for namespace in namespaces:
        emulator.objects[ns_resource, None, namespace] = {
            'apiVersion': 'v1', 'kind': 'Namespace',
            'metadata': {'name': namespace, 'uid': f'ns-{namespace}', 'resourceVersion': '1'},
        }
    async with emulator, kmock.Server(emulator, port=port) as server:
        write_kubeconfig(kubeconfig, str(server.url).rstrip('/'))
        yield emulator


def free_port() -> int:
    """A TCP port free on loopback now (the kernel's pick; free again once the probe closes)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return int(probe.getsockname()[1])
