"""Where a process sits in a distributed job, from torchrun's environment (pure, no process group)."""

from __future__ import annotations

import pytest

from trainguard_trainer.distributed import Cluster, from_env, threads_per_process


@pytest.mark.parametrize(('env', 'expected'), [
    ({}, Cluster()),
    ({'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '4'}, Cluster(3, 8, 1, 4)),
    ({'RANK': 'x', 'WORLD_SIZE': '', 'LOCAL_RANK': '-1'}, Cluster()),
], ids=['no-launcher', 'torchrun', 'garbage'])
def test_from_env(env, expected):
    assert from_env(env) == expected


@pytest.mark.parametrize(('pod_threads', 'local', 'expected'), [(8, 1, 8), (8, 4, 2), (2, 4, 1)],
                         ids=['one-process', 'four-gpus', 'never-zero'])
def test_the_pods_threads_are_shared_by_its_processes(pod_threads, local, expected):
    assert threads_per_process(pod_threads, Cluster(local_world_size=local)) == expected


def test_roles_of_ranks():
    assert Cluster(0, 2).main and not Cluster(0, 2).last and Cluster(1, 2).last and Cluster(1, 2).distributed
    assert Cluster().main and Cluster().last and not Cluster().distributed
