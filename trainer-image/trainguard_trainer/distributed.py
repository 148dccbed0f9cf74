"""torch.distributed for a run that torchrun started on several nodes (or several GPUs).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK and the rendezvous address; a process started
without it (a single-node run, a test) is rank 0 of 1 and nothing here touches
torch.distributed. gloo on CPU, NCCL on CUDA. Every collective has a timeout, so a process
whose peer died or froze ends with an error instead of blocking forever (the operator stops
a silent gang sooner, from rank 0's heartbeat).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger('trainguard_trainer')


@dataclasses.dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1   # processes in this pod (torchrun's nproc-per-node)

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics, curves and the heartbeat for the whole gang."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def last(self) -> bool:
        return self.rank == self.world_size - 1


SINGLE = Cluster()  # a process started without a launcher: rank 0 of 1


def from_env(env: Mapping[str, str]) -> Cluster:
    """The process's place in the job, as torchrun (or any launcher of the env:// contract) set it."""
    def number(name: str, default: int) -> int:
        text = env.get(name, '')
        return int(text) if text.isdigit() else default

    return Cluster(rank=number('RANK', 0), world_size=max(1, number('WORLD_SIZE', 1)),
                   local_rank=number('LOCAL_RANK', 0), local_world_size=max(1, number('LOCAL_WORLD_SIZE', 1)))


def threads_per_process(pod_threads: int, cluster: Cluster) -> int:
    """The pod's CPU threads shared by its processes (one per GPU under torchrun), at least one each."""
    return max(1, pod_threads // cluster.local_world_size)


def start(cluster: Cluster, device: str, timeout_seconds: float) -> dist.Store | None:
    """Join the process group; returns the rendezvous store (None for a single process).

    The env:// rendezvous is done here rather than inside init_process_group so the store
    stays at hand: ranks report their data preparation in it (GangPreparation), which needs
    no collective while they are at different places.
    """
    if not cluster.distributed:
        return None
    backend = 'nccl' if device == 'cuda' else 'gloo'
    if device == 'cuda':
        torch.cuda.set_device(cluster.local_rank)  # 'cuda' below means this rank's own GPU
    timeout = datetime.timedelta(seconds=timeout_seconds)
    # What init_process_group(init_method='env://') does itself: the same store and prefix.
    store, rank, world_size = next(dist.rendezvous('env://', cluster.rank, cluster.world_size, timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group(backend, store=dist.PrefixStore('default_pg', store), rank=rank, world_size=world_size,
                            timeout=timeout)
    log.info('distributed: rank %d of %d (local rank %d), backend %s, collective timeout %.0fs',
             cluster.rank, cluster.world_size, cluster.local_rank, backend, timeout_seconds)
    return dist.PrefixStore('trainguard/', store)


@dataclasses.dataclass(frozen=True)
class RankPreparation:
    rank: int
    stage: str      # generating, scanning, caching, ready
    done: int
    total: int


class GangPreparation:
    """Where every rank is in its data preparation, through the rendezvous store.

    Rank 0 beats for the gang, and a rank that finished preparing waits at the next
    collective for the slowest. Without this the gang's heartbeat falls silent for as long
    as the slowest rank still caches, and a hang there looks the same as a slow rank. Each
    rank writes its own counter after every item; rank 0, once ready itself, reports the
    slowest rank's counter as it moves and stops reporting when it stops moving.
    """

    def __init__(self, store: dist.Store | None, cluster: Cluster) -> None:
        self._store, self._cluster = store, cluster

    def report(self, stage: str, done: int, total: int) -> None:
        if self._store is not None:
            self._store.set(f'prepared/{self._cluster.rank}', json.dumps([stage, done, total]))

    def ranks(self) -> list[RankPreparation | None]:
        """Each rank's last report (None: it reported nothing yet)."""
        if self._store is None:
            return []
        states: list[RankPreparation | None] = []
        for rank in range(self._cluster.world_size):
            key = f'prepared/{rank}'
            states.append(RankPreparation(rank, *json.loads(self._store.get(key))) if self._store.check([key])
                          else None)
        return states

    def wait_until_all_ready(self, on_progress: Callable[[RankPreparation | None, int], None], timeout_seconds: float,
                             clock: Callable[[], float] = time.monotonic,
                             sleep: Callable[[float], None] = time.sleep) -> None:
        """Rank 0: returns when every rank is ready; calls ``on_progress(slowest, rank)`` each
        time the slowest rank's report changes, and raises TimeoutError when no rank's report
        changed for ``timeout_seconds`` (the collective timeout: what the next collective
        would have waited)."""
        last, changed = None, clock()
        while True:
            states = self.ranks()
            if states and all(state is not None and state.stage == 'ready' for state in states):
                return
            waiting = [(index, state) for index, state in enumerate(states)
                       if state is None or state.stage != 'ready']
            if states != last:
                last, changed = states, clock()
                rank, slowest = min(waiting, key=lambda pair: (pair[1] is not None,
                                                               pair[1].done / max(pair[1].total, 1) if pair[1] else 0))
                on_progress(slowest, rank)
            elif clock() - changed > timeout_seconds:
                silent = ', '.join(str(index) for index, _ in waiting)
                raise TimeoutError(f'rank(s) {silent} reported no data preparation for {timeout_seconds:.0f}s')
            sleep(0.1)


def stop(cluster: Cluster, *, finished: bool = False) -> None:
    """Leave the process group. ``finished``: every rank completed training, so they first meet
    at a barrier (no rank tears its connections down while a peer's last collective is in
    flight). Either way DistributedDataParallel's reducer, which sits in reference cycles, is
    collected while the group and the interpreter are alive: left to the interpreter's
    shutdown, gloo work it holds was seen to abort a finished rank (SIGABRT, "terminate called
    without an active exception"; pytorch/pytorch#179291 describes the same teardown)."""
    if not (cluster.distributed and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def broadcast(cluster: Cluster, value: Any) -> Any:
    """Rank 0's value on every rank (e.g. the checkpoint only rank 0 can read)."""
    if not cluster.distributed:
        return value
    box = [value if cluster.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(cluster: Cluster, values: Sequence[float], device: str) -> list[float]:
    """Element-wise sums over every rank (epoch loss and sample counts, validation Dice)."""
    if not cluster.distributed:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(item) for item in tensor.tolist()]
