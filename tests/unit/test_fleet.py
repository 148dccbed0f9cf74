"""The fleet view's figures, from the runs the operator sees (trainguard.domain.fleet)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from trainguard.domain.fleet import Count, counted, initial_counts, series_per_namespace, snapshot

NOW = datetime.datetime(2026, 12, 2, 12, 0, 0, tzinfo=datetime.UTC)


def run(namespace: str = 'ml', **status):
    return {'metadata': {'name': 'r', 'namespace': namespace}, 'status': status}


def running(namespace: str = 'ml', *, started: str = '2026-12-02T11:50:00Z', beat: str | None = None,
            trainer_phase: str | None = None):
    progress = {'lastProgressTime': beat, **({'phase': trainer_phase} if trainer_phase else {})} if beat else {}
    return run(namespace, phase='Running', reason='Training', attemptStartTime=started, progress=progress)


def ended(namespace: str, phase: str, at: str, reason: str = ''):
    return run(namespace, phase=phase, reason=reason or phase, completionTime=at)


def test_runs_by_phase_include_every_phase_and_a_new_run_is_pending():
    fleet = snapshot([run(), running(), ended('ml', 'Failed', '2026-12-02T11:00:00Z', 'OOMKilled')], NOW)
    assert fleet.runs == {'Pending': 1, 'Queued': 0, 'Running': 1, 'Suspended': 0, 'Succeeded': 0, 'Failed': 1}
    assert fleet.by_reason == {('ml', 'Pending', ''): 1, ('ml', 'Running', 'Training'): 1,
                               ('ml', 'Failed', 'OOMKilled'): 1}


@pytest.mark.parametrize(('runs', 'phases', 'oldest'), [
    ([running(beat='2026-12-02T11:59:00Z', trainer_phase='PreparingData')], {('ml', 'PreparingData'): 1},
     {'ml': 60.0}),
    ([running(beat='2026-12-02T11:59:00Z')], {('ml', 'Training'): 1}, {'ml': 60.0}),
    ([running()], {('ml', 'NoHeartbeat'): 1}, {'ml': 600.0}),
    ([running(beat='2026-12-02T11:00:00Z', trainer_phase='Training')], {('ml', 'NoHeartbeat'): 1}, {'ml': 600.0}),
    ([running(beat='2026-12-02T11:59:50Z', trainer_phase='Validating'),
      running(beat='2026-12-02T11:55:00Z', trainer_phase='Training'),
      running('vision', beat='2026-12-02T11:59:59Z', trainer_phase='Training')],
     {('ml', 'Validating'): 1, ('ml', 'Training'): 1, ('vision', 'Training'): 1}, {'ml': 300.0, 'vision': 1.0}),
], ids=['preparing', 'older-trainer', 'no-beat-yet', 'beat-of-an-earlier-attempt', 'oldest-per-namespace'])
def test_what_running_trainers_do_and_the_longest_silence(runs, phases, oldest):
    fleet = snapshot(runs, NOW)
    assert fleet.trainer_phases == phases
    assert fleet.oldest_heartbeat_seconds == oldest


@pytest.mark.parametrize(('ends', 'streak'), [
    ([('Failed', '10'), ('Failed', '11'), ('Succeeded', '09')], 2),
    ([('Failed', '10'), ('Succeeded', '11')], 0),
    ([('Failed', '10'), ('Failed', '08')], 2),
    ([('Succeeded', '10'), ('Failed', '11'), ('Failed', '12'), ('Failed', '13')], 3),
], ids=['two-since-success', 'success-last', 'no-success', 'three'])
def test_failed_in_a_row_counts_back_from_the_latest_completion(ends, streak):
    fleet = snapshot([ended('ml', phase, f'2026-12-02T{hour}:00:00Z') for phase, hour in ends], NOW)
    assert fleet.failed_in_a_row == {'ml': streak}


def test_an_applied_plan_is_worth_these_counts():
    assert counted('ml', phase='Failed', reason='ProgressTimeout', started_attempt=None, retried=None,
                   stalled='ProgressTimeout', stall_class='DataLoaderWorkers', disrupted=None) == [
        Count('phase_transitions', (('namespace', 'ml'), ('phase', 'Failed'), ('reason', 'ProgressTimeout'))),
        Count('stalls', (('namespace', 'ml'), ('reason', 'ProgressTimeout'), ('class', 'DataLoaderWorkers')))]
    assert counted('ml', phase='Pending', reason='Retrying', started_attempt='Retrying', retried='OOMKilled',
                   stalled=None, stall_class=None, disrupted=None) == [
        Count('phase_transitions', (('namespace', 'ml'), ('phase', 'Pending'), ('reason', 'Retrying'))),
        Count('attempts', (('namespace', 'ml'), ('reason', 'Retrying'))),
        Count('retries', (('namespace', 'ml'), ('reason', 'OOMKilled')))]
    assert counted('ml', phase=None, reason=None, started_attempt=None, retried=None, stalled='StartupTimeout',
                   stall_class=None, disrupted='EvictionByEvictionAPI') == [
        Count('stalls', (('namespace', 'ml'), ('reason', 'StartupTimeout'), ('class', 'NoReport'))),
        Count('disruptions', (('namespace', 'ml'), ('reason', 'EvictionByEvictionAPI')))]


def test_reconcile_says_which_attempt_it_starts_and_which_failure_it_retries():
    from tests.unit.test_gang import NOW as RECONCILED
    from tests.unit.test_gang import RUNNING
    from tests.unit.test_situations import OLD
    from tests.unit.test_situations import run as stored
    from trainguard.domain import reconcile as machine
    from trainguard.domain.gang import PodAbsence

    retried = machine.reconcile(stored(backoff=1), PodAbsence.GONE, RECONCILED, machine.Settings())
    assert (retried.started_attempt, retried.retried) == ('Retrying', 'PodDeleted')
    hung = stored(progress={'lastProgressTime': OLD, 'epoch': 1, 'epochs': 2, 'step': 1, 'steps': 16})
    stalled = machine.reconcile(hung, RUNNING, RECONCILED, machine.Settings())
    assert (stalled.stalled, stalled.stall_class, stalled.started_attempt) == ('ProgressTimeout', None, None)


def test_every_counter_a_rule_reads_exists_at_zero_in_a_namespace_before_its_first_event():
    counts = initial_counts('ml')
    assert len(counts) == len(set(counts)) == series_per_namespace() == 48
    by_metric = {metric: {dict(count.labels).get('reason') for count in counts if count.metric == metric}
                 for metric in ('attempts', 'retries', 'stalls', 'disruptions')}
    assert by_metric['attempts'] == {'PodCreated', 'Retrying', 'Resumed', 'Disrupted'}
    assert by_metric['stalls'] == {'StartupTimeout', 'ProgressTimeout'}
    assert {dict(count.labels)['class'] for count in counts if count.metric == 'stalls'} == {
        'DataLoaderWorkers', 'Collective', 'DataRead', 'Unknown', 'NoReport'}
    assert {'EvictionByEvictionAPI', 'PreemptionByScheduler', 'StoppedByKueue', 'Other'} <= by_metric['disruptions']
    assert all(dict(count.labels)['namespace'] == 'ml' for count in counts)


@pytest.mark.parametrize(('field', 'value', 'counted_as'), [
    ('disrupted', 'SomeNewClusterReason', 'Other'), ('retried', 'SomethingElse', 'Other'),
    ('stall_class', 'Brand-new', 'Unknown'),
], ids=['disruption', 'retry', 'stall-class'])
def test_a_value_outside_a_closed_set_is_counted_in_the_set(field, value, counted_as):
    arguments = {'phase': None, 'reason': None, 'started_attempt': None, 'retried': None, 'stalled': None,
                 'stall_class': None, 'disrupted': None, field: value}
    if field == 'stall_class':
        arguments['stalled'] = 'ProgressTimeout'
    (count,) = counted('ml', **arguments)
    assert counted_as in dict(count.labels).values()
    assert count in initial_counts('ml')


def situation_plans() -> list[tuple[str, Any]]:
    """(row id, plan) of every row of the reconcile situation tables."""
    from tests.unit import test_situations as situations
    from tests.unit.test_gang import NOW as RECONCILED
    from trainguard.domain import reconcile as machine

    plans = []
    for test in (situations.test_situations, situations.test_disruption_suspend_and_deadline_situations,
                 situations.test_queued_situations):
        (mark,) = [mark for mark in test.pytestmark if mark.name == 'parametrize']
        for index, row in enumerate(mark.args[1]):
            plans.append((mark.kwargs['ids'][index], machine.reconcile(row[0], row[1], RECONCILED,
                                                                       machine.Settings())))
    return plans


def test_every_count_the_reconcile_tables_produce_was_created_at_zero():
    """The class check: a new reason added to the state machine must join its closed set, or its
    first event is invisible to increase() again (and would be counted as Other here)."""
    initial = set(initial_counts('default'))
    checked = 0
    for row, plan in situation_plans():
        patch = plan.status_patch or {}
        for count in counted('default', phase=patch.get('phase'), reason=patch.get('reason'),
                             started_attempt=plan.started_attempt, retried=plan.retried, stalled=plan.stalled,
                             stall_class=plan.stall_class, disrupted=plan.disrupted):
            if count.metric == 'phase_transitions' and dict(count.labels)['phase'] not in ('Succeeded', 'Failed'):
                continue   # read by no rule or panel with increase()
            assert 'Other' not in dict(count.labels).values(), (row, count)
            assert count in initial, (row, count)
            checked += 1
    assert checked >= 20
