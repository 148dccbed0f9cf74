"""Multi-node runs end to end on the sandbox: two pods per attempt, each a torchrun "node" on this
machine, gloo between them, the real operator and the emulated API. Real time."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest

from tests.e2e_sandbox.test_sandbox import TINY, run, wait_for, wait_for_event
from trainguard_sandbox.app import Sandbox
from trainguard_sandbox.pods import pod_processes_gone

pytestmark = pytest.mark.timeout(300)

# 40 samples: 32 to train, 16 per rank, batch 4: 4 steps per epoch on each rank.
GANG = {'numNodes': 2, 'dataset': {'source': 'synthetic', 'numSamples': 40}}


def gang_pods(sandbox: Sandbox, name: str) -> list[str]:
    assert sandbox.runner is not None
    return sorted({pod.name for pod in sandbox.runner.instances if pod.name.startswith(f'{name}-')})


async def wait_for_log(sandbox: Sandbox, pod: str, text: str, timeout: float = 90) -> None:
    path = sandbox.workdir / 'pods' / 'default' / f'{pod}.log'
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors='replace')):
        assert time.monotonic() < deadline, f'{pod} never logged {text!r}'
        await asyncio.sleep(0.2)


async def test_a_two_node_run_trains_as_one_gang_and_succeeds(sandbox):
    await sandbox.apply(run('pair', **GANG, output={'claimName': 'pair-output'}))
    running = await wait_for(sandbox, 'pair', ('Running', 'Succeeded', 'Failed'))
    if running['status']['phase'] == 'Running':  # Running means every member runs
        assert running['status']['nodes'] == '2/2', running['status']
    done = await wait_for(sandbox, 'pair', ('Succeeded', 'Failed'))
    status = done['status']
    logs = {pod: (sandbox.workdir / 'pods' / 'default' / f'{pod}.log').read_text(errors='replace')[-4000:]
            for pod in gang_pods(sandbox, 'pair')}
    assert status['phase'] == 'Succeeded', (status.get('reason'), status.get('message'), logs)
    assert status['progress']['worldSize'] == 2 and status['progress']['percent'] == 100
    assert status['podName'] == 'pair-1-0' and status['nodes'] == '0/2'
    assert gang_pods(sandbox, 'pair') == ['pair-1-0', 'pair-1-1']
    service = await sandbox.get('/api/v1/namespaces/default/services/pair')
    assert service is not None and service['spec']['clusterIP'] == 'None'
    assert service['metadata']['ownerReferences'][0]['uid'] == done['metadata']['uid']
    logs = {rank: (sandbox.workdir / 'pods' / 'default' / f'pair-1-{rank}.log').read_text() for rank in (0, 1)}
    assert 'rank 0 of 2' in logs[0] and 'rank 1 of 2' in logs[1]
    # Every rank agrees on the epoch's loss (summed over the ranks), each trained 4 steps per epoch.
    assert [line.split('done: ')[1].split(',')[0] for line in logs[0].splitlines() if 'done: train loss' in line] == \
           [line.split('done: ')[1].split(',')[0] for line in logs[1].splitlines() if 'done: train loss' in line]
    assert 'epoch 2/2 step 4/4' in logs[0] and 'epoch 2/2 step 4/4' in logs[1]
    claim = sandbox.workdir / 'volumes' / 'default' / 'claims' / 'pair-output'
    assert (claim / 'checkpoint.pt').exists() and (claim / 'metrics.csv').exists()


async def test_a_killed_rank_retries_the_whole_gang_which_resumes(sandbox):
    """Rank 1 freezes in epoch 2 (after rank 0's epoch-1 checkpoint); killing it fails the gang."""
    await sandbox.apply(run('crash', annotations={'trainguard.io/simulate-hang-after-steps': '6'}, **GANG,
                            backoffLimit=1, progressTimeoutSeconds=120, output={'claimName': 'crash-output'},
                            hyperparameters={**TINY['hyperparameters'], 'epochs': 3}))
    await wait_for_log(sandbox, 'crash-1-1', 'simulating a hang')
    # The next attempt must not freeze again: drop the switch before the kill.
    await sandbox.patch('crash', {'metadata': {'annotations': {'trainguard.io/simulate-hang-after-steps': None}}})
    [rank1] = sandbox.runner.instances_of('default', 'crash-1-1')
    [worker] = psutil.Process(rank1.pid).children(recursive=True)  # torchrun's training process
    os.kill(worker.pid, signal.SIGKILL)
    done = await wait_for(sandbox, 'crash', ('Succeeded', 'Failed'), timeout=180)
    status = done['status']
    assert status['phase'] == 'Succeeded' and status['attempts'] == 2, status
    assert gang_pods(sandbox, 'crash') == ['crash-1-0', 'crash-1-1', 'crash-2-0', 'crash-2-1']
    event = await wait_for_event(sandbox, 'crash', 'PodFailed')
    assert 'attempt 1: rank ' in event['message'], event
    first = [instance for instance in sandbox.runner.instances if instance.name.startswith('crash-1-')]
    await sandbox.runner.wait_stopped([i for i in first if i.killed], timeout=10)
    assert all(pod_processes_gone(instance) for instance in first if instance.killed)
    for rank in (0, 1):  # both ranks resumed from rank 0's checkpoint of epoch 1
        second = (sandbox.workdir / 'pods' / 'default' / f'crash-2-{rank}.log').read_text()
        assert 'epoch 1 of 3 done' in second and 'epoch 1/3 step' not in second


async def test_a_frozen_rank_stops_the_whole_gang_with_progress_timeout(sandbox):
    await sandbox.apply(run('frozen', annotations={'trainguard.io/simulate-hang-after-steps': '2'}, **GANG))
    failed = await wait_for(sandbox, 'frozen', ('Failed', 'Succeeded'), timeout=150)
    status = failed['status']
    assert status['phase'] == 'Failed' and status['reason'] == 'ProgressTimeout', status
    await wait_for_event(sandbox, 'frozen', 'ProgressTimeout')
    instances = [instance for instance in sandbox.runner.instances if instance.name.startswith('frozen-1-')]
    assert sorted(instance.name for instance in instances) == ['frozen-1-0', 'frozen-1-1']
    await sandbox.runner.wait_stopped(instances, timeout=15)   # every rank's process tree, not only rank 0's
    assert all(instance.killed and pod_processes_gone(instance) for instance in instances)
    # Rank 0 waits in DDP's gradient all-reduce for the frozen rank; its watchdog says so.
    assert 'rank 0 of 2, DistributedDataParallel' in status['message'], status['message']
    assert status['stallReport']['class'] == 'Collective'
