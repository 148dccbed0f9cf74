"""Silence the operator could not observe is not a hang (trainguard.domain.observer)."""

from __future__ import annotations

import datetime

import pytest

from tests.unit.test_gang import NOW, RUNNING
from tests.unit.test_situations import OLD, run
from trainguard.domain import reconcile as machine
from trainguard.domain.observer import (
    MASS_SILENCE_MIN_RUNS,
    VIEW_MARGIN_SECONDS,
    ApiView,
    View,
    hold_until,
    mass_silence,
)


def ago(seconds: float) -> datetime.datetime:
    return NOW - datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize(('view', 'silent_since', 'held'), [
    (View(), ago(60), False),
    (View(since=ago(3600)), ago(60), False),
    (View(since=ago(10)), ago(60), True),                         # within interval (10) + margin (15)
    (View(since=ago(10)), None, True),                            # when the silence began is not known
    (View(since=ago(10 + VIEW_MARGIN_SECONDS)), ago(60), False),  # exactly at the end of the grace
    (View(since=ago(10)), ago(8), False),                         # the operator watched the silence begin
    (View(since=ago(3600), lost=True), ago(8), True),
], ids=['no-view-tracked', 'long-since', 'just-regained', 'start-unknown', 'grace-over', 'silence-observed-whole',
        'lost'])
def test_a_stall_stands_only_for_silence_the_operator_could_observe(view, silent_since, held):
    assert (hold_until(view, NOW, 10, silent_since) is not None) == held


@pytest.mark.parametrize(('running', 'silent', 'mass'), [
    (10, 1, False), (2, 2, False), (MASS_SILENCE_MIN_RUNS, MASS_SILENCE_MIN_RUNS, True), (10, 5, True),
    (10, 4, False), (100, 49, False), (100, 50, True),
], ids=['one-of-ten', 'two-of-two-too-few', 'three-of-three', 'half', 'under-half', '49-of-100', '50-of-100'])
def test_mass_silence_is_most_running_runs_and_at_least_a_few(running, silent, mass):
    message = mass_silence(running, silent)
    assert (message is not None) == mass
    if mass:
        assert f'{silent} of {running} running runs went silent at once' in message


def test_the_view_is_lost_at_the_first_failure_and_regained_at_the_first_answer():
    view = ApiView(since=ago(600))
    assert view.failed(ago(100)) is True
    assert view.failed(ago(90)) is False                 # the same outage
    assert view.view().lost
    outage = view.answered(ago(33))
    assert outage is not None and outage.seconds == 67
    assert 'could not reach the API server for 67s' in outage.message()
    assert view.view() == View(since=ago(33))
    assert view.answered(NOW) is None


STALLED = run(progress={'lastProgressTime': OLD, 'epoch': 1, 'epochs': 2, 'step': 1, 'steps': 16})


@pytest.mark.parametrize(('view', 'phase', 'stalled_condition', 'deleted'), [
    (View(), 'Failed', 'True', ['unet-1']),
    (View(since=ago(5)), 'Running', None, []),
    (View(lost=True), 'Running', None, []),
    (View(since=ago(3600), mass_silence='3 of 3 running runs went silent at once'), 'Running', 'Unknown', []),
], ids=['observed', 'view-just-regained', 'view-lost', 'mass-silence'])
def test_a_stalled_run_is_stopped_only_when_its_silence_was_observed_and_not_shared_by_most(
        view, phase, stalled_condition, deleted):
    plan = machine.reconcile(STALLED, RUNNING, NOW, machine.Settings(), view=view)
    after = {**STALLED['status'], **(plan.status_patch or {})}
    assert after['phase'] == phase and sorted(plan.delete_pods) == deleted
    conditions = {condition['type']: condition for condition in after.get('conditions') or []}
    if stalled_condition is not None:
        assert conditions['Stalled']['status'] == stalled_condition
    if stalled_condition == 'Unknown':
        assert conditions['Stalled']['reason'] == 'MassSilence'
        assert [event.reason for event in plan.events] == ['MassSilence']
        # Held again on the next sweep: no second Event, no new write.
        again = machine.reconcile({**STALLED, 'status': after}, RUNNING, NOW, machine.Settings(), view=view)
        assert again.events == [] and again.status_patch is None
