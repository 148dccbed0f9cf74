"""An emulated cluster on localhost: the faithful emulator, served over HTTP, with a kubeconfig.

Used by the operator test tier and by ``trainguard-operator sandbox``; both run the real
operator over HTTP against it.
"""

from __future__ import annotations

import pathlib
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


def write_kubeconfig(path: pathlib.Path, server_url: str, namespace: str = 'default') -> pathlib.Path:
    """A kubeconfig with no credentials: the emulator accepts every request."""
    config = {
        'apiVersion': 'v1',
        'kind': 'Config',
        'clusters': [{'name': 'sandbox', 'cluster': {'server': server_url}}],
        'users': [{'name': 'sandbox', 'user': {}}],
        'contexts': [{'name': 'sandbox', 'context': {'cluster': 'sandbox', 'user': 'sandbox',
                                                      'namespace': namespace}}],
        'current-context': 'sandbox',
    }
    path.write_text(yaml.safe_dump(config), encoding='utf-8')
    return path


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
