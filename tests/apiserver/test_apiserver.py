"""What users run, against a real kube-apiserver: the installs, the CRD, refusals, the operator.

Skips without ``$KUBEBUILDER_ASSETS`` (see conftest.py); ``.github/workflows/apiserver.yaml``
runs it on the oldest and newest supported Kubernetes minors, in file order, reversed and
shuffled. Every case uses names of its own and establishes what it needs (the CRD present
or absent) itself, and waits, with a deadline, for whatever the server does asynchronously
(a CRD Established, its OpenAPI published, a peering object filled in).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import time
from typing import Any

import pytest
import requests
import yaml

from tests.apiserver.conftest import AVAILABLE, ROOT, SKIP_REASON, ControlPlane, free_port, unique
from tests.manifests.test_crd_schema import MALFORMED
from trainguard_sandbox.pods import LocalPodRunner

pytestmark = [pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON), pytest.mark.timeout(900)]
CRD_NAME = 'trainingruns.trainguard.io'
PEERING_CRD_NAME = 'clusterkopfpeerings.kopf.dev'
CHART = ROOT / 'charts' / 'trainguard'
VALUES = sorted((CHART / 'ci').glob('*-values.yaml'))
# Kinds the chart may render that belong to other projects (cert-manager, prometheus-operator):
# registered as schemaless CRDs so `helm install` with every values file can run here.
FOREIGN = ROOT / 'tests' / 'apiserver' / 'foreign-crds.yaml'
WEBHOOK_CONFIGURATION = 'trainguard.io'   # the operator registers it at run time
ALIVE_AFTER_SECONDS = 300                 # kopf's own admission manager stopped the operator after ~60 s


# -- preconditions, each waited for with a deadline -------------------------------------------

def remove_crd(plane: ControlPlane, name: str = CRD_NAME) -> None:
    """Absent, and gone for real (CRD deletion is done by kube-apiserver itself, also on envtest)."""
    plane.run('kubectl', 'delete', 'crd', name, '--ignore-not-found', '--wait=true', '--timeout=120s', timeout=150)


def wait_established(plane: ControlPlane, name: str = CRD_NAME) -> None:
    plane.run('kubectl', 'wait', '--for=condition=Established', f'crd/{name}', '--timeout=60s', timeout=90)


def wait_explained(plane: ControlPlane, field: str, text: str) -> str:
    """The server publishes a new CRD's OpenAPI a moment after Established: `kubectl explain`
    says "couldn't find resource" until then."""
    answer: dict[str, str] = {}

    def explained() -> bool:
        result = plane.run('kubectl', 'explain', field, check=False)
        answer['text'] = result.stdout + result.stderr
        return result.returncode == 0 and text in result.stdout
    plane.wait_until(f'`kubectl explain {field}` to show {text!r}', explained)
    return answer['text']


def remove_webhook_configuration(plane: ControlPlane) -> None:
    plane.run('kubectl', 'delete', 'mutatingwebhookconfiguration', WEBHOOK_CONFIGURATION, '--ignore-not-found')


@pytest.fixture()
def crd_absent(control_plane: ControlPlane) -> None:
    """For a case that installs the CRD (a Helm release owns it: another release's copy would be refused)."""
    remove_crd(control_plane)


@pytest.fixture()
def crd(control_plane: ControlPlane) -> None:
    """The CRD from manifests/, present and served (apply is idempotent; a Helm-owned copy is replaced)."""
    if control_plane.run('kubectl', 'get', 'crd', CRD_NAME, '-o', 'jsonpath={.metadata.labels}',
                         check=False).stdout.find('Helm') >= 0:
        remove_crd(control_plane)
    control_plane.run('kubectl', 'apply', '-f', 'manifests/crd/trainingruns.trainguard.io.yaml')
    wait_established(control_plane)


# -- installs -----------------------------------------------------------------------------------

def test_kustomize_install_is_accepted_and_explained(control_plane: ControlPlane, crd_absent, namespace: str,
                                                     tmp_path: pathlib.Path) -> None:
    plane = control_plane
    rendered = [doc for doc in yaml.safe_load_all(plane.run('kubectl', 'kustomize', 'manifests/default').stdout)
                if doc]
    plane.run('kubectl', 'apply', '-k', 'manifests/default')
    try:
        wait_established(plane)
        assert 'Capped at 4 on CPU' in wait_explained(plane, 'trainingrun.spec.hyperparameters', 'Capped at 4')
        plane.run('kubectl', 'apply', '-f', 'manifests/samples/cpu-run.yaml', '-n', namespace)
        stored = json.loads(plane.run('kubectl', 'get', 'tr', 'unet-cpu', '-n', namespace, '-o', 'json').stdout)
        assert stored['spec']['model']['strides'] == [2, 2, 2, 2]   # structural defaults, as served
    finally:
        # Everything but the Namespace: deleting it would leave it Terminating for ever here.
        leftovers = tmp_path / 'installed.yaml'
        leftovers.write_text(yaml.safe_dump_all([doc for doc in rendered if doc['kind'] != 'Namespace']))
        plane.run('kubectl', 'delete', '-f', str(leftovers), '--ignore-not-found', '--wait=false')
        remove_crd(plane)


@pytest.mark.parametrize(('body', 'field'), [(body, field) for _, body, field in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_the_server_refuses_a_malformed_run_naming_the_field(control_plane, crd, namespace, tmp_path, body,
                                                             field) -> None:
    manifest = tmp_path / 'run.yaml'
    manifest.write_text(yaml.safe_dump({**copy.deepcopy(body), 'metadata': {'name': 'r', 'namespace': namespace}}))
    result = control_plane.run('kubectl', 'create', '-f', str(manifest), check=False)
    assert result.returncode != 0, 'the server accepted it'
    assert field in result.stderr, result.stderr


@pytest.mark.parametrize(('container', 'field'), [
    ({'name': 'trainer', 'command': ['sh', '-c', 'sleep 1d']}, 'spec.template.spec.containers[0].command'),
    ({'name': 'trainer', 'securityContext': {'privileged': True}}, 'spec.template.spec.containers[0].securityContext'),
    ({'name': 'trainer', 'image': 'evil'}, 'spec.template.spec.containers[0].image'),
], ids=['command', 'privileged', 'image'])
def test_the_trainers_own_fields_are_unknown_to_the_template(control_plane, crd, namespace, tmp_path, container,
                                                              field) -> None:
    """kubectl's default strict field validation refuses fields the template does not have."""
    manifest = tmp_path / 'run.yaml'
    manifest.write_text(yaml.safe_dump({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun',
                                        'metadata': {'name': 'r', 'namespace': namespace},
                                        'spec': {'template': {'spec': {'containers': [container]}}}}))
    result = control_plane.run('kubectl', 'create', '-f', str(manifest), check=False)
    assert result.returncode != 0 and f'unknown field "{field}"' in result.stderr, result.stderr


def helm_install(plane: ControlPlane, release: str, namespace: str, *args: str) -> None:
    plane.run('kubectl', 'apply', '-f', str(FOREIGN))
    for team in ('ml-team-a', 'ml-team-b'):   # namespaced-values binds roles there; never deleted
        plane.run('kubectl', 'create', 'namespace', team, check=False)
    plane.run('helm', 'install', release, str(CHART), '--namespace', namespace, '--create-namespace', *args)


def helm_uninstall(plane: ControlPlane, release: str, namespace: str) -> None:
    plane.run('helm', 'uninstall', release, '--namespace', namespace, '--wait', '--timeout=120s', timeout=150)


@pytest.mark.parametrize('values', VALUES, ids=[path.stem for path in VALUES])
def test_helm_install_upgrade_uninstall_on_an_empty_cluster(control_plane: ControlPlane, crd_absent,
                                                            values: pathlib.Path) -> None:
    """Neither CRD there before: Helm must install kopf's peering CRD (crds/) before it maps the
    release's ClusterKopfPeering object, or it refuses the whole release."""
    plane = control_plane
    remove_crd(plane, PEERING_CRD_NAME)
    release, namespace = unique('tg'), unique('tg-system')
    helm_install(plane, release, namespace, '-f', str(values))
    try:
        wait_established(plane)
        wait_established(plane, PEERING_CRD_NAME)
        replicas = yaml.safe_load(values.read_text()).get('replicaCount', 1)
        peerings = plane.run('kubectl', 'get', 'clusterkopfpeerings', '-o', 'name').stdout.split()
        assert (f'clusterkopfpeering.kopf.dev/{release}-trainguard' in peerings) is (replicas > 1), peerings
        plane.run('helm', 'upgrade', release, str(CHART), '--namespace', namespace, '-f', str(values),
                  '--set', 'operator.sweepSeconds=7')
    finally:
        helm_uninstall(plane, release, namespace)
    assert not plane.run('kubectl', 'get', 'clusterroles', '-l', f'app.kubernetes.io/instance={release}',
                         '-o', 'name').stdout.strip()


# -- the operator, as the chart's ServiceAccount ------------------------------------------------

def start_operator(plane: ControlPlane, kubeconfig: pathlib.Path, log: pathlib.Path, *args: str,
                   **env: str) -> subprocess.Popen[bytes]:
    environment = {**plane.env(kubeconfig), 'TRAINGUARD_SWEEP_SECONDS': '1', **env}
    with log.open('wb') as output:
        return subprocess.Popen([sys.executable, '-m', 'trainguard.cli', 'run', *args], env=environment,
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def stop_operator(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def create(plane: ControlPlane, body: dict[str, Any], namespace: str, folder: pathlib.Path) -> dict[str, Any]:
    manifest = folder / f'{body["metadata"]["name"]}.yaml'
    manifest.write_text(yaml.safe_dump(body))
    return json.loads(plane.run('kubectl', 'create', '-n', namespace, '-o', 'json', '-f', str(manifest)).stdout)


async def _wait_phase(plane: ControlPlane, name: str, namespace: str, phases: tuple[str, ...],
                      timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        result = plane.run('kubectl', 'get', 'tr', name, '-n', namespace, '-o', 'json', check=False)
        run = json.loads(result.stdout) if result.returncode == 0 else {}
        if (run.get('status') or {}).get('phase') in phases:
            return run
        assert time.monotonic() < deadline, f'{name} never reached {phases}: {run.get("status")}'
        await asyncio.sleep(1)


def _peers(plane: ControlPlane, name: str) -> int:
    result = plane.run('kubectl', 'get', 'clusterkopfpeering', name, '-o', 'json', check=False)
    return len(json.loads(result.stdout).get('status') or {}) if result.returncode == 0 else 0


def test_two_replicas_agree_through_the_peering_the_chart_installs(control_plane: ControlPlane, crd_absent,
                                                                   namespace: str, tmp_path: pathlib.Path) -> None:
    plane = control_plane
    remove_crd(plane, PEERING_CRD_NAME)
    release, system = unique('tg'), unique('tg-system')
    peering = f'{release}-trainguard'
    helm_install(plane, release, system, '-f', str(CHART / 'ci' / 'replicas-values.yaml'))
    operators: list[subprocess.Popen[bytes]] = []
    try:
        wait_established(plane)
        kubeconfig = plane.kubeconfig_for(plane.token_for(system, peering), f'operator-{release}')
        for priority in (200, 100):   # two operator pods' worth
            operators.append(start_operator(plane, kubeconfig, tmp_path / f'operator-{priority}.log',
                                            f'--peering={peering}', TRAINGUARD_PEERING_PRIORITY=str(priority),
                                            TRAINGUARD_PEERING_LIFETIME_SECONDS=str(PEERING_LIFETIME)))
        plane.wait_until('both operators in the peering object', lambda: _peers(plane, peering) == 2, timeout=90)
        sample = yaml.safe_load((ROOT / 'manifests' / 'samples' / 'cpu-run.yaml').read_text())
        create(plane, sample, namespace, tmp_path)
        plane.wait_until('the active operator to create the pod', lambda: plane.run(
            'kubectl', 'get', 'pods', '-n', namespace, '-o', 'name').stdout.split() == ['pod/unet-cpu-1'])
        assert all(operator.poll() is None for operator in operators)
        # The active one dies without a word; the standby serves a run created after it.
        os.killpg(operators[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        second = copy.deepcopy(sample)
        second['metadata']['name'] = 'unet-second'
        create(plane, second, namespace, tmp_path)
        plane.wait_until('the standby to create the second run\'s pod', lambda: 'pod/unet-second-1' in plane.run(
            'kubectl', 'get', 'pods', '-n', namespace, '-o', 'name').stdout.split(), timeout=PEERING_LIFETIME + 60)
        plane.wait_until('the standby to write the second run\'s status', lambda: plane.run(
            'kubectl', 'get', 'trainingrun', 'unet-second', '-n', namespace, '-o',
            'jsonpath={.status.phase}').stdout.strip() != '', timeout=PEERING_LIFETIME + 60)
        takeover = time.monotonic() - killed
        print(f'takeover: {takeover:.1f}s from the kill to the second run\'s pod and status '
              f'(peering lifetime {PEERING_LIFETIME}s)')
        assert takeover <= PEERING_LIFETIME + 10, (takeover, (tmp_path / 'operator-100.log').read_text()[-4000:])
    finally:
        for operator in operators:
            stop_operator(operator)
        plane.run('kubectl', 'delete', 'pods', '--all', '-n', namespace, '--wait=false')
        helm_uninstall(plane, release, system)
    for log in tmp_path.glob('operator-*.log'):
        text = log.read_text()
        assert 'Forbidden' not in text, text[-3000:]   # kopf and the client both name a 403 so


PEERING_LIFETIME = 15


def _webhook_registered(plane: ControlPlane) -> bool:
    result = plane.run('kubectl', 'get', 'mutatingwebhookconfiguration', WEBHOOK_CONFIGURATION, '-o', 'json',
                       check=False)
    if result.returncode != 0:
        return False
    return any(hook['name'] == 'cpu-safety.trainguard.io' and hook.get('clientConfig', {}).get('caBundle')
               for hook in json.loads(result.stdout).get('webhooks') or [])


def webhook_operator(plane: ControlPlane, folder: pathlib.Path, port: int,
                     *chart_values: str) -> tuple[str, str, subprocess.Popen[bytes], pathlib.Path]:
    """A release of the chart with these values, and the operator with the webhook on, running as
    that release's ServiceAccount: (release, its namespace, the process, its log)."""
    remove_webhook_configuration(plane)
    release, system = unique('tg'), unique('tg-system')
    helm_install(plane, release, system, *(arg for value in chart_values for arg in ('--set', value)))
    wait_established(plane)
    kubeconfig = plane.kubeconfig_for(plane.token_for(system, f'{release}-trainguard'), f'operator-{release}')
    log_path = folder / 'operator.log'
    operator = start_operator(plane, kubeconfig, log_path, '--standalone', TRAINGUARD_WEBHOOK='on',
                              TRAINGUARD_WEBHOOK_HOST='127.0.0.1', TRAINGUARD_WEBHOOK_PORT=str(port))
    return release, system, operator, log_path


def start_runner(plane: ControlPlane, folder: pathlib.Path,
                 namespace: str) -> tuple[LocalPodRunner, asyncio.Task[None]]:
    """The kubelet here: trainer processes for this namespace's pods, each with its pod's token."""
    def pod_kubeconfig(pod: Any) -> pathlib.Path:
        metadata = pod['metadata']
        token = plane.token_for(metadata['namespace'], pod['spec']['serviceAccountName'],
                                pod=(metadata['name'], metadata['uid']))
        return plane.kubeconfig_for(token, f'pod-{metadata["name"]}')

    runner = LocalPodRunner(plane.url, plane.kubeconfig, folder / 'pods', namespace=namespace,
                            headers={'Authorization': f'Bearer {plane.token}'},
                            ssl=ssl.create_default_context(cafile=str(plane.ca)), pod_kubeconfig=pod_kubeconfig)
    return runner, asyncio.create_task(runner.run_forever())


async def stop_runner(runner: LocalPodRunner, task: asyncio.Task[None]) -> None:
    """The kubelet stops: its polling task, then every trainer process it started."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await runner.close()


def tiny(name: str, **spec: Any) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / 'manifests' / 'samples' / name).read_text())
    body['spec'].update({'model': {'channels': [8, 16], 'strides': [2], 'numResUnits': 0},
                         'dataset': {'numSamples': 15}, **spec})
    return body


async def test_the_operator_as_its_service_account_trains_and_stops_a_hang(control_plane: ControlPlane,
                                                                           crd_absent, namespace: str,
                                                                           tmp_path: pathlib.Path) -> None:
    """Exactly the chart's RBAC with the webhook on; trainer processes as the kubelet would run
    them, each with its pod's token; still alive and reconciling five minutes after start."""
    plane = control_plane
    started = time.monotonic()
    release, system, operator, log_path = webhook_operator(plane, tmp_path, 19443, 'webhook.enabled=true',
                                                           'replicaCount=1')
    runner, runner_task = start_runner(plane, tmp_path, namespace)
    try:
        deadline = time.monotonic() + 60
        while not _webhook_registered(plane):   # the operator registers it once its HTTPS server listens
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            await asyncio.sleep(1)
        cpu = tiny('cpu-run.yaml', progressTimeoutSeconds=10)
        hang = tiny('hang-demo-run.yaml', progressTimeoutSeconds=10)
        # Multi-node: the operator creates the Service and both pods as itself; the runner maps
        # rank 0's DNS name to loopback.
        gang = yaml.safe_load((ROOT / 'manifests' / 'samples' / 'multinode-run.yaml').read_text())
        gang_hang = yaml.safe_load((ROOT / 'manifests' / 'samples' / 'multinode-hang-demo-run.yaml').read_text())
        gang_hang['spec']['progressTimeoutSeconds'] = 10
        for body in (cpu, hang, gang, gang_hang):
            created = create(plane, body, namespace, tmp_path)
            if body is cpu:   # rewritten by the webhook at admission
                assert created['spec']['hyperparameters']['batchSize'] == 4
        done = await _wait_phase(plane, cpu['metadata']['name'], namespace, ('Succeeded', 'Failed'), 300)
        assert done['status']['phase'] == 'Succeeded', done['status']
        hung = await _wait_phase(plane, hang['metadata']['name'], namespace, ('Succeeded', 'Failed'), 300)
        assert hung['status']['reason'] == 'ProgressTimeout', hung['status']
        pair = await _wait_phase(plane, gang['metadata']['name'], namespace, ('Succeeded', 'Failed'), 300)
        assert pair['status']['phase'] == 'Succeeded' and pair['status']['progress']['worldSize'] == 2, pair['status']
        service = json.loads(plane.run('kubectl', 'get', 'service', gang['metadata']['name'], '-n', namespace,
                                       '-o', 'json').stdout)
        assert service['spec']['clusterIP'] == 'None'
        frozen = await _wait_phase(plane, gang_hang['metadata']['name'], namespace, ('Succeeded', 'Failed'), 300)
        assert frozen['status']['reason'] == 'ProgressTimeout', frozen['status']
        # Alive and reconciling minutes after start (kopf's managed webhook stopped it after ~60 s).
        await asyncio.sleep(max(0.0, ALIVE_AFTER_SECONDS - (time.monotonic() - started)))
        assert operator.poll() is None, log_path.read_text()[-3000:]
        late = create(plane, tiny('cpu-run.yaml') | {'metadata': {'name': 'late'}}, namespace, tmp_path)
        assert late['spec']['hyperparameters']['batchSize'] == 4
        await _wait_phase(plane, 'late', namespace, ('Running', 'Succeeded'), 120)
    finally:
        await stop_runner(runner, runner_task)
        stop_operator(operator)
        remove_webhook_configuration(plane)
        plane.run('kubectl', 'delete', 'pods', '--all', '-n', namespace, '--wait=false')
        helm_uninstall(plane, release, system)
    text = log_path.read_text()
    assert 'Forbidden' not in text, text[-3000:]   # kopf and the client both name a 403 so


async def test_a_refused_webhook_configuration_never_stops_the_operator(control_plane: ControlPlane, crd_absent,
                                                                        namespace: str,
                                                                        tmp_path: pathlib.Path) -> None:
    """The webhook on, but the chart installed without its rules: registration is refused (403)
    and retried; the operator keeps reconciling past the minute after which kopf's own admission
    manager used to stop it."""
    plane = control_plane
    started = time.monotonic()
    release, system, operator, log_path = webhook_operator(plane, tmp_path, 19444, 'webhook.enabled=false')
    try:
        plane.wait_until('the refused registration in the log',
                         lambda: 'could not register the admission webhook' in log_path.read_text(), timeout=60)
        await asyncio.sleep(max(0.0, 120 - (time.monotonic() - started)))
        assert operator.poll() is None, log_path.read_text()[-3000:]
        created = create(plane, tiny('cpu-run.yaml'), namespace, tmp_path)
        assert created['spec']['hyperparameters']['batchSize'] == 32   # admitted as written
        run = await _wait_phase(plane, 'unet-cpu', namespace, ('Pending', 'Running'), 60)
        assert run['spec']['hyperparameters']['batchSize'] == 4        # rewritten by the reconcile
        assert not _webhook_registered(plane)
    finally:
        stop_operator(operator)
        remove_webhook_configuration(plane)
        plane.run('kubectl', 'delete', 'pods', '--all', '-n', namespace, '--wait=false')
        helm_uninstall(plane, release, system)


async def test_an_eviction_mid_epoch_is_a_disruption_and_loses_no_step(control_plane: ControlPlane, crd_absent,
                                                                       namespace: str,
                                                                       tmp_path: pathlib.Path) -> None:
    """`backoffLimit: 0`, a pod evicted mid-epoch through the Eviction API (what `kubectl drain`
    calls): the server marks it DisruptionTarget and deletes it gracefully, the runner (the
    kubelet here) sends SIGTERM, the trainer saves its step, and the next attempt resumes there."""
    plane = control_plane
    release, system = unique('tg'), unique('tg-system')
    helm_install(plane, release, system, '--set', 'replicaCount=1')
    wait_established(plane)
    kubeconfig = plane.kubeconfig_for(plane.token_for(system, f'{release}-trainguard'), f'operator-{release}')
    log_path = tmp_path / 'operator.log'
    operator = start_operator(plane, kubeconfig, log_path, '--standalone')
    runner, runner_task = start_runner(plane, tmp_path, namespace)
    try:
        body = tiny('cpu-run.yaml', backoffLimit=0, output={'claimName': 'drained-output'},
                    model={'channels': [16, 32, 64], 'strides': [2, 2], 'numResUnits': 1},
                    dataset={'numSamples': 60})
        body['metadata']['name'] = 'drained'
        body['spec']['hyperparameters'] = {'batchSize': 4, 'numWorkers': 0, 'epochs': 30, 'resolution': 64,
                                           'cropSize': 64}
        create(plane, body, namespace, tmp_path)
        first_log = runner.log_path((namespace, 'drained-1'))
        await plane.until('attempt 1 in epoch 2', lambda: first_log.exists() and 'epoch 2/30 step' in
                         first_log.read_text(), timeout=180)
        eviction = tmp_path / 'eviction.json'
        eviction.write_text(json.dumps({'apiVersion': 'policy/v1', 'kind': 'Eviction',
                                        'metadata': {'name': 'drained-1', 'namespace': namespace}}))
        plane.run('kubectl', 'create', '--raw', f'/api/v1/namespaces/{namespace}/pods/drained-1/eviction',
                  '-f', str(eviction))
        done = await _wait_phase(plane, 'drained', namespace, ('Succeeded', 'Failed'), 300)
        status = done['status']
        assert status['phase'] == 'Succeeded' and status['disruptions'] == 1, status
        assert status['disruptionHistory'][0]['reason'] == 'EvictionByEvictionAPI' and not status.get('failedAttempts')
        stopped = next(line for line in first_log.read_text().splitlines() if 'stopped on SIGTERM' in line)
        where = stopped.split('checkpoint at ', 1)[1]   # "epoch E step S"
        second = runner.log_path((namespace, 'drained-2')).read_text()
        epoch, step = (int(part.split()[-1]) for part in where.split(' step '))
        expected = f'epoch {epoch} of 30 done' if step == 12 else f'epoch {epoch} of 30, step {step} done'
        assert expected in second, second[:3000]
    finally:
        await stop_runner(runner, runner_task)
        stop_operator(operator)
        plane.run('kubectl', 'delete', 'pods', '--all', '-n', namespace, '--wait=false')
        helm_uninstall(plane, release, system)


OUTAGE_SECONDS = 45            # kube-apiserver stopped this long: longer than the runs' progress timeout
OUTAGE_TIMEOUT = 30            # progressTimeoutSeconds; the heartbeat interval is 10 s
OUTAGE_INTERVAL = 10
HEALTHY_EPOCHS = 120           # long enough to train through the outage on a two-core machine


def _metric(port: int, name: str) -> float:
    text = requests.get(f'http://127.0.0.1:{port}/metrics', timeout=10).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f'{name} ')]
    assert len(values) == 1, (name, text[-2000:])
    return values[0]


async def test_a_stopped_kube_apiserver_fails_no_healthy_run_and_still_catches_a_frozen_one(
        control_plane: ControlPlane, crd_absent, namespace: str, tmp_path: pathlib.Path) -> None:
    """kube-apiserver stopped for longer than the runs' progress timeout (etcd keeps running,
    as in a single-master upgrade) and started again over the same etcd. The healthy run's
    trainer trained on, unheard: it ends Succeeded with no extra attempt. The frozen run is
    failed after the outage within its timeout plus one heartbeat interval. The operator says
    in an Event and a metric that it lost its view, and for how long."""
    plane = control_plane
    release, system = unique('tg'), unique('tg-system')
    helm_install(plane, release, system, '--set', 'replicaCount=1')
    wait_established(plane)
    kubeconfig = plane.kubeconfig_for(plane.token_for(system, f'{release}-trainguard'), f'operator-{release}')
    log_path, metrics_port = tmp_path / 'operator.log', free_port()
    operator = start_operator(plane, kubeconfig, log_path, '--standalone', TRAINGUARD_METRICS_PORT=str(metrics_port),
                              POD_NAME='trainguard-operator-0', POD_NAMESPACE=system)
    runner, runner_task = start_runner(plane, tmp_path, namespace)
    stopped = False
    try:
        healthy = tiny('cpu-run.yaml', progressTimeoutSeconds=OUTAGE_TIMEOUT, backoffLimit=0,
                       model={'channels': [16, 32, 64], 'strides': [2, 2], 'numResUnits': 1},
                       dataset={'numSamples': 60})
        healthy['metadata']['name'] = 'healthy'
        healthy['spec']['hyperparameters'] = {'batchSize': 4, 'numWorkers': 0, 'epochs': HEALTHY_EPOCHS,
                                              'resolution': 64, 'cropSize': 64}
        frozen = tiny('hang-demo-run.yaml', progressTimeoutSeconds=OUTAGE_TIMEOUT)
        frozen['metadata']['name'] = 'frozen'
        for body in (healthy, frozen):
            create(plane, body, namespace, tmp_path)
        for name in ('healthy', 'frozen'):
            await plane.until(f'{name} to beat', lambda name=name: json.loads(plane.run(
                'kubectl', 'get', 'tr', name, '-n', namespace, '-o', 'json').stdout).get('status', {}).get(
                'progress', {}).get('step') is not None, timeout=180)
        await asyncio.to_thread(plane.stop_apiserver)
        stopped = True
        await asyncio.sleep(OUTAGE_SECONDS)
        await asyncio.to_thread(plane.start_apiserver)
        stopped = False
        reopened = time.monotonic()
        caught = await _wait_phase(plane, 'frozen', namespace, ('Succeeded', 'Failed'),
                                   OUTAGE_TIMEOUT + OUTAGE_INTERVAL + 30)
        failed_after = time.monotonic() - reopened
        print(f'outage: frozen run failed {failed_after:.1f}s after kube-apiserver answered again')
        assert caught['status']['reason'] == 'ProgressTimeout', caught['status']
        # Within its timeout plus one interval (kubectl polls every second or so: 3 s slack).
        assert failed_after <= OUTAGE_TIMEOUT + OUTAGE_INTERVAL + 3, failed_after
        done = await _wait_phase(plane, 'healthy', namespace, ('Succeeded', 'Failed'), 600)
        assert done['status']['phase'] == 'Succeeded', done['status']
        assert done['status']['attempts'] == 1 and not done['status'].get('failedAttempts'), done['status']
        pods = plane.run('kubectl', 'get', 'pods', '-n', namespace, '-o', 'name').stdout.split()
        assert sorted(pods) == ['pod/frozen-1', 'pod/healthy-1'] or sorted(pods) == ['pod/healthy-1'], pods
        assert _metric(metrics_port, 'trainguard_api_outages_total') >= 1
        lost = _metric(metrics_port, 'trainguard_api_outage_seconds_total')
        assert OUTAGE_SECONDS - 5 <= lost <= OUTAGE_SECONDS + 90, lost
        assert _metric(metrics_port, 'trainguard_api_reachable') == 1
        events = json.loads(plane.run('kubectl', 'get', 'events', '-n', system, '-o', 'json').stdout)['items']
        said = [event['message'] for event in events if event['reason'] == 'ApiUnreachable']
        assert said and 'could not reach the API server for' in said[0], events
        assert operator.poll() is None, log_path.read_text()[-3000:]
    finally:
        if stopped:
            plane.start_apiserver()
        await stop_runner(runner, runner_task)
        stop_operator(operator)
        plane.run('kubectl', 'delete', 'pods', '--all', '-n', namespace, '--wait=false')
        helm_uninstall(plane, release, system)


@pytest.mark.parametrize('identity', ['auto', 'run'], ids=['per-namespace-with-the-policy', 'per-run'])
def test_a_trainer_token_writes_only_its_own_runs_heartbeat(control_plane: ControlPlane, crd_absent, namespace: str,
                                                             tmp_path: pathlib.Path, identity: str) -> None:
    """The chart's policy (1.30+) as kube-apiserver evaluates it, with the pod-bound tokens the
    kubelet mounts; without it (per-run identity), RBAC's resourceNames alone."""
    plane = control_plane
    release, system = unique('tg'), unique('tg-system')
    helm_install(plane, release, system, '--set', 'replicaCount=1', '--set', f'operator.trainerIdentity={identity}')
    wait_established(plane)
    kubeconfig = plane.kubeconfig_for(plane.token_for(system, f'{release}-trainguard'), f'operator-{release}')
    log_path = tmp_path / 'operator.log'
    operator = start_operator(plane, kubeconfig, log_path, '--standalone')
    try:
        for name in ('a', 'b'):
            body = tiny('cpu-run.yaml')
            body['metadata']['name'] = name
            create(plane, body, namespace, tmp_path)
        runs: dict[str, Any] = {}
        for name in ('a', 'b'):
            plane.wait_until(f'{name}: pod created and named in status', lambda name=name: runs.update({
                name: json.loads(plane.run('kubectl', 'get', 'tr', name, '-n', namespace, '-o', 'json').stdout)})
                or (runs[name].get('status') or {}).get('podName') == f'{name}-1', timeout=90)
        pod = json.loads(plane.run('kubectl', 'get', 'pod', 'a-1', '-n', namespace, '-o', 'json').stdout)
        account = pod['spec']['serviceAccountName']
        assert account == ('trainguard-trainer' if identity == 'auto' else 'a-trainer'), account
        token = plane.token_for(namespace, account, pod=('a-1', pod['metadata']['uid']))

        def call(method: str, path: str, body: Any = None) -> requests.Response:
            return requests.request(method, plane.url + path, json=body, verify=str(plane.ca), timeout=30, headers={
                'Authorization': f'Bearer {token}', 'Content-Type': 'application/merge-patch+json'})
        runs_path = f'/apis/trainguard.io/v1alpha1/namespaces/{namespace}/trainingruns'
        beat = {'metadata': {'annotations': {'trainguard.io/progress': json.dumps({'epoch': 1, 'epochs': 2, 'step': 1,
                                                                                  'steps': 4})}}}
        answer = call('PATCH', f'{runs_path}/a', beat)
        assert answer.status_code == 200, answer.text
        refused = [('PATCH', f'{runs_path}/b', beat), ('PATCH', f'{runs_path}/a/status', {'status': {'phase': 'X'}}),
                   ('GET', f'/api/v1/namespaces/{namespace}/pods', None),
                   ('GET', f'/api/v1/namespaces/{namespace}/secrets', None)]
        if identity == 'auto':   # what only the policy refuses
            refused += [('PATCH', f'{runs_path}/a', {'spec': {'hyperparameters': {'epochs': 99}}}),
                        ('PATCH', f'{runs_path}/a', {'metadata': {'annotations': {'other': 'x'}}})]
        for method, path, body in refused:
            answer = call(method, path, body)
            assert answer.status_code == 403, (method, path, answer.text)
        if identity == 'auto':
            message = call('PATCH', f'{runs_path}/b', beat).json()['message']
            assert message == ('trainingruns.trainguard.io "b" is forbidden: ValidatingAdmissionPolicy '
                               "'trainguard-trainer-own-run' with binding 'trainguard-trainer-own-run' denied request: "
                               'a trainer may write only its own run: the token of pod a-1 may not UPDATE '
                               'TrainingRun b, whose current pod is b-1'), message
        assert 'trainer identity: one ServiceAccount per namespace' in log_path.read_text() or identity == 'run'
    finally:
        stop_operator(operator)
        plane.run('kubectl', 'delete', 'pods', '--all', '-n', namespace, '--wait=false')
        helm_uninstall(plane, release, system)


def test_the_golden_server_set_fields_are_what_kube_apiserver_sets(control_plane: ControlPlane, namespace: str):
    """tests/operator/golden/server-set-fields-*.yaml is what this server adds on create to each
    kind the operator creates; the operator tier holds the emulator to it. Set
    TRAINGUARD_RECORD_GOLDEN=1 to write it from this server."""
    from tests.server_set import GOLDEN, children, load_golden, server_set
    from trainguard.kube import _PATHS

    found: dict[str, list[str]] = {}
    for child in children(namespace):
        answer = requests.post(control_plane.url + _PATHS[child['kind']].format(namespace=namespace), json=child,
                               headers={'Authorization': f'Bearer {control_plane.token}'},
                               verify=str(control_plane.ca), timeout=30)
        assert answer.status_code == 201, answer.text
        found[child['kind']] = sorted(server_set(child, answer.json()))
    if os.environ.get('TRAINGUARD_RECORD_GOLDEN'):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(yaml.safe_dump(found, sort_keys=True))
    assert found == load_golden()
