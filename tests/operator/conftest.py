"""The operator tier: the real kopf operator, in-process, over HTTP against the faithful emulator."""

from __future__ import annotations

import asyncio
import datetime
import pathlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import kopf
import pytest

from tests.operator.identities import manifests_rbac
from trainguard_sandbox.cluster import emulated_cluster, install_identity, write_kubeconfig
from trainguard_sandbox.emulator import FaithfulEmulator
from trainguard_sandbox.inprocess import OperatorRunner

RUNS = kmock.resource('trainguard.io', 'v1alpha1', 'trainingruns')
PODS = kmock.resource('', 'v1', 'pods')
EVENTS = kmock.resource('', 'v1', 'events')
NAMESPACE = 'default'


@pytest.fixture()
def operator_rbac() -> list[dict[str, Any]]:
    """The install whose ServiceAccount the operator runs as; a module overrides it (the chart
    with the webhook on, with replicas) where its operator needs what that install grants."""
    return manifests_rbac()


@pytest.fixture()
async def cluster(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, operator_rbac: list[dict[str, Any]],
                  request: pytest.FixtureRequest) -> AsyncIterator[FaithfulEmulator]:
    async with emulated_cluster(tmp_path / 'admin.kubeconfig', namespaces=(NAMESPACE, 'other')) as emulator:
        # The operator (in-process or a subprocess) logs in with KUBECONFIG: its install's
        # ServiceAccount token, authorized by the emulator against that install's RBAC.
        user, token = await install_identity(emulator, operator_rbac)
        url = str(emulator.servers[0].url).rstrip('/')
        monkeypatch.setenv('KUBECONFIG', str(write_kubeconfig(tmp_path / 'kubeconfig', url, token=token)))
        # Most tests follow a run through Pending with a pod that never starts: its first status
        # is written at once here; tests/operator/test_rbac_and_budget.py covers the grace.
        monkeypatch.setenv('TRAINGUARD_FIRST_STATUS_GRACE_SECONDS', '0')
        yield emulator
        refused = [message for who, _, message in emulator.refusals if who.name == user]
        if not request.node.get_closest_marker('operator_refusals_expected'):
            assert refused == [], 'the API refused the operator (its RBAC misses a rule):\n' + '\n'.join(refused)


class Api:
    """Test-side client: talks HTTP to the emulator like kubectl would."""

    def __init__(self, emulator: FaithfulEmulator) -> None:
        self.emulator = emulator

    @staticmethod
    def _url(resource: kmock.resource, namespace: str | None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f'/api/{resource.version}' if not resource.group else f'/apis/{resource.group}/{resource.version}'
        url = base + (f'/namespaces/{namespace}' if namespace else '') + f'/{resource.plural}'
        url += f'/{name}' if name else ''
        url += f'/{subresource}' if subresource else ''
        return url

    async def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        async with self.emulator.request(method, url, **kwargs) as response:
            payload = await response.json()
            if response.status >= 400:
                raise AssertionError(f'{method} {url} -> {response.status}: {payload.get("message")}')
            return payload

    async def create(self, body: dict[str, Any], resource: kmock.resource = RUNS,
                     namespace: str = NAMESPACE) -> dict[str, Any]:
        return await self._json('post', self._url(resource, namespace), json=body)

    async def get(self, name: str, resource: kmock.resource = RUNS, namespace: str = NAMESPACE) -> dict[str, Any]:
        return await self._json('get', self._url(resource, namespace, name))

    async def find(self, name: str, resource: kmock.resource = RUNS,
                   namespace: str = NAMESPACE) -> dict[str, Any] | None:
        async with self.emulator.get(self._url(resource, namespace, name)) as response:
            return await response.json() if response.status == 200 else None

    async def list(self, resource: kmock.resource, namespace: str = NAMESPACE, **params: str) -> list[dict[str, Any]]:
        return (await self._json('get', self._url(resource, namespace), params=params))['items']

    async def patch(self, name: str, patch: Any, resource: kmock.resource = RUNS, namespace: str = NAMESPACE,
                    subresource: str | None = None, content_type: str = 'application/merge-patch+json',
                    ) -> dict[str, Any]:
        return await self._json('patch', self._url(resource, namespace, name, subresource), json=patch,
                                headers={'Content-Type': content_type})

    async def delete(self, name: str, resource: kmock.resource = RUNS, namespace: str = NAMESPACE) -> None:
        await self._json('delete', self._url(resource, namespace, name))

    async def wait_for(self, predicate: Callable[[], Any], *, timeout: float = 60, what: str = '') -> Any:
        """Poll (in loop time, fast under looptime) until predicate() returns a truthy value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f'timed out after {timeout}s waiting for {what or predicate}')
            await asyncio.sleep(1.0)

    async def wait_for_run(self, name: str, predicate: Callable[[dict[str, Any]], bool], *,
                           timeout: float = 60, what: str = '') -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            run = await self.find(name)
            return run if run is not None and predicate(run) else None
        return await self.wait_for(check, timeout=timeout, what=what or f'run {name}')


@pytest.fixture()
def api(cluster: FaithfulEmulator) -> Api:
    return Api(cluster)


class LoopClock:
    """Wall-clock time that advances with the event loop's (looptime-faked) time."""

    def __init__(self) -> None:
        self._origin = datetime.datetime(2026, 11, 25, 12, 0, 0, tzinfo=datetime.UTC)
        self._loop = asyncio.get_running_loop()

    def __call__(self) -> datetime.datetime:
        return self._origin + datetime.timedelta(seconds=self._loop.time())


@pytest.fixture()
async def clock() -> LoopClock:
    return LoopClock()


@pytest.fixture()
def operator_memo(clock: LoopClock) -> kopf.Memo:
    """What the operator's startup handler would build from the environment, with test overrides."""
    return kopf.Memo(clock=clock)


@pytest.fixture()
async def operator(cluster: FaithfulEmulator, operator_memo: kopf.Memo) -> AsyncIterator[OperatorRunner]:
    """The operator, not yet started: tests start it themselves.

    looptime fast-forwards only the test's own execution, not fixtures; timers the operator
    schedules during fixture setup would be set on the real clock and never fire in loop time.
    """
    runner = OperatorRunner(operator_memo)
    try:
        yield runner
    finally:
        await runner.stop()
