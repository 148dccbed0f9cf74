"""Multi-node training on one machine: 1 vs 2 CPU "nodes", each a torchrun process as a pod runs it.

For each gang size it launches the nodes exactly as the operator's pods are launched (PET_*
environment, ``torchrun --module trainguard_trainer``) and reports:

- time to the gang's first heartbeat: from launching the nodes to rank 0's first beat (every
  rank must have imported torch and MONAI, met at the rendezvous and finished one step);
- training throughput of the whole gang (samples/s of the last epoch, from rank 0's metrics.csv).

Prints figures; asserts nothing. ``python benchmarks/distributed_speed.py`` (``BENCH_REPEATS``,
``BENCH_NODES=1,2``). On a machine with fewer cores than the gang has threads the nodes compete
for the same cores: the figure then measures the cost of distribution, not its speed-up.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

ARGS = ['--device', 'cpu', '--batch-size', '4', '--num-workers', '0', '--epochs', '3', '--resolution', '128',
        '--crop-size', '128', '--num-samples', '80', '--heartbeat-seconds', '0', '--log-every-steps', '10000',
        '--system-log-seconds', '3600']
BEAT = 'heartbeat (no run configured): '


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def run_gang(nodes: int, folder: pathlib.Path) -> dict[str, float]:
    port = _free_port()
    started = datetime.datetime.now(datetime.UTC)
    clock = time.monotonic()
    processes = []
    for rank in range(nodes):
        env = {**os.environ, 'PET_NNODES': str(nodes), 'PET_NPROC_PER_NODE': '1', 'PET_NODE_RANK': str(rank),
               'PET_MASTER_ADDR': '127.0.0.1', 'PET_MASTER_PORT': str(port), 'PET_MAX_RESTARTS': '0'}
        command = ([sys.executable, '-m', 'torch.distributed.run', '--module', 'trainguard_trainer'] if nodes > 1
                   else [sys.executable, '-m', 'trainguard_trainer'])  # one node runs as single-node pods do
        log = (folder / f'rank{rank}.log').open('wb')
        processes.append(subprocess.Popen([*command, *ARGS, '--output-dir', str(folder / f'out{rank}')],
                                          env=env if nodes > 1 else os.environ, stdout=log, stderr=subprocess.STDOUT))
    codes = [process.wait(900) for process in processes]
    wall = time.monotonic() - clock
    if codes != [0] * nodes:
        raise RuntimeError(f'{nodes} nodes exited {codes}: {(folder / "rank0.log").read_text()[-2000:]}')
    first_beat = None
    for line in (folder / 'rank0.log').read_text().splitlines():
        if BEAT in line:
            stamp = datetime.datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S,%f').replace(tzinfo=datetime.UTC)
            first_beat = (stamp - started).total_seconds()
            assert json.loads(line.split(BEAT, 1)[1])['worldSize'] == nodes
            break
    with (folder / 'out0' / 'metrics.csv').open() as file:
        rows = list(csv.DictReader(file))
    return {'first_beat': first_beat or float('nan'), 'samples_per_second': float(rows[-1]['samples_per_second']),
            'wall': wall}


def main() -> None:
    repeats = int(os.environ.get('BENCH_REPEATS', '2'))
    sizes = [int(size) for size in os.environ.get('BENCH_NODES', '1,2').split(',')]
    print(f'machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, '
          f'{psutil.virtual_memory().total / 2**30:.0f} GiB, load {os.getloadavg()[0]:.2f}; '
          f'{datetime.date.today()}')
    print(f'trainer: {" ".join(ARGS)}')
    print(f'{"nodes":>5}  {"first heartbeat s":>18}  {"samples/s (epoch 3)":>20}  {"wall s":>7}')
    for nodes in sizes:
        results = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory(prefix='tg-dist-') as folder:
                results.append(run_gang(nodes, pathlib.Path(folder)))
        beats = [r['first_beat'] for r in results]
        rates = [r['samples_per_second'] for r in results]
        walls = [r['wall'] for r in results]
        print(f'{nodes:>5}  {statistics.median(beats):>10.1f} ({min(beats):.1f}-{max(beats):.1f})'
              f'  {statistics.median(rates):>12.1f} ({min(rates):.1f}-{max(rates):.1f})'
              f'  {statistics.median(walls):>7.1f}')


if __name__ == '__main__':
    main()
