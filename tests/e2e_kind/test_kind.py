"""End to end on a real cluster (kind): both images, the Helm chart, the samples, real phases.

Skips cleanly without a Docker engine. In CI it runs in .github/workflows/e2e-kind.yaml.
"""

from __future__ import annotations

import subprocess
import time

import pytest

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
