"""The sandbox: emulated API server + the real operator + local trainer processes, in one process.

A development sandbox, not a cluster: no scheduler, no resource limits. RBAC is enforced as
on a cluster: the operator runs as the ServiceAccount of manifests/rbac with exactly its
ClusterRole, and each trainer process with a token of its pod's ServiceAccount, bound to the
pod as the kubelet's is (the namespace's shared trainer identity, which the trainer policy
limits to the pod's own run); ``kubeconfig`` in the work folder is the cluster admin's, for you.
Production is a real cluster (see README, "Install on a cluster").
"""

from __future__ import annotations

import asyncio
import os
import pathlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import kopf
import yaml

from trainguard.domain.config import config_from_env
from trainguard_sandbox.cluster import (
    emulated_cluster,
    install_identity,
    manifests_operator_rbac,
    trainer_policy,
    write_kubeconfig,
)
from trainguard_sandbox.emulator import FaithfulEmulator
from trainguard_sandbox.inprocess import OperatorRunner
from trainguard_sandbox.pods import LocalPodRunner

RUNS_PATH = '/apis/trainguard.io/v1alpha1/namespaces/{namespace}/trainingruns'


class Sandbox:
    def __init__(self, workdir: pathlib.Path, *, port: int | None = None, sweep_seconds: int = 2,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.kubeconfig = workdir / 'kubeconfig'
        self._port = port
        self._env = {'TRAINGUARD_SWEEP_SECONDS': str(sweep_seconds), **(env or {})}
        self._cluster: Any = None
        self.emulator: FaithfulEmulator | None = None
        self.runner: LocalPodRunner | None = None
        self.operator: OperatorRunner | None = None
        self._runner_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sandbox:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._cluster = emulated_cluster(self.kubeconfig, port=self._port)
        self.emulator = await self._cluster.__aenter__()
        # As `kubectl apply -k manifests/default` on 1.30+: with the trainer policy, so trainers
        # share one identity per namespace, each token limited to its own pod's run.
        _, token = await install_identity(self.emulator, manifests_operator_rbac() + trainer_policy())
        # The operator's login and client read KUBECONFIG: its ServiceAccount, not the admin.
        os.environ['KUBECONFIG'] = str(write_kubeconfig(self.workdir / 'operator.kubeconfig', self.api_url,
                                                        token=token))
        self.runner = LocalPodRunner(self.api_url, self.kubeconfig, self.workdir, pod_kubeconfig=self._pod_kubeconfig)
        self._runner_task = asyncio.create_task(self.runner.run_forever())
        config = config_from_env({**os.environ, **self._env})
        self.operator = OperatorRunner(kopf.Memo(config=config))
        await self.operator.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self.operator is not None:
            await self.operator.stop()
        if self._runner_task is not None:
            self._runner_task.cancel()
            await asyncio.gather(self._runner_task, return_exceptions=True)
        if self.runner is not None:
            await self.runner.close()
        await self._cluster.__aexit__(exc_type, exc, traceback)

    def _pod_kubeconfig(self, pod: Mapping[str, Any]) -> pathlib.Path:
        """What the kubelet mounts into a pod: a token of its ServiceAccount, bound to the pod."""
        assert self.emulator is not None
        namespace, account = pod['metadata']['namespace'], pod['spec'].get('serviceAccountName') or 'default'
        path = self.workdir / 'tokens' / f'{namespace}.{pod["metadata"]["name"]}.kubeconfig'
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_kubeconfig(path, self.api_url, namespace=namespace, token=self.emulator.mint_token(
            namespace, account, pod=(pod['metadata']['name'], pod['metadata']['uid'])))

    @property
    def api_url(self) -> str:
        assert self.emulator is not None
        return str(self.emulator.servers[0].url).rstrip('/')

    async def apply(self, run: dict[str, Any], namespace: str = 'default') -> dict[str, Any]:
        assert self.emulator is not None
        async with self.emulator.post(RUNS_PATH.format(namespace=namespace), json=run) as response:
            body = await response.json()
            if response.status >= 400:
                raise RuntimeError(f'could not create {run["metadata"]["name"]}: {body.get("message")}')
            return body

    async def patch(self, name: str, patch: dict[str, Any], namespace: str = 'default') -> dict[str, Any]:
        """A JSON merge patch of a run, as ``kubectl patch --type merge`` sends it."""
        assert self.emulator is not None
        async with self.emulator.patch(RUNS_PATH.format(namespace=namespace) + f'/{name}', json=patch,
                                       headers={'Content-Type': 'application/merge-patch+json'}) as response:
            body = await response.json()
            if response.status >= 400:
                raise RuntimeError(f'could not patch {name}: {body.get("message")}')
            return body

    async def evict(self, pod: str, namespace: str = 'default') -> None:
        """What `kubectl drain` does to each pod: the Eviction API (DisruptionTarget, graceful delete)."""
        assert self.emulator is not None
        async with self.emulator.post(f'/api/v1/namespaces/{namespace}/pods/{pod}/eviction', json={
                'apiVersion': 'policy/v1', 'kind': 'Eviction', 'metadata': {'name': pod, 'namespace': namespace}},
                ) as response:
            if response.status >= 400:
                raise RuntimeError(f'could not evict {pod}: {(await response.json()).get("message")}')

    async def get(self, path: str) -> dict[str, Any] | None:
        """Any object by its API path (e.g. a run's Service), None when absent."""
        assert self.emulator is not None
        async with self.emulator.get(path) as response:
            return await response.json() if response.status == 200 else None

    async def runs(self, namespace: str = 'default') -> list[dict[str, Any]]:
        assert self.emulator is not None
        async with self.emulator.get(RUNS_PATH.format(namespace=namespace)) as response:
            return (await response.json())['items']

    async def run(self, name: str, namespace: str = 'default') -> dict[str, Any] | None:
        assert self.emulator is not None
        async with self.emulator.get(RUNS_PATH.format(namespace=namespace) + f'/{name}') as response:
            return await response.json() if response.status == 200 else None

    async def events(self, name: str, namespace: str = 'default') -> list[dict[str, Any]]:
        assert self.emulator is not None
        async with self.emulator.get(f'/api/v1/namespaces/{namespace}/events') as response:
            items = (await response.json())['items']
        return [event for event in items if event['involvedObject'].get('name') == name]


def load_manifest(path: pathlib.Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding='utf-8'))
