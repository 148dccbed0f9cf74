"""Say where the trainer hung: a watchdog thread that reports stacks and DataLoader workers.

The training loop calls ``step()`` after every optimizer step. When no step has finished for
``after_seconds`` (``before_first_seconds`` until the first step), the watchdog writes one
stall report — every thread's Python stack (the frames ``faulthandler`` prints), the state
of the DataLoader's worker processes, RSS and open files — to the log and to
``stall-report.txt`` in the output folder, and sends a compact summary to the operator, which
quotes it when it stops the run. One report per stall: the next finished step re-arms it.

A hang inside C code that holds the GIL stops this thread too: then no report is sent and
the operator's message says only what it observed, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import psutil

log = logging.getLogger('trainguard_trainer')
SUMMARY_LIMIT = 2048
REPORT_FILE = 'stall-report.txt'


@dataclasses.dataclass(frozen=True)
class WorkerState:
    pid: int | None
    alive: bool
    exitcode: int | None


def describe_worker(index: int, worker: WorkerState) -> str:
    if worker.alive:
        return f'DataLoader worker {index} (pid {worker.pid}) is alive'
    return f'DataLoader worker {index} (pid {worker.pid}) exited with {worker.exitcode}'


def _short(filename: str) -> str:
    """site-packages/torch/utils/data/dataloader.py -> torch/utils/data/dataloader.py."""
    parts = pathlib.PurePath(filename).parts
    for anchor in ('site-packages', 'dist-packages'):
        if anchor in parts:
            return '/'.join(parts[parts.index(anchor) + 1:])
    return '/'.join(parts[-3:])


# Where every blocked thread ends up: naming these says nothing about *why* it waits. That
# includes all of multiprocessing's plumbing: a batch from a DataLoader worker arrives as
# shared-memory handles, received through the worker's resource sharer
# (multiprocessing/resource_sharer.py, reduction.py, torch/multiprocessing/reductions.py);
# a worker process that is frozen leaves the main thread waiting there.
_WAIT_PRIMITIVES = ('threading.py', 'queue.py', 'selectors.py', 'socket.py', 'subprocess.py')
_PLUMBING_PACKAGES = ('/multiprocessing/', 'torch/multiprocessing/')


def _is_plumbing(filename: str) -> bool:
    path = pathlib.PurePath(filename).as_posix()
    return path.endswith(_WAIT_PRIMITIVES) or any(package in path for package in _PLUMBING_PACKAGES)


def _chosen_frame(frames: list[traceback.FrameSummary]) -> traceback.FrameSummary:
    """The innermost frame of the main thread that is not a generic wait or multiprocessing plumbing."""
    return next((frame for frame in reversed(frames) if not _is_plumbing(frame.filename)), frames[-1])


def _describe(frame: traceback.FrameSummary) -> str:
    return f'{_short(frame.filename)}:{frame.lineno} {frame.name}'


def _hung_in(stack: traceback.StackSummary) -> str:
    chosen = _chosen_frame(list(stack))
    return f'{_short(chosen.filename)}:{chosen.name}'


def summary_frames(stack: traceback.StackSummary, count: int = 6) -> list[str]:
    """The innermost frames, always including the one the summary names (the operator
    classifies the hang by these frames, and plumbing alone says nothing)."""
    frames = list(stack)
    innermost = frames[-count:]
    chosen = _chosen_frame(frames)
    if any(frame is chosen for frame in innermost):
        return [_describe(frame) for frame in innermost]
    return [_describe(chosen), '...', *(_describe(frame) for frame in innermost[-(count - 2):])]


def build_report(main_thread_id: int, workers: list[WorkerState], silent_seconds: float,
                 step: int, context: str = '') -> tuple[str, dict[str, Any]]:
    """(the full report, the compact summary sent to the operator).

    ``context`` ends the summary's first line: in a distributed run it says the step waits for
    every rank, since rank 0 then hangs in autograd or a collective on behalf of a peer.
    """
    frames = sys._current_frames()
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    main = traceback.extract_stack(frames[main_thread_id]) if main_thread_id in frames else None
    process = psutil.Process()
    lines = [f'stall report: no training step finished for {silent_seconds:.0f}s (after step {step})']
    for ident, frame in frames.items():
        lines.append(f'--- thread {names.get(ident, ident)} ---')
        lines.append(''.join(traceback.format_stack(frame)).rstrip())
    lines += [describe_worker(index, worker) for index, worker in enumerate(workers)]
    lines.append(f'rss {process.memory_info().rss / 2**20:.0f} MiB, open files {len(process.open_files())}')
    innermost = summary_frames(main) if main else []
    first = f'hung in {_hung_in(main) if main else "?"}'
    dead = [describe_worker(index, worker) for index, worker in enumerate(workers) if not worker.alive]
    if dead:
        first += '; ' + '; '.join(dead)
    if context:
        first += f'; {context}'
        lines.insert(1, context)
    summary = {'summary': first, 'frames': innermost,
               'workers': [describe_worker(index, worker) for index, worker in enumerate(workers)],
               'silentSeconds': round(silent_seconds), 'step': step}
    return '\n'.join(lines), summary


class Watchdog:
    def __init__(self, *, before_first_seconds: float, after_seconds: float,
                 workers: Callable[[], list[WorkerState]], send: Callable[[dict[str, Any]], None],
                 output_dir: pathlib.Path, attempt: int, clock: Callable[[], float] = time.monotonic,
                 context: str = '') -> None:
        self._before_first, self._after = before_first_seconds, after_seconds
        self._workers, self._send, self._output_dir, self._attempt = workers, send, output_dir, attempt
        self._clock, self._context = clock, context
        self._main = threading.get_ident()
        self._last = clock()
        self._steps = 0
        self._reported = False
        self._stop = threading.Event()
        self.reports = 0

    def step(self) -> None:
        self._last = self._clock()
        self._steps += 1
        self._reported = False

    def start(self) -> None:
        if self._before_first > 0 or self._after > 0:
            threading.Thread(target=self._watch, name='trainguard-watchdog', daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            limit = self._after if self._steps else self._before_first
            silent = self._clock() - self._last
            if limit > 0 and silent >= limit and not self._reported:
                self._reported = True
                self.report(silent)

    def report(self, silent: float) -> None:
        try:
            text, summary = build_report(self._main, self._workers(), silent, self._steps, self._context)
            log.warning('%s', text)
            self._output_dir.mkdir(parents=True, exist_ok=True)
            (self._output_dir / REPORT_FILE).write_text(text + '\n')
            self._send({**summary, 'attempt': self._attempt})
            self.reports += 1
        except Exception as error:  # the watchdog must never be what breaks training
            log.warning('could not write the stall report: %s', error)


def loader_workers(iterator: Any) -> list[WorkerState]:
    """The worker processes of a running torch DataLoader iterator (none for num_workers=0)."""
    workers = getattr(iterator, '_workers', None)
    if not isinstance(workers, Sequence):
        return []
    return [WorkerState(worker.pid, worker.is_alive(), worker.exitcode) for worker in workers]
