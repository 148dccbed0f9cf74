"""Every status the operator writes survives the CRD's structural pruning.

A status field missing from the schema is dropped by the API server without an error. For
status.progress that is worse than a lost field: the operator compares the stored progress
with the heartbeat to decide whether a beat is new, so a pruned key makes every beat look new,
every reconcile re-stamps lastProgressTime, and a hung run is never caught. This checks the
class, not one field: every status patch of the reconcile tables, and a heartbeat of every
phase with every optional field, must come back from pruning unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.crd_schema import run_schema
from tests.unit import test_situations as situations
from tests.unit.test_gang import NOW, RUNNING
from trainguard.domain import reconcile as machine
from trainguard.domain.heartbeat import PHASES, PROGRESS_ANNOTATION
from trainguard_sandbox.crd import prune

STATUS_SCHEMA = run_schema()['properties']['status']


def table_rows() -> list[Any]:
    """(stored, observed) of every row of the situation tables."""
    rows = []
    for test in (situations.test_situations, situations.test_disruption_suspend_and_deadline_situations,
                 situations.test_queued_situations):
        (mark,) = [mark for mark in test.pytestmark if mark.name == 'parametrize']
        rows += [pytest.param(row[0], row[1], id=f'{test.__name__}-{mark.kwargs["ids"][index]}')
                 for index, row in enumerate(mark.args[1])]
    return rows


def beating(phase: str) -> dict[str, Any]:
    """A running run whose trainer sent a beat of ``phase`` with every optional field."""
    training = phase == 'Training'
    beat = {'phase': phase, 'epoch': 1 if training else 0, 'epochs': 2, 'step': 3 if training else 0,
            'steps': 16 if training else 0, 'loss': 0.5, 'samplesPerSecond': 9.5, 'worldSize': 2, 'done': 3,
            'total': 9, 'detail': 'caching', 'time': '2026-11-27T11:59:59Z', 'dice': 0.71, 'bestDice': 0.74,
            'bestEpoch': 1}
    run = situations.run(reason='Training')
    run['metadata']['annotations'] = {PROGRESS_ANNOTATION: json.dumps(beat)}
    return run


@pytest.mark.parametrize(('stored', 'observed'), [
    *table_rows(), *(pytest.param(beating(phase), RUNNING, id=f'beat-{phase}') for phase in PHASES)])
def test_every_status_patch_survives_pruning(stored, observed):
    patch = machine.reconcile(stored, observed, NOW, machine.Settings()).status_patch or {}
    assert prune(STATUS_SCHEMA, patch) == patch


@pytest.mark.parametrize('phase', PHASES)
def test_a_beat_of_every_phase_is_mirrored_whole(phase):
    patch = machine.reconcile(beating(phase), RUNNING, NOW, machine.Settings()).status_patch or {}
    progress = patch['progress']
    assert progress['phase'] == phase and progress['detail'] == 'caching' and progress['worldSize'] == 2
