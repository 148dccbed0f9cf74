"""High availability: two operator processes with kopf peering; the active one is SIGKILLed mid-run.

Real processes (``trainguard-operator run --peering``) against the emulator, in real time: the
standby must take over once the active one has been silent for the peering lifetime, without
a duplicate pod and without losing a run that was created while nobody was active.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import kmock
import pytest
import yaml

from tests.crd_schema import ROOT
from tests.operator.conftest import PODS
from tests.operator.identities import chart_rbac
from tests.operator.test_lifecycle import beat, phase, run_body, set_pod_phase
from trainguard_sandbox.emulator import register_crd

pytestmark = pytest.mark.timeout(180)
PEERINGS = kmock.resource('kopf.dev', 'v1', 'clusterkopfpeerings')
LIFETIME = 10
# kopf's own peering CRD, as the chart installs it (from its crds/ folder, before its templates).
PEERING_CRD = yaml.safe_load((ROOT / 'charts' / 'trainguard' / 'crds' / 'clusterkopfpeerings.kopf.dev.yaml')
                             .read_text())


@pytest.fixture()
def operator_rbac() -> list[dict]:
    """Both operators run as the chart's ServiceAccount with the chart's HA rules."""
    return chart_rbac('replicaCount=2')


def start_operator(tmp_path, kubeconfig: str, name: str, priority: int) -> subprocess.Popen:
    env = {**os.environ, 'KUBECONFIG': kubeconfig, 'TRAINGUARD_PEERING_PRIORITY': str(priority),
           'TRAINGUARD_PEERING_LIFETIME_SECONDS': str(LIFETIME), 'TRAINGUARD_SWEEP_SECONDS': '1'}
    log = (tmp_path / f'{name}.log').open('wb')
    return subprocess.Popen([sys.executable, '-m', 'trainguard.cli', 'run', '--peering=trainguard', '--verbose'],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def test_a_standby_takes_over_when_the_active_operator_is_killed(api, cluster, tmp_path):
    register_crd(cluster, PEERING_CRD)
    await api.create({'apiVersion': 'kopf.dev/v1', 'kind': 'ClusterKopfPeering', 'metadata': {'name': 'trainguard'}},
                     resource=PEERINGS, namespace=None)
    kubeconfig = os.environ['KUBECONFIG']
    # The active one first, then the standby: the standby's watches start paused by the peering
    # and, with a live peer of higher priority already registered, never resume.
    active = start_operator(tmp_path, kubeconfig, 'active', priority=200)
    standby = None
    try:
        await api.wait_for(lambda: _peers(api, 1), timeout=60, what='the active operator in the peering object')
        standby = start_operator(tmp_path, kubeconfig, 'standby', priority=100)
        await api.wait_for(lambda: _peers(api, 2), timeout=60, what='both operators in the peering object')
        standby_log = tmp_path / 'standby.log'
        await api.create(run_body('first', device='cpu'))
        await api.wait_for_run('first', phase('Pending'), timeout=60)
        assert 'Resuming operations' not in standby_log.read_text()

        os.killpg(active.pid, signal.SIGKILL)   # mid-run, without a chance to say goodbye
        killed = time.monotonic()
        active.wait(timeout=10)
        await api.create(run_body('second', device='cpu'))  # created while nobody is active
        await api.wait_for_run('second', phase('Pending'), timeout=LIFETIME + 50)
        takeover = time.monotonic() - killed
        print(f'takeover: the standby served a run created after the kill {takeover:.1f}s later')
        # The standby waits for the dead peer's lifetime to pass, no more (README, "High availability").
        assert takeover <= LIFETIME + 10, (takeover, standby_log.read_text()[-3000:])
        # The standby serves the run the killed operator started, too.
        await set_pod_phase(api, 'first-1', 'Running', running={'startedAt': '2026-11-25T12:00:00Z'})
        await api.wait_for_run('first', phase('Running'), timeout=30)
        await beat(api, 'first', epoch=1, step=3, loss=0.5)
        await api.wait_for_run('first', lambda r: (r['status'].get('progress') or {}).get('step') == 3, timeout=30)
        pods = sorted(pod['metadata']['name'] for pod in await api.list(PODS))
        assert pods == ['first-1', 'second-1']
        assert (await api.get('first'))['status']['attempts'] == 1
        assert 'Resuming operations' in standby_log.read_text()
    finally:
        for process in (active, standby):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                # In a thread: the operator's goodbye goes to the emulator, which runs on this loop.
                await asyncio.to_thread(process.wait, 30)


async def _peers(api, count: int) -> bool:
    peering = await api.find('trainguard', resource=PEERINGS, namespace=None)
    return len((peering or {}).get('status') or {}) == count
