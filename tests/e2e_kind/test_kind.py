"""End to end on a real cluster (kind): both images, the Helm chart, the samples, real phases.

Skips cleanly without a Docker engine. In CI it runs in .github/workflows/e2e-kind.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml

from tests.crd_schema import ROOT

pytestmark = [pytest.mark.e2e_kind, pytest.mark.timeout(1800)]

OPERATOR_IMAGE = 'trainguard/operator:e2e'
TRAINER_IMAGE = 'trainguard/trainer:e2e'


def run(*command: str, timeout: float = 900) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout).stdout


@pytest.fixture(scope='session')
def installed(kind_cluster):
    run('docker', 'build', '-f', str(ROOT / 'operator' / 'Dockerfile'), '-t', OPERATOR_IMAGE, str(ROOT))
    run('docker', 'build', '-t', TRAINER_IMAGE, str(ROOT / 'trainer-image'))
    kind_cluster.load_docker_image(OPERATOR_IMAGE)
    kind_cluster.load_docker_image(TRAINER_IMAGE)
    run('helm', 'install', 'trainguard', str(ROOT / 'charts' / 'trainguard'), '--kubeconfig',
        str(kind_cluster.kubeconfig_path), '--namespace', 'trainguard-system', '--create-namespace', '--wait',
        '--set', 'image.repository=trainguard/operator', '--set', 'image.tag=e2e',
        '--set', 'image.pullPolicy=Never', '--set', 'operator.trainerImage.repository=trainguard/trainer',
        '--set', 'operator.trainerImage.tag=e2e', '--set', 'operator.trainerImage.pullPolicy=Never')
    yield kind_cluster


@pytest.fixture(autouse=True)
def dump_on_failure(request, installed):
    yield
    report = getattr(request.node, 'rep_call', None)
    if report is not None and report.failed:
        for args in (('logs', '-n', 'trainguard-system', 'deployment/trainguard', '--tail=200'),
                     ('get', 'events', '-A', '--sort-by=.lastTimestamp'),
                     ('get', 'tr,pods', '-A', '-o', 'wide')):
            print(installed.kubectl(*args))


def wait_for(cluster, name: str, jsonpath: str, timeout: str) -> None:
    cluster.kubectl('wait', f'trainingrun/{name}', f'--for=jsonpath={jsonpath}', f'--timeout={timeout}')


def wait_pods_gone(cluster, run: str, timeout: float = 60) -> None:
    """Every pod of the run deleted (a deleted pod's grace period may still be running)."""
    deadline = time.monotonic() + timeout
    while cluster.kubectl('get', 'pods', '-l', f'trainguard.io/run={run}', '-o', 'name').strip():
        assert time.monotonic() < deadline, f'a pod of {run} is still there {timeout:.0f}s after it stopped'
        time.sleep(1)


def apply_sample(cluster, sample: str) -> None:
    cluster.kubectl('apply', '-f', str(ROOT / 'manifests' / 'samples' / sample))


def run_field(cluster, run: str, jsonpath: str) -> str:
    return cluster.kubectl('get', 'tr', run, '-o', f'jsonpath={jsonpath}').strip()


def test_cpu_run_is_rewritten_and_succeeds(installed):
    apply_sample(installed, 'cpu-run.yaml')
    wait_for(installed, 'unet-cpu', '{.status.phase}=Succeeded', '900s')
    assert run_field(installed, 'unet-cpu', '{.spec.hyperparameters.batchSize}') == '4'


def test_hung_run_fails_with_progress_timeout(installed):
    apply_sample(installed, 'hang-demo-run.yaml')
    wait_for(installed, 'unet-hang-demo', '{.status.reason}=ProgressTimeout', '600s')
    wait_pods_gone(installed, 'unet-hang-demo')


def test_a_two_node_run_trains_over_the_headless_service(installed):
    """Real cluster DNS: rank 1 reaches rank 0 at <hostname>.<service> through the headless Service."""
    apply_sample(installed, 'multinode-run.yaml')
    wait_for(installed, 'unet-multinode', '{.status.phase}=Succeeded', '900s')
    assert run_field(installed, 'unet-multinode', '{.status.progress.worldSize}') == '2'


def test_a_frozen_rank_stops_the_whole_gang(installed):
    apply_sample(installed, 'multinode-hang-demo-run.yaml')
    wait_for(installed, 'unet-multinode-hang-demo', '{.status.reason}=ProgressTimeout', '600s')
    wait_pods_gone(installed, 'unet-multinode-hang-demo')   # both ranks' pods


def test_a_run_with_a_pod_template_gets_its_priority_pull_secret_and_labels(installed):
    """manifests/samples/shared-cluster-run.yaml on a real cluster: a PriorityClass the pod must
    name (kube-apiserver's Priority admission resolves it to a number), a pull secret, an
    affinity, a label and env from a Secret, on the trainer pod that then trains to Succeeded."""
    installed.kubectl('create', 'priorityclass', 'training-high', '--value=1000', '--description=training runs')
    installed.kubectl('create', 'secret', 'docker-registry', 'registry-credentials', '--docker-server=example.com',
                      '--docker-username=ci', '--docker-password=ci')
    apply_sample(installed, 'shared-cluster-run.yaml')
    wait_for(installed, 'unet-shared-cluster', '{.status.phase}=Succeeded', '900s')
    pod = json.loads(installed.kubectl('get', 'pod', 'unet-shared-cluster-1', '-o', 'json'))
    assert pod['spec']['priorityClassName'] == 'training-high' and pod['spec']['priority'] == 1000
    assert pod['spec']['imagePullSecrets'] == [{'name': 'registry-credentials'}]
    assert pod['metadata']['labels']['cost-center'] == 'radiology'
    assert pod['metadata']['labels']['kueue.x-k8s.io/priority-class'] == 'training-high'
    assert pod['spec']['containers'][0]['envFrom'] == [{'secretRef': {'name': 'mlflow-token', 'optional': True}}]


KUEUE_VERSION = os.environ.get('KUEUE_VERSION', 'v0.10.1')
KUEUE_MANIFEST = f'https://github.com/kubernetes-sigs/kueue/releases/download/{KUEUE_VERSION}/manifests.yaml'


@pytest.fixture(scope='session')
def kueue(installed):
    """Kueue from its release manifest, with the plain-Pod integration on for namespaces
    labelled kueue-managed=true (it is off by default), and the queues of kueue-queues.yaml."""
    installed.kubectl('apply', '--server-side', '-f', KUEUE_MANIFEST)
    installed.kubectl('rollout', 'status', 'deployment/kueue-controller-manager', '-n', 'kueue-system',
                      '--timeout=300s')
    config_map = json.loads(installed.kubectl('get', 'configmap', 'kueue-manager-config', '-n', 'kueue-system',
                                              '-o', 'json'))
    config = yaml.safe_load(config_map['data']['controller_manager_config.yaml'])
    frameworks = config.setdefault('integrations', {}).setdefault('frameworks', [])
    if 'pod' not in frameworks:
        frameworks.append('pod')
    config['managedJobsNamespaceSelector'] = {'matchLabels': {'kueue-managed': 'true'}}
    config_map['data']['controller_manager_config.yaml'] = yaml.safe_dump(config)
    for key in ('resourceVersion', 'uid', 'creationTimestamp', 'managedFields'):
        config_map['metadata'].pop(key, None)
    patched = ROOT / 'out' / 'kueue-manager-config.json'
    patched.parent.mkdir(exist_ok=True)
    patched.write_text(json.dumps(config_map))
    installed.kubectl('apply', '-f', str(patched))
    installed.kubectl('rollout', 'restart', 'deployment/kueue-controller-manager', '-n', 'kueue-system')
    installed.kubectl('rollout', 'status', 'deployment/kueue-controller-manager', '-n', 'kueue-system',
                      '--timeout=300s')
    installed.kubectl('create', 'namespace', 'ml-queued')
    installed.kubectl('label', 'namespace', 'ml-queued', 'kueue-managed=true')
    deadline = time.monotonic() + 120   # the webhook answers a moment after the rollout
    while True:
        try:
            installed.kubectl('apply', '-f', str(ROOT / 'tests' / 'e2e_kind' / 'kueue-queues.yaml'))
            break
        except subprocess.CalledProcessError as error:
            assert time.monotonic() < deadline, error.stderr
            time.sleep(2)
    yield installed


def test_a_queued_gang_waits_past_its_startup_timeout_then_trains_once_admitted(kueue):
    kueue.kubectl('apply', '-n', 'ml-queued', '-f', str(ROOT / 'manifests' / 'samples' / 'queued-multinode-run.yaml'))
    kueue.kubectl('wait', 'trainingrun/unet-queued', '-n', 'ml-queued', '--for=jsonpath={.status.phase}=Queued',
                  '--timeout=300s')
    held_until = time.monotonic() + 60   # twice its startupTimeoutSeconds (30): the quota holds it
    while time.monotonic() < held_until:
        assert kueue.kubectl('get', 'tr', 'unet-queued', '-n', 'ml-queued', '-o',
                             'jsonpath={.status.phase}').strip() == 'Queued'
        time.sleep(5)
    groups = kueue.kubectl('get', 'pods', '-n', 'ml-queued', '-o',
                           'jsonpath={.items[*].metadata.labels.kueue\\.x-k8s\\.io/pod-group-name}').split()
    assert groups == ['unet-queued-1', 'unet-queued-1']
    kueue.kubectl('patch', 'clusterqueue', 'trainguard', '--type=json', '-p', json.dumps([
        {'op': 'replace', 'path': '/spec/resourceGroups/0/flavors/0/resources/0/nominalQuota', 'value': '4'}]))
    kueue.kubectl('wait', 'trainingrun/unet-queued', '-n', 'ml-queued', '--for=jsonpath={.status.phase}=Succeeded',
                  '--timeout=900s')
    assert kueue.kubectl('get', 'tr', 'unet-queued', '-n', 'ml-queued', '-o',
                         'jsonpath={.status.attempts}').strip() == '1'
