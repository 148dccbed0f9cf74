"""A new run's first status waits for its pod: one status write when the pod starts promptly."""

from __future__ import annotations

import datetime

import pytest

from trainguard.domain import reconcile as machine
from trainguard.domain.gang import Gang, PodAbsence
from trainguard.domain.pods import PodState
from trainguard.domain.stall import due_for_sweep

SEEN = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)
RUN = {'metadata': {'name': 'r', 'namespace': 'ml', 'uid': 'u', 'generation': 1},
       'spec': {'device': 'cpu', 'cpuSafety': 'enforce', 'hyperparameters': {'batchSize': 32}}}
RUNNING = PodState('Running', 'Training', 'the trainer is running')
PENDING = PodState('Pending', 'PodPending', 'waiting for the trainer pod to start')
UNSCHEDULABLE = PodState('Pending', 'Unschedulable', '0/3 nodes are available')


def plan_at(seconds: float, pod=PodAbsence.UNKNOWN, first_seen=SEEN) -> machine.Plan:
    view = pod if pod is PodAbsence.UNKNOWN else Gang((('r-1', pod),))
    return machine.reconcile(RUN, view, SEEN + datetime.timedelta(seconds=seconds), machine.Settings(),
                             first_seen=first_seen)


def test_within_the_grace_a_new_run_gets_its_children_and_no_status():
    plan = plan_at(0)
    assert [child['kind'] for child in plan.children] == ['ServiceAccount', 'Pod', 'Role', 'RoleBinding']
    assert plan.status_patch is None and not plan.events and not plan.logs
    assert plan.spec_patch is not None   # without the webhook the CPU rewrite is still written at once


def test_a_pod_seen_running_within_the_grace_is_adopted_in_one_status_write():
    plan = plan_at(1, RUNNING)
    assert not plan.children
    status = plan.status_patch
    assert status is not None and (status['phase'], status['attempts'], status['podName']) == ('Running', 1, 'r-1')
    assert status['adjustments'] and status['attemptStartTime']
    # The CPU-safety record and the phase change: said once, with this first write.
    assert [event.reason for event in plan.events] == ['CPUOptimized', 'Running']


def test_a_plain_pending_pod_within_the_grace_writes_nothing():
    assert plan_at(1, PENDING).empty


@pytest.mark.parametrize(('seconds', 'pod', 'reason'), [
    (1, UNSCHEDULABLE, 'Unschedulable'),
    (5, PENDING, 'PodCreated'),
], ids=['something-to-report', 'grace-over'])
def test_pending_is_written_when_there_is_something_to_say_or_the_grace_is_over(seconds, pod, reason):
    status = plan_at(seconds, pod).status_patch
    assert status is not None and status['phase'] == 'Pending' and status['reason'] == reason
    assert status['attempts'] == 1


@pytest.mark.parametrize('first_seen', [None, SEEN + datetime.timedelta(seconds=30)],
                         ids=['unknown-after-a-restart', 'clock-went-back'])
def test_without_a_usable_first_sighting_the_status_is_written_at_once(first_seen):
    plan = plan_at(0, first_seen=first_seen)
    assert plan.status_patch is not None and plan.status_patch['reason'] == 'PodCreated'


@pytest.mark.parametrize(('seconds', 'resync', 'due'), [
    (4, False, False), (5, False, True), (1, True, True)], ids=['in-grace', 'grace-over', 'resync'])
def test_the_sweep_writes_the_first_status_once_the_grace_is_over(seconds, resync, due):
    assert due_for_sweep(RUN, SEEN + datetime.timedelta(seconds=seconds), resync=resync, first_seen=SEEN,
                         grace=5) is due
