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
import logging
from collections.abc import Mapping, Sequence
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


def start(cluster: Cluster, device: str, timeout_seconds: float) -> None:
    if not cluster.distributed:
        return
    backend = 'nccl' if device == 'cuda' else 'gloo'
    if device == 'cuda':
        torch.cuda.set_device(cluster.local_rank)  # 'cuda' below means this rank's own GPU
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    log.info('distributed: rank %d of %d (local rank %d), backend %s, collective timeout %.0fs',
             cluster.rank, cluster.world_size, cluster.local_rank, backend, timeout_seconds)


def stop(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
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
