"""Stop cleanly when asked: SIGTERM finishes the current step, saves a checkpoint, and exits.

A drained node, a preempting scheduler or a queue taking its quota back deletes the pod; the
kubelet sends SIGTERM and, after the pod's ``terminationGracePeriodSeconds``, SIGKILL. The
handler only sets a flag; the training loop looks at it after every optimizer step (and at
every epoch end), so the checkpoint holds a consistent model, optimizer and position
(epoch and step), and a resumed attempt loses no finished step.

In a gang every rank must stop at the *same* step, or the ranks' checkpointed positions
disagree and a rank left behind waits in a collective for a peer that has gone. torchrun
forwards SIGTERM to its workers, but the pods of a gang receive it at different moments, so
after each step the ranks agree through the process group (one all-reduce of one small
integer): the highest wish wins. The same agreement carries the periodic checkpoint that
rank 0's clock asks for (``checkpointIntervalSeconds``), which bounds what a SIGKILL — a node
lost without warning — can cost.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from trainguard_trainer import distributed

log = logging.getLogger('trainguard_trainer')


class Action(enum.IntEnum):
    CONTINUE = 0
    CHECKPOINT = 1   # save, then go on
    STOP = 2         # save, then exit (EXIT_STOPPED)


class Stopped(Exception):
    """Raised once the checkpoint of a requested stop is written; the CLI exits with EXIT_STOPPED."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f'stopped on SIGTERM after a checkpoint at epoch {epoch} step {step}')
        self.epoch, self.step = epoch, step


class StopControl:
    """SIGTERM and the checkpoint interval, turned into one agreed action per step."""

    def __init__(self, cluster: distributed.Cluster, device: str, interval_seconds: float,
                 clock: Callable[[], float]) -> None:
        self.cluster, self.device = cluster, device
        self.interval, self.clock = interval_seconds, clock
        self.requested = threading.Event()
        self._last_checkpoint = clock()
        self._previous: Any = None

    def install(self) -> None:
        """Handle SIGTERM in this process (only the main thread may install a handler)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested.is_set():
            log.info('SIGTERM: finishing the current step, then a checkpoint and exit')
        self.requested.set()

    def decide(self) -> Action:
        """This rank's wish, agreed with every rank (a collective: every rank calls it at each step)."""
        wish = Action.CONTINUE
        if self.requested.is_set():
            wish = Action.STOP
        elif self.cluster.main and self.interval > 0 and self.clock() - self._last_checkpoint >= self.interval:
            wish = Action.CHECKPOINT
        if self.cluster.distributed:
            tensor = torch.tensor([int(wish)], dtype=torch.int64, device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            wish = Action(int(tensor.item()))
        return wish

    def saved(self) -> None:
        self._last_checkpoint = self.clock()
