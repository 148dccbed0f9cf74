"""The state machine's situations of a started attempt, one row each (trainguard.domain.reconcile.SITUATIONS).

Each row: the stored status, what the operator observed of the attempt's pods, and what the
reconcile decides: the run's phase and reason, the pods it deletes, the attempt it is on.
"""

from __future__ import annotations

import pytest

from tests.unit.test_gang import DONE, NOW, OOM, PENDING, RUNNING, UNSCHEDULABLE
from trainguard.domain import reconcile as machine
from trainguard.domain.gang import Gang, PodAbsence
from trainguard.domain.pods import PodState

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
        '_suspended', '_resumed', '_queued', '_past_deadline', '_disrupted', '_pods_gone', '_succeeded', '_failed',
        '_starting_or_running', '_heartbeat', '_stalled']


def with_spec(stored, **spec):
    stored['spec'].update(spec)
    return stored


EVICTING = PodState('Running', 'Training', 'evicted (node drain)', disruption='EvictionByEvictionAPI',
                    terminating=True)
EVICTED = PodState('Failed', 'Disrupted', 'evicted (node drain)', disruption='EvictionByEvictionAPI')
STOPPING = PodState('Running', 'Training', 'the trainer is running', terminating=True)
ACTIVE = {'activeSince': OLD, 'activeSeconds': 30}   # 600 s in this stretch, 630 s in all
HISTORY = [{'attempt': 1, 'reason': 'EvictionByEvictionAPI', 'message': 'pod unet-1: evicted', 'time': OLD}]


@pytest.mark.parametrize(('stored', 'observed', 'expected', 'stopped'), [
    (with_spec(run(**ACTIVE), suspend=True), RUNNING,
     {'phase': 'Suspended', 'reason': 'Suspended', 'activeSince': None, 'activeSeconds': 630}, ['unet-1']),
    (with_spec(run(phase='Suspended', reason='Suspended'), suspend=True), STOPPING,
     {'phase': 'Suspended', 'attempts': 1}, []),
    (with_spec(run(phase='Suspended', reason='Suspended', activeSince=None, activeSeconds=630), suspend=False),
     PodAbsence.GONE, {'phase': 'Pending', 'reason': 'Resumed', 'attempts': 2, 'activeSince': '2026-11-27T12:00:00Z',
                       'failedAttempts': None}, []),
    (with_spec(run(phase='Suspended', reason='Suspended'), suspend=False), STOPPING,
     {'phase': 'Suspended', 'reason': 'Resuming', 'attempts': 1}, []),
    (with_spec(run(**ACTIVE), activeDeadlineSeconds=600), RUNNING,
     {'phase': 'Failed', 'reason': 'DeadlineExceeded', 'activeSeconds': 630}, ['unet-1']),
    (with_spec(run(phase='Pending', reason='Unschedulable', **ACTIVE), activeDeadlineSeconds=600), UNSCHEDULABLE,
     {'phase': 'Failed', 'reason': 'DeadlineExceeded'}, ['unet-1']),
    (with_spec(run(**ACTIVE), activeDeadlineSeconds=700), RUNNING, {'phase': 'Running', 'attempts': 1}, []),
    (run(), EVICTING, {'phase': 'Running', 'reason': 'Disrupted', 'disruptions': 1, 'attempts': 1}, []),
    (run(), EVICTED, {'phase': 'Pending', 'reason': 'Disrupted', 'disruptions': 1, 'attempts': 2,
                      'failedAttempts': None}, []),
    (run(nodes=2), gang(EVICTING, RUNNING), {'reason': 'Disrupted', 'disruptions': 1}, ['unet-1-1']),
    (run(nodes=2, disruptions=1, disruptionHistory=HISTORY), gang(EVICTED, STOPPING),
     {'reason': 'Disrupted', 'disruptions': 1, 'attempts': 1}, []),
    (with_spec(run(), maxDisruptions=0), EVICTED, {'phase': 'Failed', 'reason': 'TooManyDisruptions'}, []),
    (run(disruptions=1, disruptionHistory=HISTORY), PodAbsence.GONE,
     {'phase': 'Pending', 'reason': 'Disrupted', 'disruptions': 1, 'attempts': 2}, []),
    (run(backoff=1, attempts=4, disruptions=3, failedAttempts=0), OOM,
     {'phase': 'Pending', 'reason': 'Retrying', 'attempts': 5, 'failedAttempts': 1}, []),
    (run(backoff=1, attempts=4, disruptions=3, failedAttempts=1), OOM,
     {'phase': 'Failed', 'reason': 'OOMKilled', 'failedAttempts': 2}, []),
], ids=['suspend-running', 'suspended-stopping', 'resumed', 'resuming-waits', 'deadline-running',
        'deadline-never-scheduled', 'deadline-not-yet', 'evicting', 'evicted-retried-not-counted',
        'gang-rest-stops-gracefully', 'gang-waits-for-the-last-pod', 'too-many-disruptions',
        'disrupted-pods-gone-while-away', 'disruptions-leave-the-backoff-budget', 'then-the-budget-ends-it'])
def test_disruption_suspend_and_deadline_situations(stored, observed, expected, stopped):
    plan = machine.reconcile(stored, observed, NOW, machine.Settings())
    after = {**stored['status'], **(plan.status_patch or {})}
    assert {key: after.get(key) for key in expected} == expected
    assert sorted(plan.stop_pods) == stopped and plan.delete_pods == []
    if after.get('disruptions') != stored['status'].get('disruptions'):
        assert [event.reason for event in plan.events if event.reason == 'Disrupted'] == ['Disrupted']
    else:
        assert 'Disrupted' not in [event.reason for event in plan.events]


def test_a_run_created_suspended_starts_nothing():
    stored = with_spec(run(), suspend=True)
    stored.pop('status')
    plan = machine.reconcile(stored, PodAbsence.UNKNOWN, NOW, machine.Settings())
    assert plan.children == [] and plan.status_patch['phase'] == 'Suspended'
    assert {c['type']: c['status'] for c in plan.status_patch['conditions']}['Suspended'] == 'True'


GATED = PodState('Pending', 'SchedulingGated', 'held by scheduling gate kueue.x-k8s.io/admission',
                 gates=('kueue.x-k8s.io/admission',))


@pytest.mark.parametrize(('stored', 'observed', 'expected'), [
    (with_spec(run(nodes=2, phase='Pending', attemptStartTime=None, attemptCreationTime=OLD, **ACTIVE),
               queueName='team-a', activeDeadlineSeconds=60), gang(GATED, GATED),
     {'phase': 'Queued', 'reason': 'Queued', 'attemptCreationTime': None, 'activeSince': None,
      'activeSeconds': 630}),
    (with_spec(run(phase='Pending', attemptStartTime=None), queueName='team-a'), GATED,
     {'phase': 'Queued', 'attempts': 1}),
    (with_spec(run(nodes=2, phase='Queued', reason='Queued', attemptStartTime=None, attemptCreationTime=None,
                   activeSince=None, activeSeconds=30), queueName='team-a', activeDeadlineSeconds=60),
     gang(PENDING, PENDING),
     {'phase': 'Pending', 'attemptCreationTime': '2026-11-27T12:00:00Z', 'activeSince': '2026-11-27T12:00:00Z'}),
    (with_spec(run(nodes=2, phase='Queued', reason='Queued', attemptStartTime=None, attemptCreationTime=None),
               queueName='team-a'), gang(RUNNING, RUNNING), {'phase': 'Running', 'reason': 'Training'}),
], ids=['gang-held-long-past-every-clock', 'single-held', 'admitted-clocks-start', 'admitted-and-running'])
def test_queued_situations(stored, observed, expected):
    plan = machine.reconcile(stored, observed, NOW, machine.Settings())
    after = {**stored['status'], **(plan.status_patch or {})}
    assert {key: after.get(key) for key in expected} == expected
    assert plan.delete_pods == [] and plan.stop_pods == []
    if after['phase'] == 'Queued':
        assert 'queue team-a' in after['message'] and 'kueue.x-k8s.io/admission' in after['message']
