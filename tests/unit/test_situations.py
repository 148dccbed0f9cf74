"""The state machine's situations of a started attempt, one row each (trainguard.domain.reconcile.SITUATIONS).

Each row: the stored status, what the operator observed of the attempt's pods, and what the
reconcile decides: the run's phase and reason, the pods it deletes, the attempt it is on.
"""

from __future__ import annotations

import datetime

import pytest

from trainguard.domain import reconcile as machine
from trainguard.domain.gang import Gang, PodAbsence
from trainguard.domain.pods import PodState

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)
RUNNING = PodState('Running', 'Training', 'the trainer is running')
PENDING = PodState('Pending', 'PodPending', 'waiting for the trainer pod to start')
UNSCHEDULABLE = PodState('Pending', 'Unschedulable', '0/3 nodes are available')
OOM = PodState('Failed', 'OOMKilled', 'the trainer ran out of memory and was killed')
DONE = PodState('Succeeded', 'Completed', 'training finished')
FRESH = '2026-11-27T11:59:30Z'   # within every timeout below
OLD = '2026-11-27T11:50:00Z'     # past progressTimeoutSeconds 60 and startupTimeoutSeconds 120


def run(*, backoff: int = 0, nodes: int = 1, **status):
    return {'metadata': {'name': 'unet', 'namespace': 'ml', 'uid': 'u1', 'generation': 1},
            'spec': {'device': 'cpu', 'cpuSafety': 'off', 'backoffLimit': backoff, 'numNodes': nodes,
                     'progressTimeoutSeconds': 60, 'startupTimeoutSeconds': 120,
                     'hyperparameters': {'batchSize': 4, 'numWorkers': 0}},
            'status': {'phase': 'Running', 'attempts': 1, 'podName': 'unet-1' if nodes == 1 else 'unet-1-0',
                       'observedGeneration': 1, 'attemptStartTime': OLD,
                       'progress': {'lastProgressTime': FRESH, 'epoch': 1, 'epochs': 2, 'step': 1, 'steps': 16},
                       **status}}


def gang(*views):
    return Gang(tuple((f'unet-1-{rank}', view) for rank, view in enumerate(views)))


@pytest.mark.parametrize(('stored', 'observed', 'phase', 'reason', 'deleted', 'attempts'), [
    (run(), PodAbsence.GONE, 'Failed', 'PodDeleted', [], 1),
    (run(backoff=1), PodAbsence.GONE, 'Pending', 'Retrying', [], 2),
    (run(), DONE, 'Succeeded', 'Succeeded', [], 1),
    (run(), OOM, 'Failed', 'OOMKilled', [], 1),
    (run(nodes=2), gang(OOM, RUNNING), 'Failed', 'OOMKilled', ['unet-1-1'], 1),
    (run(phase='Pending', attemptStartTime=None), RUNNING, 'Running', 'Training', [], 1),
    (run(phase='Pending', reason='PodCreated', attemptStartTime=None), PENDING, 'Pending', 'PodCreated', [], 1),
    (run(phase='Pending', attemptStartTime=None), UNSCHEDULABLE, 'Pending', 'Unschedulable', [], 1),
    (run(nodes=2, phase='Pending', attemptStartTime=None, attemptCreationTime=OLD), gang(RUNNING, UNSCHEDULABLE),
     'Failed', 'StartupTimeout', ['unet-1-0', 'unet-1-1'], 1),
    (run(reason='Training'), RUNNING, 'Running', 'Training', [], 1),
    (run(progress={'lastProgressTime': OLD, 'epoch': 1, 'epochs': 2, 'step': 1, 'steps': 16}), RUNNING,
     'Failed', 'ProgressTimeout', ['unet-1'], 1),
    (run(reason='Training'), PodAbsence.UNKNOWN, 'Running', 'Training', [], 1),
], ids=['gone', 'gone-retried', 'succeeded', 'failed', 'gang-member-failed', 'started', 'still-pending',
        'unschedulable', 'gang-not-started-in-time', 'running-quietly', 'stalled', 'not-observed-yet'])
def test_situations(stored, observed, phase, reason, deleted, attempts):
    plan = machine.reconcile(stored, observed, NOW, machine.Settings())
    after = {**stored['status'], **(plan.status_patch or {})}
    assert (after['phase'], after.get('reason')) == (phase, reason)
    assert sorted(plan.delete_pods) == deleted
    assert after['attempts'] == attempts


def test_every_situation_is_in_the_table():
    assert [situation.__name__ for situation in machine.SITUATIONS] == [
        '_pods_gone', '_succeeded', '_failed', '_starting_or_running', '_heartbeat', '_stalled']
