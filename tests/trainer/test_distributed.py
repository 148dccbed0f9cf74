"""Two ranks on gloo, each started by torchrun as its own "node" (as two pods would be): real
DistributedDataParallel training on tiny data, rank 0's checkpoint shared on resume, and a
frozen peer that ends the other rank through the collective timeout instead of blocking it."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from tests.trainer.conftest import replace
from tests.trainer.processes import start_in_group, stop_group
from trainguard_trainer.train import CHECKPOINT, train

pytestmark = pytest.mark.timeout(180)

TINY_ARGS = ['--device', 'cpu', '--batch-size', '2', '--resolution', '32', '--crop-size', '32', '--channels', '8,16',
             '--strides', '2', '--num-res-units', '0', '--num-samples', '20', '--heartbeat-seconds', '0',
             '--log-every-steps', '1', '--system-log-seconds', '60']


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def launch(rank: int, port: int, folder: pathlib.Path, *args: str) -> subprocess.Popen[bytes]:
    """One node of a two-node job, started exactly as the operator's pods start the trainer."""
    env = {**os.environ, 'PET_NNODES': '2', 'PET_NPROC_PER_NODE': '1', 'PET_NODE_RANK': str(rank),
           'PET_MASTER_ADDR': '127.0.0.1', 'PET_MASTER_PORT': str(port), 'PET_MAX_RESTARTS': '0'}
    log = (folder / f'rank{rank}.log').open('wb')
    return start_in_group([sys.executable, '-m', 'torch.distributed.run', '--module', 'trainguard_trainer',
                           *TINY_ARGS, '--output-dir', str(folder / f'out{rank}'), *args], log, env=env)


def run_gang(folder: pathlib.Path, *args: str) -> tuple[list[int], list[str]]:
    """Both ranks to the end (each stopped, whole group, if it outlives the wait): exit codes and logs."""
    port = free_port()
    ranks = [launch(rank, port, folder, *args) for rank in (0, 1)]
    try:
        codes = [process.wait(150) for process in ranks]
    finally:
        for process in ranks:
            if process.poll() is None:
                stop_group(process)
    return codes, [(folder / f'rank{rank}.log').read_text() for rank in (0, 1)]


def beats(log: str) -> list[dict]:
    return [json.loads(line.split('heartbeat (no run configured): ', 1)[1])
            for line in log.splitlines() if 'heartbeat (no run configured): ' in line]


def test_two_ranks_train_one_model_and_resume_from_rank_0s_checkpoint(tiny, tmp_path):
    # Epoch 1 on one process (a single-node attempt), into what will be rank 0's output volume.
    train(replace(tiny, epochs=1, output_dir=tmp_path / 'out0', resolution=32, crop_size=32, channels=(8, 16),
                  strides=(2,), num_res_units=0, batch_size=2))
    codes, logs = run_gang(tmp_path, '--epochs', '3')
    assert codes == [0, 0], logs
    for rank, log in enumerate(logs):
        assert f'rank {rank} of 2' in log and 'backend gloo' in log
        assert 'epoch 1 of 3 done' in log and 'epoch 1/3 step' not in log   # resumed, every rank
        # 16 training samples, 8 per rank, batch 2: 4 steps per epoch on each rank.
        assert 'epoch 2/3 step 4/4' in log and 'epoch 3/3 step 4/4' in log
    # Rank 0 beats for the gang (with the world size); rank 1 never does.
    assert beats(logs[0]) and all(beat['worldSize'] == 2 for beat in beats(logs[0])) and not beats(logs[1])
    # The epoch loss is summed over both ranks, so both report the same figure.
    done = [[line.split('done: ', 1)[1].split(',')[0] for line in log.splitlines() if ' done: ' in line]
            for log in logs]
    assert done[0] == done[1] and len(done[0]) == 2
    assert (tmp_path / 'out0' / CHECKPOINT).exists() and not (tmp_path / 'out1' / CHECKPOINT).exists()
    assert (tmp_path / 'out0' / 'metrics.csv').read_text().count('\n') == 4   # header + epochs 1-3


def test_a_frozen_peer_ends_the_other_rank_by_the_collective_timeout(tmp_path):
    port = free_port()
    ranks = [launch(rank, port, tmp_path, '--epochs', '2', '--simulate-hang-after-steps', '1',
                    '--collective-timeout-seconds', '3') for rank in (0, 1)]
    started = time.monotonic()
    try:
        code = ranks[0].wait(120)   # rank 1 froze after its first step; rank 0 must not wait forever
        waited = time.monotonic() - started
        assert ranks[1].poll() is None   # the frozen rank itself only stops with its pod
    finally:
        for process in ranks:
            if process.poll() is None:
                stop_group(process)
    log = (tmp_path / 'rank0.log').read_text()
    assert code != 0, log
    assert 'timed out' in log.lower() or 'timeout' in log.lower(), log[-3000:]
    rank1 = (tmp_path / 'rank1.log').read_text()
    assert 'simulating a hang after 1 steps' in rank1
    print(f'rank 0 ended {waited:.1f}s after launch')


def test_two_ranks_train_on_3d_volumes_and_agree_on_each_structures_dice(tmp_path):
    """A 3D gang: DistributedSampler shares the volumes out, every rank scores its validation
    volumes with a sliding window, and the Dice sums of each structure are combined, so both
    ranks log the same Dice per structure."""
    codes, logs = run_gang(tmp_path, '--spatial-dims', '3', '--num-classes', '3', '--resolution', '24',
                           '--crop-size', '16', '--num-samples', '10', '--epochs', '2')
    assert codes == [0, 0], logs
    scored = [[line.split('validation Dice ', 1)[1].split('), ', 1)[0] for line in log.splitlines()
               if 'validation Dice ' in line] for log in logs]
    assert len(scored[0]) == 2 and scored[0] == scored[1], scored
    assert all('1: ' in entry and '3: ' in entry for entry in scored[0])   # a Dice for each structure
    # 8 training volumes, 4 per rank, batch 2: 2 steps per epoch on each rank.
    assert all('epoch 2/2 step 2/2' in log for log in logs)
