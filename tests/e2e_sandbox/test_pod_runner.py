"""The sandbox's kubelet stand-in and the demo's folder: what a node does, without a node."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest

from trainguard_sandbox.cluster import emulated_cluster
from trainguard_sandbox.demo import MARKER, WorkdirError, prepare_workdir
from trainguard_sandbox.pods import LocalPodRunner, process_group_gone


def pod(name: str, uid: str) -> dict:
    return {'metadata': {'namespace': 'default', 'name': name, 'uid': uid},
            'spec': {'volumes': [{'name': 'output', 'emptyDir': {}},
                                 {'name': 'data', 'persistentVolumeClaim': {'claimName': 'scans'}}],
                     'containers': [{'name': 'trainer', 'volumeMounts': [{'name': 'output', 'mountPath': '/output'},
                                                                         {'name': 'data', 'mountPath': '/data'}]}]}}


def test_an_empty_dir_is_fresh_for_every_pod_uid_and_a_claim_is_shared(tmp_path):
    runner = LocalPodRunner('http://127.0.0.1:1', tmp_path / 'kubeconfig', tmp_path)
    first = runner.volume_paths(pod('unet-1', 'uid-a'))
    (first['/output'] / 'checkpoint.pt').write_text('epoch 2 of 2')
    again = runner.volume_paths(pod('unet-1', 'uid-b'))  # same name, a new pod
    assert again['/output'] != first['/output'] and not any(again['/output'].iterdir())
    assert again['/data'] == first['/data'] == tmp_path / 'volumes' / 'default' / 'claims' / 'scans'


@pytest.mark.parametrize(('entries', 'outcome'), [
    ((), 'created'),
    ((MARKER, 'pods', 'volumes'), 'cleared'),
    (('kubeconfig', 'pods', 'volumes', 'tmp'), 'cleared'),   # a demo from before the marker
    (('thesis.tex', 'pods'), 'refused'),
], ids=['new', 'previous-demo', 'old-demo', 'foreign'])
def test_each_demo_starts_from_a_clean_folder_and_never_clears_a_foreign_one(tmp_path, entries, outcome):
    workdir = tmp_path / 'demo'
    for entry in entries:
        workdir.mkdir(exist_ok=True)
        (workdir / entry).write_text('left over')
    if outcome == 'refused':
        with pytest.raises(WorkdirError, match='not made by a demo'):
            prepare_workdir(workdir)
        assert (workdir / 'thesis.tex').read_text() == 'left over'
        return
    assert prepare_workdir(workdir).startswith(outcome)
    assert sorted(path.name for path in workdir.iterdir()) == [MARKER]


class SleepingRunner(LocalPodRunner):
    """Runs `sleep` instead of the trainer: this test is about pod instances, not training."""

    def command(self, pod: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
        self.volume_paths(pod)
        return ['sleep', '600'], dict(os.environ)


async def test_a_pod_recreated_under_its_old_name_is_a_new_instance(tmp_path):
    """Deleted and recreated between two polls: the old process is killed, the new pod started."""
    async with emulated_cluster(tmp_path / 'kubeconfig') as emulator:
        url = str(emulator.servers[0].url).rstrip('/')
        runner = SleepingRunner(url, tmp_path / 'kubeconfig', tmp_path)
        manifest = {'apiVersion': 'v1', 'kind': 'Pod',
                    'metadata': {'name': 'unet-1', 'labels': {'app.kubernetes.io/managed-by': 'trainguard'}},
                    'spec': {'containers': [{'name': 'trainer', 'image': 'trainer'}]}}
        pods = f'{url}/api/v1/namespaces/default/pods'
        async with aiohttp.ClientSession() as session:
            async with session.post(pods, json=manifest) as response:
                first_uid = (await response.json())['metadata']['uid']
            await runner._sync(session)
            async with session.delete(f'{pods}/unet-1', params={'gracePeriodSeconds': '0'}):
                pass
            async with session.post(pods, json=manifest) as response:
                second_uid = (await response.json())['metadata']['uid']
            await runner._sync(session)
            try:
                old, new = runner.instances_of('default', 'unet-1')
                assert (old.uid, new.uid) == (first_uid, second_uid)
                await runner.wait_stopped([old], timeout=10)
                assert old.killed and not new.killed and not process_group_gone(new.pid)
            finally:
                await runner.close()


class StubbornRunner(LocalPodRunner):
    """A process that ignores SIGTERM: the kubelet must SIGKILL it once the grace period is over."""

    def command(self, pod: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
        self.volume_paths(pod)
        return [sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); '
                'time.sleep(600)'], dict(os.environ)


@pytest.mark.parametrize('runner_class', [SleepingRunner, StubbornRunner], ids=['exits-on-sigterm', 'ignores-it'])
async def test_a_graceful_deletion_is_sigterm_then_sigkill_after_the_grace_period(tmp_path, runner_class):
    async with emulated_cluster(tmp_path / 'kubeconfig') as emulator:
        url = str(emulator.servers[0].url).rstrip('/')
        runner = runner_class(url, tmp_path / 'kubeconfig', tmp_path, poll_seconds=0.05)
        manifest = {'apiVersion': 'v1', 'kind': 'Pod',
                    'metadata': {'name': 'unet-1', 'labels': {'app.kubernetes.io/managed-by': 'trainguard'}},
                    'spec': {'terminationGracePeriodSeconds': 2, 'containers': [{'name': 'trainer', 'image': 't'}]}}
        pods = f'{url}/api/v1/namespaces/default/pods'
        task = asyncio.create_task(runner.run_forever())
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(pods, json=manifest) as response:
                    assert response.status < 300
                started = asyncio.get_running_loop().time()
                while ((await emulator_pod(session, f'{pods}/unet-1') or {}).get('status') or {}).get('phase') \
                        != 'Running':
                    assert asyncio.get_running_loop().time() - started < 30, 'the pod never ran'
                    await asyncio.sleep(0.05)
                async with session.delete(f'{pods}/unet-1'):   # graceful: the pod is bound to a node
                    pass
                (instance,) = runner.instances_of('default', 'unet-1')
                waited = await runner.wait_stopped([instance], timeout=30)
                # sleep dies of SIGTERM at once; the stubborn one is SIGKILLed after its 2 s grace.
                assert instance.killed is (runner_class is StubbornRunner)
                assert (waited >= 1.5) is (runner_class is StubbornRunner), waited
                deadline = asyncio.get_running_loop().time() + 10
                while await emulator_pod(session, f'{pods}/unet-1') is not None:   # then the kubelet removes it
                    assert asyncio.get_running_loop().time() < deadline, 'the pod object stayed'
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.close()


async def emulator_pod(session: aiohttp.ClientSession, url: str) -> dict | None:
    async with session.get(url) as response:
        return await response.json() if response.status == 200 else None
