"""Silence the operator could not observe is not a hang.

A heartbeat judged stale only says the *operator* saw none. When the operator itself could not
hear (the API server stopped for an upgrade, a certificate rotation, an etcd failover; the
operator restarting or taking over as leader), the silence is the observer's, and a run must
not pay for it. Two rules, after kubelet's node leases and kube-controller-manager's
"disruption mode":

- **A view that restarts grants a grace.** The operator's view of the API starts when the
  process starts (or takes over as leader) and again when the API answers after an outage.
  A run whose silence began before the view did is never convicted before ``view_since +
  heartbeat interval + VIEW_MARGIN_SECONDS``: its trainer gets one full interval to be heard
  (its retries are capped at the interval) plus a margin for the watch to deliver it. A
  silence the operator watched begin is judged on its timeout alone. While the view is lost
  nothing is convicted.
- **Mass silence is the observer's problem.** When at least ``MASS_SILENCE_MIN_RUNS`` running
  runs and at least ``MASS_SILENCE_FRACTION`` of them are silent past their timeouts at once,
  the operator does not stop them: it marks them ``Stalled=Unknown`` (reason ``MassSilence``)
  and judges again when beats return. One hung run among many is still caught on time.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from trainguard.domain.heartbeat import format_time

VIEW_MARGIN_SECONDS = 15
MASS_SILENCE_FRACTION = 0.5
MASS_SILENCE_MIN_RUNS = 3


@dataclasses.dataclass(frozen=True)
class View:
    """What the operator could observe of the API when it judges."""
    since: datetime.datetime | None = None   # unbroken since then (start, takeover, an outage's end); None: no limit
    lost: bool = False                        # it cannot reach the API now
    mass_silence: str | None = None           # why every stall is held now (see mass_silence), or None


# A view with no known start and nothing held: every stall stands (callers that track no view).
UNLIMITED_VIEW = View()


def hold_until(view: View, now: datetime.datetime, heartbeat_seconds: float,
               silent_since: datetime.datetime | None = None) -> datetime.datetime | None:
    """When a stalled verdict may stand at the earliest, if that is later than ``now``; None when
    it may stand now. A lost view holds it with no known end (``datetime.max``).

    ``silent_since``: when the run's silence began (its last beat as observed, or its start).
    A silence that began inside the view was observed whole: nothing to hold. Only a silence
    that began before the view (before a restart, a takeover, an outage's end) gets the grace."""
    if view.lost:
        return datetime.datetime.max.replace(tzinfo=datetime.UTC)
    if view.since is None or (silent_since is not None and silent_since >= view.since):
        return None
    earliest = view.since + datetime.timedelta(seconds=heartbeat_seconds + VIEW_MARGIN_SECONDS)
    return earliest if now < earliest else None


def mass_silence(running: int, silent: int) -> str | None:
    """A message when this many silent runs among this many running ones is the observer's
    silence rather than theirs; None otherwise."""
    if silent < MASS_SILENCE_MIN_RUNS or silent < MASS_SILENCE_FRACTION * running:
        return None
    return (f'{silent} of {running} running runs went silent at once: the control plane or the operator\'s view '
            'of it is the likelier cause, so none is stopped; each is judged again when heartbeats return')


def silent_runs(runs: Iterable[Mapping[str, Any]], is_silent: Callable[[Mapping[str, Any]], bool]) -> tuple[int, int]:
    """(running runs, of them silent past their timeout)."""
    running = [run for run in runs if (run.get('status') or {}).get('phase') == 'Running']
    return len(running), sum(1 for run in running if is_silent(run))


@dataclasses.dataclass(frozen=True)
class Outage:
    """A span the operator could not reach the API."""
    began: datetime.datetime
    ended: datetime.datetime

    @property
    def seconds(self) -> float:
        return max(0.0, (self.ended - self.began).total_seconds())

    def message(self) -> str:
        return (f'the operator could not reach the API server for {self.seconds:.0f}s '
                f'({format_time(self.began)} to {format_time(self.ended)}); that silence is not held against any '
                f'run: each running run gets its heartbeat interval plus {VIEW_MARGIN_SECONDS}s to be heard')


@dataclasses.dataclass
class ApiView:
    """The operator's view of the API as a small state machine (the runtime feeds it each
    request's outcome and its probes): when it was lost and when it was regained."""
    since: datetime.datetime
    lost_at: datetime.datetime | None = None

    def failed(self, now: datetime.datetime) -> bool:
        """A request found no API; True when this loses the view (the first failure)."""
        if self.lost_at is not None:
            return False
        self.lost_at = now
        return True

    def answered(self, now: datetime.datetime) -> Outage | None:
        """The API answered; the outage this ends, if any (the view is unbroken from now)."""
        if self.lost_at is None:
            return None
        outage = Outage(self.lost_at, now)
        self.lost_at, self.since = None, now
        return outage

    def view(self, mass: str | None = None) -> View:
        return View(since=self.since, lost=self.lost_at is not None, mass_silence=mass)
