"""A multi-node attempt's pods, judged as one: the gang lives and dies together.

One stuck or dead rank blocks every other rank inside the next collective, so a gang is only
as healthy as its worst member: any member Failed or gone fails the attempt, the attempt runs
only when every member runs, and it succeeded only when every member succeeded. The result is
a single pod-like state, so the run's state machine (``reconcile``) treats a gang exactly like
one pod; ``live`` names the members still holding a node, which a stopped attempt deletes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from trainguard.domain.pods import PodState


class PodAbsence(enum.Enum):
    UNKNOWN = 'unknown'   # not observed yet (e.g. right after an operator restart)
    GONE = 'gone'         # confirmed absent by the API


PodView = PodState | PodAbsence

# Reasons that say more than "a rank exited non-zero": when one rank is OOMKilled, its peers
# fail too (their collective lost a member), and the OOM is what the run should report.
_GENERIC_FAILURES = frozenset({'PodFailed'})
_HOLDING_NODES = frozenset({'Pending', 'Running'})


@dataclasses.dataclass(frozen=True)
class Gang:
    """The attempt's pods in rank order, each with what the operator observed of it."""

    members: tuple[tuple[str, PodView], ...]


@dataclasses.dataclass(frozen=True)
class Disruption:
    reason: str    # e.g. EvictionByEvictionAPI, PreemptionByScheduler
    message: str   # which member, and what the cluster said


@dataclasses.dataclass(frozen=True)
class GangSummary:
    state: PodView
    running: int          # members Running (a Succeeded member no longer holds its node)
    total: int
    live: tuple[str, ...]  # members that may still hold a node: delete these to stop the attempt
    stopping: tuple[str, ...] = ()  # live members whose deletion was already requested (grace period)
    disruption: Disruption | None = None  # the cluster took a member: the attempt ends, not by its fault
    gated: int = 0                 # members held by a scheduling gate (a queue has not admitted them)
    gates: tuple[str, ...] = ()    # the gates' names

    @property
    def nodes(self) -> str:
        return f'{self.running}/{self.total}'

    @property
    def to_stop(self) -> tuple[str, ...]:
        """Live members not yet asked to stop (asking again would only repeat a write)."""
        return tuple(name for name in self.live if name not in self.stopping)


def summarize(gang: Gang) -> GangSummary:
    members = gang.members
    total = len(members)
    running = sum(1 for _, view in members if isinstance(view, PodState) and view.phase == 'Running')
    live = tuple(name for name, view in members
                 if view is PodAbsence.UNKNOWN or (isinstance(view, PodState) and view.phase in _HOLDING_NODES))
    stopping = tuple(name for name, view in members if isinstance(view, PodState) and view.terminating
                     and name in live)
    disrupted = next(((rank, name, view) for rank, (name, view) in enumerate(members)
                      if isinstance(view, PodState) and view.disruption), None)
    disruption = None
    if disrupted is not None:
        rank, name, view = disrupted
        disruption = Disruption(view.disruption, f'{_label(rank, name, total)}: {view.message}')
    held = [view for _, view in members if isinstance(view, PodState) and view.gates]
    gates = tuple(dict.fromkeys(gate for view in held for gate in view.gates))
    return GangSummary(_state(members), running, total, live, stopping, disruption, len(held), gates)


def _label(rank: int, name: str, total: int) -> str:
    return f'rank {rank} (pod {name})' if total > 1 else f'pod {name}'


def _state(members: Sequence[tuple[str, PodView]]) -> PodView:
    total = len(members)
    failed = [(rank, name, view) for rank, (name, view) in enumerate(members)
              if isinstance(view, PodState) and view.phase == 'Failed']
    if failed:
        rank, name, view = next((item for item in failed if item[2].reason not in _GENERIC_FAILURES), failed[0])
        if total == 1:
            return view
        return PodState('Failed', view.reason, f'{_label(rank, name, total)}: {view.message}')
    gone = [(rank, name) for rank, (name, view) in enumerate(members) if view is PodAbsence.GONE]
    if gone:
        if total == 1:
            return PodAbsence.GONE
        rank, name = gone[0]
        return PodState('Failed', 'PodDeleted', f'trainer pod {name} (rank {rank}) was deleted')
    if any(view is PodAbsence.UNKNOWN for _, view in members):
        return PodAbsence.UNKNOWN
    states = [view for _, view in members if isinstance(view, PodState)]
    if all(view.phase == 'Succeeded' for view in states):
        return PodState('Succeeded', 'Completed', 'training finished')
    if all(view.phase in ('Running', 'Succeeded') for view in states):
        return PodState('Running', 'Training', 'the trainer is running')
    pending = [(rank, name, view) for rank, (name, view) in enumerate(members)
               if isinstance(view, PodState) and view.phase == 'Pending']
    rank, name, view = next((item for item in pending if item[2].reason != 'PodPending'), pending[0])
    if total == 1:
        return view
    running = sum(1 for view in states if view.phase == 'Running')
    return PodState('Pending', view.reason,
                    f'{running}/{total} trainer pods running; {_label(rank, name, total)}: {view.message}')
