"""A multi-node attempt judged as one gang: summary rules and what reconcile does with them."""

from __future__ import annotations

import datetime

import pytest

from trainguard.domain import reconcile as machine
from trainguard.domain.gang import Gang, PodAbsence, summarize
from trainguard.domain.pods import PodState
from trainguard.domain.stall import judge_gang_start

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)
RUNNING = PodState('Running', 'Training', 'the trainer is running')
PENDING = PodState('Pending', 'PodPending', 'waiting for the trainer pod to start')
UNSCHEDULABLE = PodState('Pending', 'Unschedulable', '0/3 nodes are available')
DONE = PodState('Succeeded', 'Completed', 'training finished')
EXITED = PodState('Failed', 'PodFailed', 'the trainer exited with code 1')
OOM = PodState('Failed', 'OOMKilled', 'the trainer ran out of memory and was killed')


def gang(*views):
    return Gang(tuple((f'r-1-{rank}', view) for rank, view in enumerate(views)))


@pytest.mark.parametrize(('views', 'phase', 'reason', 'nodes', 'live'), [
    ((RUNNING, RUNNING), 'Running', 'Training', '2/2', ('r-1-0', 'r-1-1')),
    ((RUNNING, PENDING), 'Pending', 'PodPending', '1/2', ('r-1-0', 'r-1-1')),
    ((RUNNING, UNSCHEDULABLE), 'Pending', 'Unschedulable', '1/2', ('r-1-0', 'r-1-1')),
    ((DONE, RUNNING), 'Running', 'Training', '1/2', ('r-1-1',)),
    ((DONE, DONE), 'Succeeded', 'Completed', '0/2', ()),
    ((RUNNING, EXITED), 'Failed', 'PodFailed', '1/2', ('r-1-0',)),
    ((EXITED, OOM), 'Failed', 'OOMKilled', '0/2', ()),
    ((RUNNING, PodAbsence.GONE), 'Failed', 'PodDeleted', '1/2', ('r-1-0',)),
    ((RUNNING, PodAbsence.UNKNOWN), None, None, '1/2', ('r-1-0', 'r-1-1')),
], ids=['all-running', 'one-pending', 'one-unschedulable', 'one-done-one-running', 'all-done', 'one-failed',
        'specific-failure-wins', 'one-deleted', 'one-unknown'])
def test_summary(views, phase, reason, nodes, live):
    summary = summarize(gang(*views))
    if phase is None:
        assert summary.state is PodAbsence.UNKNOWN
    else:
        assert isinstance(summary.state, PodState)
        assert (summary.state.phase, summary.state.reason) == (phase, reason)
    assert summary.nodes == nodes and summary.live == live


def test_messages_name_the_rank_and_pod():
    assert summarize(gang(RUNNING, OOM)).state.message == \
        'rank 1 (pod r-1-1): the trainer ran out of memory and was killed'
    assert summarize(gang(RUNNING, PodAbsence.GONE)).state.message == 'trainer pod r-1-1 (rank 1) was deleted'
    assert summarize(gang(RUNNING, UNSCHEDULABLE)).state.message == \
        '1/2 trainer pods running; rank 1 (pod r-1-1): 0/3 nodes are available'


@pytest.mark.parametrize('view', [RUNNING, PENDING, DONE, EXITED, PodAbsence.GONE, PodAbsence.UNKNOWN],
                         ids=['running', 'pending', 'done', 'failed', 'gone', 'unknown'])
def test_a_gang_of_one_is_its_pod(view):
    assert summarize(Gang((('r-1', view),))).state == view


def run(num_nodes=2, backoff=1, **status):
    return {'metadata': {'name': 'r', 'namespace': 'ml', 'uid': 'u', 'generation': 1},
            'spec': {'numNodes': num_nodes, 'backoffLimit': backoff, 'cpuSafety': 'off', 'device': 'cpu',
                     'startupTimeoutSeconds': 600, 'progressTimeoutSeconds': 300},
            'status': status}


def started(**extra):
    return {'phase': 'Pending', 'reason': 'PodCreated', 'attempts': 1, 'podName': 'r-1-0', 'nodes': '0/2',
            'observedGeneration': 1, 'attemptCreationTime': '2026-11-27T11:59:00Z', **extra}


def test_the_first_reconcile_creates_the_service_and_one_pod_per_rank():
    plan = machine.reconcile(run(), PodAbsence.UNKNOWN, NOW, machine.Settings())
    kinds = [(child['kind'], child['metadata']['name']) for child in plan.children]
    # What the pods need at admission first, the pods, then what only the first beat needs.
    assert kinds == [('ServiceAccount', 'r-trainer'), ('Service', 'r'), ('Pod', 'r-1-0'), ('Pod', 'r-1-1'),
                     ('Role', 'r-trainer'), ('RoleBinding', 'r-trainer')]
    assert plan.status_patch is not None
    assert {key: plan.status_patch[key] for key in ('podName', 'nodes', 'attemptCreationTime', 'message')} == {
        'podName': 'r-1-0', 'nodes': '0/2', 'attemptCreationTime': '2026-11-27T12:00:00Z',
        'message': 'created 2 trainer pods r-1-0 .. r-1-1 and Service r'}


def test_a_single_node_run_creates_no_service_and_keeps_its_pod_name():
    plan = machine.reconcile(run(num_nodes=1), PodAbsence.UNKNOWN, NOW, machine.Settings())
    assert [child['kind'] for child in plan.children] == ['ServiceAccount', 'Pod', 'Role', 'RoleBinding']
    assert plan.children[1]['metadata']['name'] == 'r-1'
    assert 'attemptCreationTime' not in (plan.status_patch or {})


@pytest.mark.parametrize(('views', 'deleted', 'reason'), [
    ((RUNNING, EXITED), ['r-1-0'], 'PodFailed'),
    ((RUNNING, OOM), ['r-1-0'], 'OOMKilled'),
    ((RUNNING, PodAbsence.GONE), ['r-1-0'], 'PodDeleted'),
    ((EXITED, EXITED), [], 'PodFailed'),
], ids=['one-failed', 'one-oom', 'one-deleted', 'all-failed'])
def test_one_member_down_stops_the_rest_and_retries_the_whole_gang(views, deleted, reason):
    plan = machine.reconcile(run(**started(phase='Running', nodes='2/2', attemptStartTime='2026-11-27T11:59:30Z')),
                             gang(*views), NOW, machine.Settings())
    assert plan.delete_pods == deleted
    assert [child['metadata']['name'] for child in plan.children if child['kind'] == 'Pod'] == ['r-2-0', 'r-2-1']
    assert plan.status_patch['attempts'] == 2 and plan.status_patch['podName'] == 'r-2-0'
    assert plan.status_patch['nodes'] == '0/2'
    assert any(event.reason == reason for event in plan.events)


def test_out_of_retries_the_gang_fails_and_no_member_is_left():
    plan = machine.reconcile(run(backoff=0, **started(phase='Running', nodes='2/2')), gang(RUNNING, OOM), NOW,
                             machine.Settings())
    assert plan.delete_pods == ['r-1-0'] and not plan.children
    assert plan.status_patch['phase'] == 'Failed' and plan.status_patch['reason'] == 'OOMKilled'
    assert plan.status_patch['nodes'] == '0/2'


def test_a_stalled_gang_deletes_every_member():
    status = started(phase='Running', nodes='2/2', attemptStartTime='2026-11-27T11:40:00Z')
    plan = machine.reconcile(run(backoff=0, **status), gang(RUNNING, RUNNING), NOW, machine.Settings())
    assert plan.stalled == 'StartupTimeout' and plan.delete_pods == ['r-1-0', 'r-1-1']


def test_a_gang_not_fully_running_within_the_startup_timeout_is_stopped():
    status = started(nodes='1/2', attemptCreationTime='2026-11-27T11:49:59Z')
    plan = machine.reconcile(run(backoff=0, **status), gang(RUNNING, UNSCHEDULABLE), NOW, machine.Settings())
    assert plan.stalled == 'StartupTimeout' and plan.delete_pods == ['r-1-0', 'r-1-1']
    assert plan.status_patch['phase'] == 'Failed'
    assert plan.status_patch['message'].startswith('only 1/2 trainer pods running 601s after they were created')
    assert plan.status_patch['message'].endswith('rank 1 (pod r-1-1): 0/3 nodes are available')


def test_a_gang_starting_within_its_timeout_waits_and_shows_its_count():
    plan = machine.reconcile(run(**started()), gang(RUNNING, PENDING), NOW, machine.Settings())
    assert not plan.delete_pods and not plan.children
    assert plan.status_patch['nodes'] == '1/2' and 'phase' not in plan.status_patch


def test_a_fully_running_gang_is_running_and_reconciling_again_writes_nothing():
    plan = machine.reconcile(run(**started()), gang(RUNNING, RUNNING), NOW, machine.Settings())
    assert plan.status_patch['phase'] == 'Running' and plan.status_patch['nodes'] == '2/2'
    assert plan.status_patch['message'] == 'training in 2 pods (r-1-0 is rank 0)'
    again = machine.reconcile(run(**{**started(), **plan.status_patch}), gang(RUNNING, RUNNING), NOW,
                              machine.Settings())
    assert again.empty


def test_a_finished_gang_succeeds():
    plan = machine.reconcile(run(**started(phase='Running', nodes='2/2')), gang(DONE, DONE), NOW, machine.Settings())
    assert plan.status_patch['phase'] == 'Succeeded' and plan.status_patch['nodes'] == '0/2'


@pytest.mark.parametrize(('seconds', 'stalled'), [(599, False), (600, True)], ids=['in-time', 'late'])
def test_gang_start_deadline(seconds, stalled):
    status = {'phase': 'Pending', 'nodes': '1/2', 'attemptCreationTime': '2026-11-27T12:00:00Z'}
    verdict = judge_gang_start(status, NOW + datetime.timedelta(seconds=seconds), startup_timeout=600)
    assert (type(verdict).__name__ == 'Stalled') is stalled
