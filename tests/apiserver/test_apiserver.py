"""What users run, against a real kube-apiserver: the installs, the CRD, refusals, the operator.

Skips without ``$KUBEBUILDER_ASSETS`` (see conftest.py); ``.github/workflows/apiserver.yaml``
runs it on the oldest and newest supported Kubernetes minors. Tests run in file order and
leave the cluster as they found it, except the last, which keeps its release for the operator.
"""

from __future__ import annotations

import asyncio
import copy
import json
import pathlib
import ssl
import subprocess
import sys
import time
from typing import Any

import pytest
import yaml

from tests.apiserver.conftest import AVAILABLE, ROOT, SKIP_REASON, ControlPlane
from tests.manifests.test_crd_schema import MALFORMED
from trainguard_sandbox.pods import LocalPodRunner

pytestmark = [pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON), pytest.mark.timeout(600)]
CRD = 'customresourcedefinitions/trainingruns.trainguard.io'
VALUES = sorted((ROOT / 'charts' / 'trainguard' / 'ci').glob('*-values.yaml'))
# Kinds the chart may render that belong to other projects (cert-manager, prometheus-operator):
# registered as schemaless CRDs so `helm install` with every values file can run here.
FOREIGN = ROOT / 'tests' / 'apiserver' / 'foreign-crds.yaml'


def wait_established(plane: ControlPlane) -> None:
    plane.run('kubectl', 'wait', '--for=condition=Established', CRD, '--timeout=60s')


def wait_gone(plane: ControlPlane, what: str) -> None:
    plane.run('kubectl', 'wait', '--for=delete', what, '--timeout=120s', check=False)


def test_kustomize_install_is_accepted_and_explained(control_plane: ControlPlane) -> None:
    plane = control_plane
    plane.run('kubectl', 'apply', '-k', 'manifests/default')
    try:
        wait_established(plane)
        explained = plane.run('kubectl', 'explain', 'trainingrun.spec.hyperparameters').stdout
        assert 'Capped at 4 on CPU' in explained
        plane.run('kubectl', 'apply', '-f', 'manifests/samples/cpu-run.yaml', '-n', 'default')
        stored = json.loads(plane.run('kubectl', 'get', 'tr', 'unet-cpu', '-n', 'default', '-o', 'json').stdout)
        assert stored['spec']['model']['strides'] == [2, 2, 2, 2]   # structural defaults, as served
    finally:
        plane.run('kubectl', 'delete', '-f', 'manifests/samples/cpu-run.yaml', '-n', 'default', '--ignore-not-found')
        plane.run('kubectl', 'delete', '-k', 'manifests/default', '--ignore-not-found', '--wait=true')
        wait_gone(plane, CRD)


@pytest.fixture()
def crd(control_plane: ControlPlane):
    control_plane.run('kubectl', 'apply', '-f', 'manifests/crd/trainingruns.trainguard.io.yaml')
    wait_established(control_plane)
    yield
    control_plane.run('kubectl', 'delete', '-f', 'manifests/crd/trainingruns.trainguard.io.yaml', '--wait=true')
    wait_gone(control_plane, CRD)


@pytest.mark.parametrize(('body', 'field'), [(body, field) for _, body, field in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_the_server_refuses_a_malformed_run_naming_the_field(control_plane, crd, tmp_path, body, field) -> None:
    manifest = tmp_path / 'run.yaml'
    manifest.write_text(yaml.safe_dump({**copy.deepcopy(body), 'metadata': {'name': 'r', 'namespace': 'default'}}))
    result = control_plane.run('kubectl', 'create', '-f', str(manifest), check=False)
    assert result.returncode != 0, 'the server accepted it'
    assert field in result.stderr, result.stderr


@pytest.mark.parametrize('values', VALUES, ids=[path.stem for path in VALUES])
def test_helm_install_upgrade_uninstall(control_plane: ControlPlane, values: pathlib.Path) -> None:
    plane = control_plane
    plane.run('kubectl', 'apply', '-f', str(FOREIGN))
    for namespace in ('ml-team-a', 'ml-team-b'):   # namespaced-values binds roles there
        plane.run('kubectl', 'create', 'namespace', namespace, check=False)
    chart = str(ROOT / 'charts' / 'trainguard')
    common = ['--namespace', 'trainguard-system', '-f', str(values)]
    plane.run('helm', 'install', 'tg', chart, '--create-namespace', *common)
    try:
        wait_established(plane)
        plane.run('helm', 'upgrade', 'tg', chart, *common, '--set', 'operator.sweepSeconds=7')
    finally:
        plane.run('helm', 'uninstall', 'tg', '--namespace', 'trainguard-system', '--wait')
        plane.run('kubectl', 'delete', CRD.replace('customresourcedefinitions/', 'crd/'), '--ignore-not-found')
        wait_gone(plane, CRD)


async def _wait_phase(plane: ControlPlane, name: str, phases: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        result = plane.run('kubectl', 'get', 'tr', name, '-n', 'default', '-o', 'json', check=False)
        run = json.loads(result.stdout) if result.returncode == 0 else {}
        if (run.get('status') or {}).get('phase') in phases:
            return run
        assert time.monotonic() < deadline, f'{name} never reached {phases}: {run.get("status")}'
        await asyncio.sleep(1)


async def test_the_operator_as_its_service_account_trains_and_stops_a_hang(control_plane: ControlPlane,
                                                                           tmp_path: pathlib.Path) -> None:
    """Exactly the shipped ClusterRole, webhook on; trainer processes as the kubelet, each with its pod's token."""
    plane = control_plane
    plane.run('helm', 'install', 'tg', str(ROOT / 'charts' / 'trainguard'), '--namespace', 'trainguard-system',
              '--create-namespace', '--set', 'webhook.enabled=true', '--set', 'replicaCount=1')
    wait_established(plane)
    operator_token = plane.run('kubectl', 'create', 'token', 'tg-trainguard', '-n', 'trainguard-system',
                               '--duration=1h').stdout.strip()
    operator_kubeconfig = plane.kubeconfig_for(operator_token, 'operator')
    env = {**plane.env(operator_kubeconfig), 'TRAINGUARD_WEBHOOK': 'on', 'TRAINGUARD_WEBHOOK_HOST': '127.0.0.1',
           'TRAINGUARD_WEBHOOK_PORT': '19443', 'TRAINGUARD_SWEEP_SECONDS': '1'}
    log_path = tmp_path / 'operator.log'
    with log_path.open('wb') as log:
        operator = subprocess.Popen([sys.executable, '-m', 'trainguard.cli', 'run', '--standalone'], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)

    def pod_kubeconfig(pod: dict[str, Any]) -> pathlib.Path:
        account, namespace = pod['spec']['serviceAccountName'], pod['metadata']['namespace']
        token = plane.run('kubectl', 'create', 'token', account, '-n', namespace).stdout.strip()
        return plane.kubeconfig_for(token, f'pod-{pod["metadata"]["name"]}')

    runner = LocalPodRunner(plane.url, plane.kubeconfig, tmp_path / 'pods',
                            headers={'Authorization': f'Bearer {plane.token}'},
                            ssl=ssl.create_default_context(cafile=str(plane.ca)), pod_kubeconfig=pod_kubeconfig)
    runner_task = asyncio.create_task(runner.run_forever())
    try:
        deadline = time.monotonic() + 60
        while not _webhook_registered(plane):   # kopf registers it once its HTTPS server listens
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            await asyncio.sleep(1)
        tiny = {'model': {'channels': [8, 16], 'strides': [2], 'numResUnits': 0},
                'dataset': {'numSamples': 15}, 'progressTimeoutSeconds': 10}
        cpu = yaml.safe_load((ROOT / 'manifests' / 'samples' / 'cpu-run.yaml').read_text())
        cpu['spec'].update(tiny)
        hang = yaml.safe_load((ROOT / 'manifests' / 'samples' / 'hang-demo-run.yaml').read_text())
        hang['spec'].update(tiny)
        # Multi-node: the operator creates the Service and both pods as itself; the runner maps
        # rank 0's DNS name to loopback.
        gang = yaml.safe_load((ROOT / 'manifests' / 'samples' / 'multinode-run.yaml').read_text())
        gang_hang = yaml.safe_load((ROOT / 'manifests' / 'samples' / 'multinode-hang-demo-run.yaml').read_text())
        gang_hang['spec']['progressTimeoutSeconds'] = 10
        for body in (cpu, hang, gang, gang_hang):
            manifest = tmp_path / f'{body["metadata"]["name"]}.yaml'
            manifest.write_text(yaml.safe_dump(body))
            created = json.loads(plane.run('kubectl', 'create', '-n', 'default', '-o', 'json', '-f',
                                           str(manifest)).stdout)
            if body is cpu:   # rewritten by the webhook at admission
                assert created['spec']['hyperparameters']['batchSize'] == 4
        done = await _wait_phase(plane, cpu['metadata']['name'], ('Succeeded', 'Failed'), 300)
        assert done['status']['phase'] == 'Succeeded', done['status']
        hung = await _wait_phase(plane, hang['metadata']['name'], ('Succeeded', 'Failed'), 300)
        assert hung['status']['reason'] == 'ProgressTimeout', hung['status']
        pair = await _wait_phase(plane, gang['metadata']['name'], ('Succeeded', 'Failed'), 300)
        assert pair['status']['phase'] == 'Succeeded' and pair['status']['progress']['worldSize'] == 2, pair['status']
        service = json.loads(plane.run('kubectl', 'get', 'service', gang['metadata']['name'], '-n', 'default',
                                       '-o', 'json').stdout)
        assert service['spec']['clusterIP'] == 'None'
        frozen = await _wait_phase(plane, gang_hang['metadata']['name'], ('Succeeded', 'Failed'), 300)
        assert frozen['status']['reason'] == 'ProgressTimeout', frozen['status']
    finally:
        runner_task.cancel()
        await asyncio.gather(runner_task, return_exceptions=True)
        await runner.close()
        operator.terminate()
        operator.wait(timeout=60)
    text = log_path.read_text()
    assert '403' not in text and 'Forbidden' not in text, text[-3000:]


def _webhook_registered(plane: ControlPlane) -> bool:
    configs = json.loads(plane.run('kubectl', 'get', 'mutatingwebhookconfigurations', '-o', 'json').stdout)
    return any(hook['name'] == 'cpu-safety.trainguard.io' and hook.get('clientConfig', {}).get('caBundle')
               for config in configs['items'] for hook in config.get('webhooks') or [])
