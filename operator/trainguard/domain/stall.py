"""Hung-training detection: a pure function of the stored status and the current time.

Staleness is judged on when the operator observed a heartbeat (``lastProgressTime``), not on
the trainer's clock, and the inputs all live in ``.status`` so the decision survives an
operator restart.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from trainguard.domain.heartbeat import SETUP_PHASES, parse_time


@dataclasses.dataclass(frozen=True)
class Healthy:
    deadline: datetime.datetime | None  # when the run becomes stalled if nothing happens


@dataclasses.dataclass(frozen=True)
class Stalled:
    reason: str   # StartupTimeout | ProgressTimeout
    message: str
    silent_seconds: int


def judge_stall(status: Mapping[str, Any], now: datetime.datetime, *,
                progress_timeout: int, startup_timeout: int) -> Healthy | Stalled:
    """Only a Running attempt can stall; heartbeats from an earlier attempt do not count."""
    if status.get('phase') != 'Running':
        return Healthy(None)
    attempt_start = parse_time(status.get('attemptStartTime'))
    if attempt_start is None:
        return Healthy(None)
    progress = status.get('progress') or {}
    last_beat = current_attempt_beat(status)
    if last_beat is None:
        silent = _silence(attempt_start, startup_timeout, now)
        if isinstance(silent, Healthy):
            return silent
        return Stalled('StartupTimeout', f'no heartbeat {silent}s after the trainer pod started'
                                         f' (startupTimeoutSeconds {startup_timeout})', silent)
    if progress.get('phase') in SETUP_PHASES:
        # Set-up (imports, the process group's rendezvous, the model) counts no items or steps:
        # it is held to the startup timeout, from its last beat.
        silent = _silence(last_beat, startup_timeout, now)
        if isinstance(silent, Healthy):
            return silent
        return Stalled('StartupTimeout', f'no progress for {silent}s while {_setup(progress)}'
                                         f' (startupTimeoutSeconds {startup_timeout})', silent)
    silent = _silence(last_beat, progress_timeout, now)
    if isinstance(silent, Healthy):
        return silent
    return Stalled('ProgressTimeout', f'no progress for {silent}s (last: {describe_progress(progress)})', silent)


def current_attempt_beat(status: Mapping[str, Any]) -> datetime.datetime | None:
    """When the operator saw the current attempt's last heartbeat; None before its first (a
    beat from before the attempt started belongs to an earlier attempt)."""
    started = parse_time(status.get('attemptStartTime'))
    beat = parse_time((status.get('progress') or {}).get('lastProgressTime'))
    if beat is None or (started is not None and beat < started):
        return None
    return beat


def _setup(progress: Mapping[str, Any]) -> str:
    detail = progress.get('detail')
    return f"{progress.get('phase')} ({detail})" if detail else str(progress.get('phase'))


def _silence(since: datetime.datetime, timeout: int, now: datetime.datetime) -> Healthy | int:
    """Healthy until ``timeout`` seconds after ``since``; past it, how many seconds it has been."""
    deadline = since + datetime.timedelta(seconds=timeout)
    return Healthy(deadline) if now < deadline else int((now - since).total_seconds())


def judge_gang_start(status: Mapping[str, Any], now: datetime.datetime, *, startup_timeout: int) -> Healthy | Stalled:
    """A multi-node attempt whose pods are not all running ``startup_timeout`` after they were
    created (one member unschedulable, one image that never pulls) is stopped: the members that
    did start would otherwise hold their nodes, waiting at the rendezvous, indefinitely."""
    if status.get('phase') != 'Pending':
        return Healthy(None)
    created = parse_time(status.get('attemptCreationTime'))
    if created is None:
        return Healthy(None)
    silent = _silence(created, startup_timeout, now)
    if isinstance(silent, Healthy):
        return silent
    return Stalled('StartupTimeout', f'only {status.get("nodes", "?")} trainer pods running {silent}s after they were'
                                     f' created (startupTimeoutSeconds {startup_timeout})', silent)


def describe_progress(progress: Mapping[str, Any]) -> str:
    phase = progress.get('phase')
    if phase not in (None, 'Training'):   # e.g. "hung in PreparingData (340/1000)"
        done, total = progress.get('done'), progress.get('total')
        where = f'hung in {phase}' + (f' ({done}/{total})' if done is not None and total else '')
        if progress.get('detail'):
            where += f", {progress['detail']}"
        return where + (f", epoch {progress['epoch']}/{progress.get('epochs', '?')}"
                        if isinstance(progress.get('epoch'), int) and progress['epoch'] >= 1 else '')
    text = f"epoch {progress.get('epoch', '?')}/{progress.get('epochs', '?')}, " \
           f"step {progress.get('step', '?')}/{progress.get('steps', '?')}"
    if isinstance(progress.get('loss'), int | float):
        text += f", loss {progress['loss']:.2f}"
    return text


def due_for_sweep(run: Mapping[str, Any], now: datetime.datetime, *, resync: bool,
                  first_seen: datetime.datetime | None = None, grace: float = 0.0) -> bool:
    """Whether the periodic sweep must reconcile this run now.

    Running runs past their deadline always are; the rest only on a full resync (which
    retries writes that failed). Judging a deadline here is cheap, so a sweep over
    thousands of live runs hands only the few that are due to the (slower) reconcile.
    """
    status = run.get('status') or {}
    if status.get('phase') in ('Succeeded', 'Failed'):
        return False
    if not status.get('phase'):  # a new run whose first status waits for its pod, for a few seconds
        return resync or first_seen is None or (now - first_seen).total_seconds() >= grace
    spec = run.get('spec') or {}
    if past_active_deadline(spec, status, now):
        return True
    gang_starting = status.get('phase') == 'Pending' and bool(status.get('attemptCreationTime'))
    if status.get('phase') != 'Running' and not gang_starting:
        return resync
    progress, startup = spec.get('progressTimeoutSeconds', 300), spec.get('startupTimeoutSeconds', 600)
    if not isinstance(progress, int) or not isinstance(startup, int):
        return True  # let reconcile report the invalid spec
    verdict = (judge_gang_start(status, now, startup_timeout=startup) if gang_starting
               else judge_stall(status, now, progress_timeout=progress, startup_timeout=startup))
    return isinstance(verdict, Stalled) or resync


def active_seconds(status: Mapping[str, Any], now: datetime.datetime) -> int:
    """Seconds the run has been active: earlier stretches plus the current one (a suspended or
    queued run has no current stretch: its clock is stopped)."""
    since = parse_time(status.get('activeSince'))
    current = max(0, int((now - since).total_seconds())) if since is not None else 0
    return int(status.get('activeSeconds') or 0) + current


def past_active_deadline(spec: Mapping[str, Any], status: Mapping[str, Any], now: datetime.datetime) -> bool:
    """spec.activeDeadlineSeconds is up, counted as reconcile counts it (so the sweep hands it a
    run exactly when reconcile will fail it)."""
    deadline = spec.get('activeDeadlineSeconds')
    if not isinstance(deadline, int) or isinstance(deadline, bool) or not status.get('activeSince'):
        return False
    return active_seconds(status, now) > deadline
