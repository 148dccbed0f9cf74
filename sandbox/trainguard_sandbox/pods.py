"""The sandbox's stand-in for a kubelet: every trainer Pod becomes a local trainer process.

Development only. For each pod the operator creates, it starts
``python -m trainguard_trainer`` (or, for a pod whose command is ``torchrun``,
``python -m torch.distributed.run``) with the pod's args and env and a kubeconfig that points at
the emulator, and reports the pod's life through the status subresource: Pending, then
Running once the process started, then Succeeded or Failed by exit code (137 reported as
OOMKilled would be a lie, so a kill is reported as Error with its code). It binds each pod
to a node first, as the scheduler would, so a deletion is graceful as on a cluster: when the
pod is marked for deletion, its main process gets SIGTERM, and SIGKILL (its whole tree) if it
is still running after the deletion's grace period; then the pod object is removed. A pod
deleted at once (grace 0) has its processes killed at once. Each pod's output goes to
``<workdir>/pods/<namespace>/<pod>.log``; volumes become folders under
``<workdir>/volumes``. As on a node, a pod *instance* is its UID, not its name: a claim keeps
its folder across attempts (so a retry can resume), while an emptyDir is fresh for every pod
UID, so a new pod that reuses a deleted pod's name inherits nothing from it.

Multi-node runs: every "node" is this machine, so the master's DNS name
(``<rank-0 hostname>.<service>``) maps to loopback and each gang gets its own free port, as
separate pods on separate nodes would not collide. A pod's processes are its whole process
tree (torchrun starts its workers in sessions of their own), and all of it dies with the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import pathlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import psutil

from trainguard_sandbox.cluster import free_port

log = logging.getLogger(__name__)
NODE_NAME = 'sandbox'   # the one "node" this runner is the scheduler and kubelet of
POD_SELECTOR = 'app.kubernetes.io/managed-by=trainguard'
STATUS_RETRY_SECONDS = 2.0   # how often a status the API could not take is sent again


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


PodKey = tuple[str, str]  # (namespace, name)


@dataclasses.dataclass
class PodInstance:
    """One started pod: a name may be reused by a later pod, its UID and process may not."""

    namespace: str
    name: str
    uid: str
    pid: int
    killed: bool = False
    exited: bool = False         # its process ended (by itself, e.g. after SIGTERM, or killed)
    tree: tuple[int, ...] = ()   # the processes killed with it (launcher workers run in their own sessions)

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def pod_processes_gone(instance: PodInstance) -> bool:
    """The pod's process group and every process of its tree are gone (zombies count as gone)."""
    if not process_group_gone(instance.pid):
        return False
    for pid in instance.tree:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def process_group_gone(pid: int) -> bool:
    """True when no process of the pod's process group (trainer and DataLoader workers) runs.

    Zombies count as gone: they hold no memory or CPU, only a table entry until reaped.
    """
    for process in psutil.process_iter(['pid']):
        try:
            if os.getpgid(process.pid) == pid and process.status() != psutil.STATUS_ZOMBIE:
                return False
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return True


class LocalPodRunner:
    """``headers``/``ssl`` authenticate the runner itself (a real API server); ``pod_kubeconfig``
    gives each trainer the credentials of its pod's ServiceAccount (default: ``kubeconfig``);
    ``namespace`` limits it to one namespace (on a shared server, where other tests' pods stay:
    envtest has no garbage collector to delete a deleted run's pods)."""

    def __init__(self, api_url: str, kubeconfig: pathlib.Path, workdir: pathlib.Path,
                 poll_seconds: float = 0.25, *, headers: Mapping[str, str] | None = None,
                 ssl: Any = None, pod_kubeconfig: Callable[[Mapping[str, Any]], pathlib.Path] | None = None,
                 namespace: str | None = None) -> None:
        self._api = api_url.rstrip('/')
        self._pods_path = f'/api/v1/namespaces/{namespace}/pods' if namespace else '/api/v1/pods'
        self._kubeconfig = kubeconfig
        self._headers = dict(headers or {})
        self._ssl = ssl
        self._pod_kubeconfig = pod_kubeconfig
        self._short_tmp = pathlib.Path(tempfile.mkdtemp(prefix='tgpods-'))  # removed by close()
        self._workdir = workdir
        self._poll = poll_seconds
        self.processes: dict[str, asyncio.subprocess.Process] = {}  # pod UID -> its running process
        self.instances: list[PodInstance] = []  # every pod ever started, oldest first
        self._waiters: dict[str, asyncio.Task[None]] = {}
        self._master_ports: dict[tuple[str, ...], int] = {}  # (namespace, master address[, pod]) -> local port
        self._terminating: dict[str, asyncio.Task[None]] = {}  # pod UID -> its graceful termination

    def instances_of(self, namespace: str, name: str) -> list[PodInstance]:
        return [instance for instance in self.instances if instance.key == (namespace, name)]

    async def wait_stopped(self, instances: list[PodInstance], timeout: float) -> float:
        """Wait until each instance was stopped (killed, or exited after SIGTERM) and its process group is gone.

        The runner notices a deletion at its next poll, so a check made when the run turns
        Failed can come a moment early; this waits for the observation instead, with a deadline.
        Returns the seconds waited; raises TimeoutError naming what was still running.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            left = [instance for instance in instances
                    if not (instance.killed or instance.exited) or not pod_processes_gone(instance)]
            if not left:
                return loop.time() - started
            if loop.time() - started > timeout:
                raise TimeoutError(', '.join(f'pod {i.namespace}/{i.name} pid {i.pid} '
                                             f'{"still running" if i.killed or i.exited else "not stopped"}'
                                             for i in left))
            await asyncio.sleep(0.1)

    def volume_paths(self, pod: Mapping[str, Any]) -> dict[str, pathlib.Path]:
        """mountPath -> local folder; claims are shared across pods, emptyDirs are per pod."""
        metadata = pod['metadata']
        volumes = {volume['name']: volume for volume in pod['spec'].get('volumes', [])}
        paths: dict[str, pathlib.Path] = {}
        for container in pod['spec']['containers'][:1]:
            for mount in container.get('volumeMounts', []):
                volume = volumes.get(mount['name'], {})
                claim = (volume.get('persistentVolumeClaim') or {}).get('claimName')
                if claim:
                    folder = self._workdir / 'volumes' / metadata['namespace'] / 'claims' / claim
                else:  # emptyDir: one per pod instance, as the kubelet keys it (by UID)
                    folder = (self._workdir / 'volumes' / metadata['namespace'] / 'pods' /
                              f'{metadata["name"]}-{metadata["uid"]}' / mount['name'])
                folder.mkdir(parents=True, exist_ok=True)
                paths[mount['mountPath']] = folder
        return paths

    def command(self, pod: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
        container = pod['spec']['containers'][0]
        mounts = self.volume_paths(pod)
        args = [str(mounts.get(arg, arg)) for arg in container.get('args', [])]
        env = {**os.environ, **{item['name']: item.get('value', '') for item in container.get('env', [])}}
        env['KUBECONFIG'] = str(self._pod_kubeconfig(pod) if self._pod_kubeconfig else self._kubeconfig)
        for variable in ('HOME', 'MPLCONFIGDIR'):
            env[variable] = str(mounts.get('/tmp', self._workdir / 'tmp'))
        # TMPDIR stays short: DataLoader workers put AF_UNIX sockets there, and a socket path
        # over 107 bytes fails ("AF_UNIX path too long") where a pod's /tmp never would.
        short = self._short_tmp / pod['metadata']['uid'][:12]
        short.mkdir(parents=True, exist_ok=True)
        env['TMPDIR'] = str(short)
        env.pop('KUBERNETES_SERVICE_HOST', None)  # never take the in-cluster path from here
        launcher = container.get('command') or []
        if launcher[:1] == ['torchrun']:
            self._localize_rendezvous(pod, env)
            return [sys.executable, '-m', 'torch.distributed.run', *launcher[1:], *args], env
        return [sys.executable, '-m', 'trainguard_trainer', *args], env

    def _localize_rendezvous(self, pod: Mapping[str, Any], env: dict[str, str]) -> None:
        """Rank 0's DNS name becomes loopback; one free port per gang (pods of the same master
        address share it), so two gangs on this one machine do not collide."""
        address = env.get('PET_MASTER_ADDR', '')
        key: tuple[str, ...] = (pod['metadata']['namespace'], address)
        if env.get('PET_NNODES', '1') == '1':
            key += (pod['metadata']['uid'],)  # a single-pod job is a gang of its own
        if key not in self._master_ports:
            self._master_ports[key] = free_port()
        env['PET_MASTER_ADDR'] = '127.0.0.1'
        env['PET_MASTER_PORT'] = str(self._master_ports[key])

    def session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=True if self._ssl is None else self._ssl)
        return aiohttp.ClientSession(headers=self._headers, connector=connector)

    def log_path(self, key: PodKey) -> pathlib.Path:
        return self._workdir / 'pods' / key[0] / f'{key[1]}.log'

    async def run_forever(self) -> None:
        async with self.session() as session:
            while True:
                try:
                    await self._sync(session)
                except aiohttp.ClientError as error:
                    log.warning('pod runner could not reach the API: %s', error)
                await asyncio.sleep(self._poll)

    async def _sync(self, session: aiohttp.ClientSession) -> None:
        async with session.get(f'{self._api}{self._pods_path}', params={'labelSelector': POD_SELECTOR}) as response:
            pods = (await response.json())['items']
        alive = {pod['metadata']['uid'] for pod in pods}
        # Kill first: a pod deleted and recreated under the same name between two polls is a
        # new instance, and the old one's process must not outlive it.
        for uid in [uid for uid in self.processes if uid not in alive]:
            self.kill(uid, reason='its pod was deleted')
        started = {instance.uid for instance in self.instances}
        for pod in pods:
            uid = pod['metadata']['uid']
            if pod['metadata'].get('deletionTimestamp'):
                if uid not in self._terminating:
                    self._terminating[uid] = asyncio.create_task(self._terminate(pod))
            elif uid not in started and self.should_start(pod):
                await self._start(session, pod)

    @staticmethod
    def should_start(pod: Mapping[str, Any]) -> bool:
        """As this node's scheduler and kubelet: a pod not started yet (kube-apiserver creates
        every pod Pending), neither gated (no scheduler looks at it) nor bound to another node."""
        spec, status = pod.get('spec') or {}, pod.get('status') or {}
        return (status.get('phase') in (None, 'Pending') and not spec.get('schedulingGates')
                and spec.get('nodeName') in (None, '', NODE_NAME))

    async def _terminate(self, pod: Mapping[str, Any]) -> None:
        """A kubelet's graceful stop: SIGTERM to the main process, SIGKILL after the grace period,
        then the pod object goes (a delete with grace 0, the kubelet's last word)."""
        metadata = pod['metadata']
        uid, key = metadata['uid'], (metadata['namespace'], metadata['name'])
        grace = float(metadata.get('deletionGracePeriodSeconds') or 0)
        process = self.processes.get(uid)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            log.info('pod %s/%s: SIGTERM to pid %d, %.0fs to exit', *key, process.pid, grace)
            try:
                await asyncio.wait_for(process.wait(), timeout=grace)
            except TimeoutError:
                self.kill(uid, reason=f'still running {grace:.0f}s after SIGTERM')
            waiter = self._waiters.get(uid)
            if waiter is not None:   # its exit (code 6 after a checkpoint) is reported first
                await asyncio.gather(waiter, return_exceptions=True)
        async with self.session() as session, session.delete(
                f'{self._api}/api/v1/namespaces/{key[0]}/pods/{key[1]}', params={'gracePeriodSeconds': '0'}):
            pass

    async def _start(self, session: aiohttp.ClientSession, pod: Mapping[str, Any]) -> None:
        key: PodKey = (pod['metadata']['namespace'], pod['metadata']['name'])
        uid = pod['metadata']['uid']
        # Scheduled onto this "node" (the Binding the scheduler posts): from now on a deletion
        # is graceful, and this runner, as the node's kubelet, finishes it.
        if not (pod.get('spec') or {}).get('nodeName'):
            async with session.post(f'{self._api}/api/v1/namespaces/{key[0]}/pods/{key[1]}/binding', json={
                    'apiVersion': 'v1', 'kind': 'Binding', 'metadata': {'name': key[1]},
                    'target': {'apiVersion': 'v1', 'kind': 'Node', 'name': NODE_NAME}}) as response:
                if response.status >= 400:
                    log.warning('pod %s/%s: binding refused: %s', *key, await response.text())
        await self._set_status(session, key, {'phase': 'Pending', 'conditions': [
            {'type': 'PodScheduled', 'status': 'True'}]})
        command, env = self.command(pod)
        log_path = self.log_path(key)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open('wb') as output:
            process = await asyncio.create_subprocess_exec(*command, env=env, stdout=output,
                                                           stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.processes[uid] = process
        instance = PodInstance(*key, uid=uid, pid=process.pid)
        self.instances.append(instance)
        log.info('pod %s/%s: started pid %d, output in %s', *key, process.pid, log_path)
        await self._set_status(session, key, {
            'phase': 'Running', 'startTime': _now(),
            'containerStatuses': [self._container_status(pod, process, True, {'running': {'startedAt': _now()}})]})
        self._waiters[uid] = asyncio.create_task(self._wait(instance, pod, process))

    @staticmethod
    def _container_status(pod: Mapping[str, Any], process: asyncio.subprocess.Process, ready: bool,
                          state: dict[str, Any]) -> dict[str, Any]:
        image = pod['spec']['containers'][0].get('image', '')
        return {'name': 'trainer', 'ready': ready, 'restartCount': 0, 'image': image,
                'imageID': f'local://{image}', 'containerID': f'local://{process.pid}', 'state': state}

    async def _wait(self, instance: PodInstance, pod: Mapping[str, Any],
                    process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        instance.exited = True
        key = instance.key
        if self.processes.pop(instance.uid, None) is None:
            return  # killed because its pod was deleted: nothing left to report on
        terminated = {'exitCode': code, 'reason': 'Completed' if code == 0 else 'Error', 'finishedAt': _now()}
        if code != 0 and pod['spec']['containers'][0].get('terminationMessagePolicy') == 'FallbackToLogsOnError':
            # As the kubelet does: the log's tail (at most 80 lines, 2 KiB) becomes the message.
            tail = self.log_path(key).read_bytes()[-2048:].decode('utf-8', 'replace').splitlines()[-80:]
            terminated['message'] = '\n'.join(tail)
        async with self.session() as session:
            await self._set_status(session, key, {
                'phase': 'Succeeded' if code == 0 else 'Failed',
                'containerStatuses': [self._container_status(pod, process, False, {'terminated': terminated})]})
        log.info('pod %s/%s: exited with code %d', *key, code)

    async def _set_status(self, session: aiohttp.ClientSession, key: tuple[str, str], status: dict[str, Any]) -> None:
        """Report the pod's status; while the API cannot be reached (a control-plane outage),
        retry every few seconds as a kubelet does, so a pod that ended meanwhile is not left
        Running for ever."""
        url = f'{self._api}/api/v1/namespaces/{key[0]}/pods/{key[1]}/status'
        unreachable_since: float | None = None
        while True:
            try:
                async with session.patch(url, json={'status': status},
                                         headers={'Content-Type': 'application/merge-patch+json'}) as response:
                    if response.status >= 400 and response.status != 404:
                        log.warning('pod %s/%s: status update refused: %s', *key, await response.text())
                    if unreachable_since is not None:
                        log.info('pod %s/%s: status reported after the API came back', *key)
                    return
            except (aiohttp.ClientError, OSError) as error:
                if unreachable_since is None:
                    unreachable_since = asyncio.get_running_loop().time()
                    log.warning('pod %s/%s: cannot report status (%s); retrying until the API answers', *key, error)
                await asyncio.sleep(STATUS_RETRY_SECONDS)

    def kill(self, uid: str, reason: str) -> None:
        process = self.processes.pop(uid, None)
        if process is not None and process.returncode is None:
            tree = _descendants(process.pid)  # before the kill: orphans would be re-parented
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the whole session: DataLoader workers too
            for child in tree:  # torchrun's workers, each in a session of its own
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            instance = next(instance for instance in self.instances if instance.uid == uid)
            instance.tree = tuple(child.pid for child in tree)
            instance.killed = True
            log.info('pod %s/%s: killed pid %d (%s)', *instance.key, process.pid, reason)

    async def close(self) -> None:
        for uid in list(self.processes):
            self.kill(uid, reason='the sandbox is stopping')
        tasks = [*self._waiters.values(), *self._terminating.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        shutil.rmtree(self._short_tmp, ignore_errors=True)
