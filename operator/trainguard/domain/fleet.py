"""The fleet view: what a platform team running hundreds of runs puts on a screen and pages on.

Two kinds of figures, both pure functions here (the metrics module only exports them):

- **State, computed at scrape time** from the runs the operator sees (:func:`snapshot`): runs
  by namespace, phase and reason; running runs by what their trainer is doing; the longest
  silence among running runs; runs failed in a row. Derived from the same cache the operator
  decides on, so they cannot drift from it, and they survive an operator restart (counters
  do not).
- **Events, counted as plans are applied** (:func:`counted`): phase transitions, attempts
  started and why, retries by the failure retried, stalls by reason and class, disruptions.

Cardinality is bounded: labels are namespaces and closed sets of phases, reasons and classes,
never a run's name (a run per series would grow without end on a busy cluster).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from trainguard.domain.heartbeat import PHASES as TRAINER_PHASES
from trainguard.domain.heartbeat import parse_time
from trainguard.domain.pods import DISRUPTION_REASONS, TRAINER_EXIT_REASONS
from trainguard.domain.stall import current_attempt_beat
from trainguard.domain.stallreport import CLASSES as STALL_REPORT_CLASSES

PHASES = ('Pending', 'Queued', 'Running', 'Suspended', 'Succeeded', 'Failed')

# The closed label sets of the counters. Prometheus sees a labelled series only from its first
# sample, so a counter born at 1 has no increase() and an alert on it never fires for the first
# event: every set below exists at 0 in a namespace from the moment the operator first sees a
# run there (initial_counts). A value outside its set is counted as OTHER, so the sets stay
# closed and the series count per namespace stays what the README says (series_per_namespace).
OTHER = 'Other'
HANG_REASONS = ('StartupTimeout', 'ProgressTimeout')
STALL_CLASSES = (*STALL_REPORT_CLASSES, 'NoReport')
ATTEMPT_REASONS = ('PodCreated', 'Retrying', 'Resumed', 'Disrupted')
# Why an attempt fails by the training's (or its pod's) fault: retried within backoffLimit.
ATTEMPT_FAILURES = (*HANG_REASONS, 'PodFailed', 'OOMKilled', 'PodDeleted', *TRAINER_EXIT_REASONS, OTHER)
# Why a run ends Failed: an attempt's failure, or the run's own limits.
RUN_FAILURES = (*ATTEMPT_FAILURES[:-1], 'InvalidSpec', 'DeadlineExceeded', 'TooManyDisruptions', OTHER)
# Kueue's TerminationTarget says StoppedByKueue, or the eviction's reason (Preempted, ...).
DISRUPTIONS = (*DISRUPTION_REASONS, 'StoppedByKueue', 'Preempted', OTHER)
# Only the transitions into an ending phase are read with increase() (runs ending, by phase and
# reason); the others carry the pod's own waiting reasons and are born at their first event.
ENDINGS = (('Succeeded', 'Succeeded'), *(('Failed', reason) for reason in RUN_FAILURES))


@dataclasses.dataclass(frozen=True)
class Fleet:
    runs: Mapping[str, int]                          # phase -> runs (every phase, zeros included)
    by_reason: Mapping[tuple[str, str, str], int]    # (namespace, phase, reason) -> runs
    trainer_phases: Mapping[tuple[str, str], int]    # (namespace, trainer phase) -> Running runs
    oldest_heartbeat_seconds: Mapping[str, float]    # namespace -> longest silence among Running runs
    failed_in_a_row: Mapping[str, int]               # namespace -> finished runs Failed since the last Succeeded


def snapshot(runs: Iterable[Mapping[str, Any]], now: datetime.datetime) -> Fleet:
    phases: collections.Counter[str] = collections.Counter()
    by_reason: collections.Counter[tuple[str, str, str]] = collections.Counter()
    trainer_phases: collections.Counter[tuple[str, str]] = collections.Counter()
    silence: dict[str, float] = {}
    finished: dict[str, list[tuple[datetime.datetime, str]]] = collections.defaultdict(list)
    for run in runs:
        namespace = (run.get('metadata') or {}).get('namespace') or 'default'
        status = run.get('status') or {}
        phase = status.get('phase') or 'Pending'
        phases[phase] += 1
        by_reason[(namespace, phase, str(status.get('reason') or ''))] += 1
        if phase == 'Running':
            trainer_phases[(namespace, _trainer_phase(status))] += 1
            since = _last_sign_of_life(status)
            if since is not None:
                silence[namespace] = max(silence.get(namespace, 0.0), max(0.0, (now - since).total_seconds()))
        elif phase in ('Succeeded', 'Failed'):
            ended = parse_time(status.get('completionTime'))
            if ended is not None:
                finished[namespace].append((ended, phase))
    return Fleet(runs={phase: phases.get(phase, 0) for phase in PHASES}, by_reason=dict(by_reason),
                 trainer_phases=dict(trainer_phases), oldest_heartbeat_seconds=silence,
                 failed_in_a_row={namespace: _failed_in_a_row(ends) for namespace, ends in finished.items()})


def _trainer_phase(status: Mapping[str, Any]) -> str:
    """What a running run's trainer is doing: its last beat's phase (an older trainer's beats
    are Training); NoHeartbeat before the current attempt's first beat."""
    if current_attempt_beat(status) is None:
        return 'NoHeartbeat'
    phase = (status.get('progress') or {}).get('phase')
    return phase if phase in TRAINER_PHASES else 'Training'


def _last_sign_of_life(status: Mapping[str, Any]) -> datetime.datetime | None:
    """The last heartbeat of the current attempt, else the attempt's start (silent since then)."""
    return current_attempt_beat(status) or parse_time(status.get('attemptStartTime'))


def _failed_in_a_row(ends: list[tuple[datetime.datetime, str]]) -> int:
    streak = 0
    for _, phase in sorted(ends, reverse=True):
        if phase != 'Failed':
            break
        streak += 1
    return streak


@dataclasses.dataclass(frozen=True)
class Count:
    """One counter increment: the metric's short name and its labels."""
    metric: str
    labels: tuple[tuple[str, str], ...]


def initial_counts(namespace: str) -> list[Count]:
    """Every label set of every counter a rule or panel reads with increase() or rate(), for one
    namespace: created at 0 before the first event, so the first event is an increase."""
    return [*(Count('phase_transitions', (('namespace', namespace), ('phase', phase), ('reason', reason)))
              for phase, reason in ENDINGS),
            *(Count('attempts', (('namespace', namespace), ('reason', reason))) for reason in ATTEMPT_REASONS),
            *(Count('retries', (('namespace', namespace), ('reason', reason))) for reason in ATTEMPT_FAILURES),
            *(Count('stalls', (('namespace', namespace), ('reason', reason), ('class', kind)))
              for reason in HANG_REASONS for kind in STALL_CLASSES),
            *(Count('disruptions', (('namespace', namespace), ('reason', reason))) for reason in DISRUPTIONS)]


def series_per_namespace() -> int:
    """How many counter series one namespace costs (the README's metrics table says it)."""
    return len(initial_counts('-'))


def _closed(value: str | None, allowed: tuple[str, ...], fallback: str = OTHER) -> str:
    return value if value in allowed else fallback


def counted(namespace: str, *, phase: str | None, reason: str | None, started_attempt: str | None,
            retried: str | None, stalled: str | None, stall_class: str | None,
            disrupted: str | None) -> list[Count]:
    """The counter increments one applied plan is worth (what its fields say happened)."""
    counts: list[Count] = []
    if phase:
        if phase == 'Failed':
            reason = _closed(reason, RUN_FAILURES)
        counts.append(Count('phase_transitions', (('namespace', namespace), ('phase', phase),
                                                  ('reason', reason or ''))))
    if started_attempt:
        counts.append(Count('attempts', (('namespace', namespace),
                                         ('reason', _closed(started_attempt, ATTEMPT_REASONS)))))
    if retried:
        counts.append(Count('retries', (('namespace', namespace), ('reason', _closed(retried, ATTEMPT_FAILURES)))))
    if stalled:
        counts.append(Count('stalls', (('namespace', namespace), ('reason', _closed(stalled, HANG_REASONS)),
                                       ('class', _closed(stall_class or 'NoReport', STALL_CLASSES, 'Unknown')))))
    if disrupted:
        counts.append(Count('disruptions', (('namespace', namespace), ('reason', _closed(disrupted, DISRUPTIONS)))))
    return counts
