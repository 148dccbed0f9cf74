"""The sandbox's stand-in for a kubelet: every trainer Pod becomes a local trainer process.

Development only. For each pod the operator creates, it starts
``python -m trainguard_trainer`` with the pod's args and env and a kubeconfig that points at
the emulator, and reports the pod's life through the status subresource: Pending, then
Running once the process started, then Succeeded or Failed by exit code (137 reported as
OOMKilled would be a lie, so a kill is reported as Error with its code). When the pod is
deleted, its process is killed, as the kubelet would. Each pod's output goes to
``<workdir>/pods/<namespace>/<pod>.log``; volumes become folders under
``<workdir>/volumes`` (a claim keeps its folder across attempts, so a retry can resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import pathlib
import signal
import sys
from collections.abc import Mapping
from typing import Any

import aiohttp

log = logging.getLogger(__name__)
POD_SELECTOR = 'app.kubernetes.io/managed-by=trainguard'


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


class LocalPodRunner:
    def __init__(self, api_url: str, kubeconfig: pathlib.Path, workdir: pathlib.Path,
                 poll_seconds: float = 0.25) -> None:
        self._api = api_url.rstrip('/')
        self._kubeconfig = kubeconfig
        self._workdir = workdir
        self._poll = poll_seconds
        self.processes: dict[tuple[str, str], asyncio.subprocess.Process] = {}
        self.started: dict[tuple[str, str], int] = {}   # pod -> pid, for every pod ever started
        self.killed: dict[tuple[str, str], int] = {}    # pod -> pid, for pods whose deletion killed them
        self._waiters: dict[tuple[str, str], asyncio.Task[None]] = {}

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
                else:
                    folder = self._workdir / 'volumes' / metadata['namespace'] / metadata['name'] / mount['name']
                folder.mkdir(parents=True, exist_ok=True)
                paths[mount['mountPath']] = folder
        return paths

    def command(self, pod: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
        container = pod['spec']['containers'][0]
        mounts = self.volume_paths(pod)
        args = [str(mounts.get(arg, arg)) for arg in container.get('args', [])]
        env = {**os.environ, **{item['name']: item.get('value', '') for item in container.get('env', [])}}
        env['KUBECONFIG'] = str(self._kubeconfig)
        for variable in ('HOME', 'MPLCONFIGDIR', 'TMPDIR'):
            env[variable] = str(mounts.get('/tmp', self._workdir / 'tmp'))
        env.pop('KUBERNETES_SERVICE_HOST', None)  # never take the in-cluster path from here
        return [sys.executable, '-m', 'trainguard_trainer', *args], env

    async def run_forever(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self._sync(session)
                except aiohttp.ClientError as error:
                    log.warning('pod runner could not reach the API: %s', error)
                await asyncio.sleep(self._poll)

    async def _sync(self, session: aiohttp.ClientSession) -> None:
        async with session.get(f'{self._api}/api/v1/pods', params={'labelSelector': POD_SELECTOR}) as response:
            pods = (await response.json())['items']
        alive = set()
        for pod in pods:
            key = (pod['metadata']['namespace'], pod['metadata']['name'])
            alive.add(key)
            if key not in self.processes and not (pod.get('status') or {}).get('phase'):
                await self._start(session, key, pod)
        for key in [key for key in self.processes if key not in alive]:
            self.kill(key, reason='its pod was deleted')

    async def _start(self, session: aiohttp.ClientSession, key: tuple[str, str], pod: Mapping[str, Any]) -> None:
        await self._set_status(session, key, {'phase': 'Pending', 'conditions': [
            {'type': 'PodScheduled', 'status': 'True'}]})
        command, env = self.command(pod)
        log_path = self._workdir / 'pods' / key[0] / f'{key[1]}.log'
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open('wb') as output:
            process = await asyncio.create_subprocess_exec(*command, env=env, stdout=output,
                                                           stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.processes[key] = process
        self.started[key] = process.pid
        log.info('pod %s/%s: started pid %d, output in %s', *key, process.pid, log_path)
        await self._set_status(session, key, {
            'phase': 'Running', 'startTime': _now(),
            'containerStatuses': [self._container_status(pod, process, True, {'running': {'startedAt': _now()}})]})
        self._waiters[key] = asyncio.create_task(self._wait(key, pod, process))

    @staticmethod
    def _container_status(pod: Mapping[str, Any], process: asyncio.subprocess.Process, ready: bool,
                          state: dict[str, Any]) -> dict[str, Any]:
        image = pod['spec']['containers'][0].get('image', '')
        return {'name': 'trainer', 'ready': ready, 'restartCount': 0, 'image': image,
                'imageID': f'local://{image}', 'containerID': f'local://{process.pid}', 'state': state}

    async def _wait(self, key: tuple[str, str], pod: Mapping[str, Any], process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self.processes.pop(key, None) is None:
            return  # killed because its pod was deleted: nothing left to report on
        terminated = {'exitCode': code, 'reason': 'Completed' if code == 0 else 'Error', 'finishedAt': _now()}
        async with aiohttp.ClientSession() as session:
            await self._set_status(session, key, {
                'phase': 'Succeeded' if code == 0 else 'Failed',
                'containerStatuses': [self._container_status(pod, process, False, {'terminated': terminated})]})
        log.info('pod %s/%s: exited with code %d', *key, code)

    async def _set_status(self, session: aiohttp.ClientSession, key: tuple[str, str], status: dict[str, Any]) -> None:
        url = f'{self._api}/api/v1/namespaces/{key[0]}/pods/{key[1]}/status'
        async with session.patch(url, json={'status': status},
                                 headers={'Content-Type': 'application/merge-patch+json'}) as response:
            if response.status >= 400 and response.status != 404:
                log.warning('pod %s/%s: status update refused: %s', *key, await response.text())

    def kill(self, key: tuple[str, str], reason: str) -> None:
        process = self.processes.pop(key, None)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the whole session: DataLoader workers too
            self.killed[key] = process.pid
            log.info('pod %s/%s: killed pid %d (%s)', *key, process.pid, reason)

    async def close(self) -> None:
        for key in list(self.processes):
            self.kill(key, reason='the sandbox is stopping')
        for task in self._waiters.values():
            task.cancel()
        await asyncio.gather(*self._waiters.values(), return_exceptions=True)
