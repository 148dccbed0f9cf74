"""A gang's data preparation seen from rank 0: every rank's counter in the rendezvous store
(here torch's in-process HashStore, the same Store interface), reported as it moves."""

from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist

from trainguard_trainer.distributed import Cluster, GangPreparation, RankPreparation


def gang(world_size: int = 3) -> tuple[dist.HashStore, list[GangPreparation]]:
    store = dist.HashStore()
    return store, [GangPreparation(store, Cluster(rank=rank, world_size=world_size)) for rank in range(world_size)]


def test_rank_0_reports_the_slowest_rank_as_it_moves_and_returns_when_all_are_ready():
    _, ranks = gang()
    script = iter([
        lambda: ranks[1].report('caching', 5, 10),            # rank 2 has not reported yet: it is the slowest
        lambda: ranks[2].report('caching', 2, 10),
        lambda: None,                                         # nothing moved: no report
        lambda: ranks[2].report('caching', 9, 10),            # now rank 1 is behind
        lambda: ranks[1].report('ready', 1, 1),
        lambda: ranks[2].report('ready', 1, 1),
    ])
    ranks[0].report('ready', 1, 1)
    seen: list[tuple[int, RankPreparation | None]] = []
    ranks[0].wait_until_all_ready(lambda state, rank: seen.append((rank, state)), timeout_seconds=60,
                                  clock=itertools.count().__next__, sleep=lambda _: next(script)())
    assert [(rank, state and (state.stage, state.done)) for rank, state in seen] == [
        (1, None), (2, None), (2, ('caching', 2)), (1, ('caching', 5)), (2, ('caching', 9))]


def test_a_rank_whose_counter_stops_ends_the_wait_after_the_collective_timeout():
    _, ranks = gang(2)
    ranks[0].report('ready', 1, 1)
    ranks[1].report('caching', 340, 1000)
    ticks = itertools.count(step=10)
    with pytest.raises(TimeoutError, match=r'rank\(s\) 1 reported no data preparation for 30s'):
        ranks[0].wait_until_all_ready(lambda state, rank: None, timeout_seconds=30, clock=ticks.__next__,
                                      sleep=lambda _: None)


def test_a_single_process_has_no_gang():
    single = GangPreparation(None, Cluster())
    single.report('caching', 1, 2)
    assert single.ranks() == []
