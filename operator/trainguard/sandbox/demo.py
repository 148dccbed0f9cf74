"""``make demo``: two sample runs on the sandbox, shown as a live ``kubectl get tr`` table.

1. ``manifests/samples/cpu-run.yaml`` — written with batch 32 / 2 workers / 256px, rewritten
   to CPU-safe values, trains to Succeeded;
2. ``manifests/samples/hang-demo-run.yaml`` — its trainer hangs after 3 steps; the operator
   sees the silent heartbeat, kills the pod (and the process with it) and fails the run
   with ProgressTimeout.

Exits 0 only when both outcomes happened.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from trainguard.domain.heartbeat import parse_time
from trainguard.sandbox.app import Sandbox, load_manifest

SAMPLES = pathlib.Path(__file__).resolve().parents[3] / 'manifests' / 'samples'
COLUMNS = ('NAME', 'PHASE', 'DEVICE', 'EPOCH', 'PROGRESS', 'LOSS', 'REASON', 'AGE')


def _age(created: str | None, now: datetime.datetime) -> str:
    moment = parse_time(created)
    if moment is None:
        return '<unknown>'
    seconds = max(0, int((now - moment).total_seconds()))
    return f'{seconds}s' if seconds < 120 else f'{seconds // 60}m'


def table_rows(runs: Sequence[Mapping[str, Any]], now: datetime.datetime) -> list[tuple[str, ...]]:
    """The printer columns of the CRD, as kubectl shows them."""
    rows = []
    for run in sorted(runs, key=lambda r: r['metadata']['name']):
        status = run.get('status') or {}
        progress = status.get('progress') or {}
        loss = progress.get('loss')
        rows.append((
            run['metadata']['name'], status.get('phase', ''), status.get('device', ''), status.get('epoch', ''),
            f"{progress['percent']}%" if 'percent' in progress else '',
            f'{loss:.4f}' if isinstance(loss, int | float) else '', status.get('reason', ''),
            _age(run['metadata'].get('creationTimestamp'), now),
        ))
    return rows


def render_table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    return ['   '.join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in [COLUMNS, *rows]]


class LiveTable:
    """Redraws in place on a terminal; elsewhere (CI logs) prints only when the table changes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._drawn = 0
        self._last: list[str] = []

    def show(self, lines: list[str]) -> None:
        if self._tty:
            if self._drawn:
                self._stream.write(f'\x1b[{self._drawn}F\x1b[J')
            self._stream.write('\n'.join(lines) + '\n')
            self._drawn = len(lines)
        elif [line.rsplit('   ', 1)[0] for line in lines] != [line.rsplit('   ', 1)[0] for line in self._last]:
            self._stream.write('\n'.join(lines) + '\n\n')
        self._last = lines
        self._stream.flush()

    def note(self, text: str) -> None:
        """A line above the table, which the next redraw does not erase."""
        if self._tty and self._drawn:
            self._stream.write(f'\x1b[{self._drawn}F\x1b[J')
            self._drawn = 0
        self._stream.write(text + '\n')
        if self._tty and self._last:
            self.show(self._last)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def run_demo(workdir: pathlib.Path, *, timeout: float = 150.0, stream: TextIO = sys.stdout) -> int:
    cpu, hang = load_manifest(SAMPLES / 'cpu-run.yaml'), load_manifest(SAMPLES / 'hang-demo-run.yaml')
    table = LiveTable(stream)
    started = time.monotonic()
    async with Sandbox(workdir) as sandbox:
        table.note(f'sandbox API at {sandbox.api_url} (kubeconfig: {sandbox.kubeconfig}); '
                   f'trainer output in {workdir / "pods"}')
        for run in (cpu, hang):
            await sandbox.apply(run)
            table.note(f'trainingrun.trainguard.io/{run["metadata"]["name"]} created')
        shown_optimizations = False
        while time.monotonic() - started < timeout:
            runs = await sandbox.runs()
            if not shown_optimizations:
                for event in await sandbox.events(cpu['metadata']['name']):
                    if event['reason'] == 'CPUOptimized':
                        for line in event['message'].split('; '):
                            table.note(line)
                        shown_optimizations = True
            table.show(render_table(table_rows(runs, datetime.datetime.now(datetime.UTC))))
            phases = {run['metadata']['name']: (run.get('status') or {}).get('phase') for run in runs}
            if all(phase in ('Succeeded', 'Failed') for phase in phases.values()) and len(phases) == 2:
                break
            await asyncio.sleep(1.0)
        final = {run['metadata']['name']: run for run in await sandbox.runs()}
        assert sandbox.runner is not None
        hang_pods = {key: pid for key, pid in sandbox.runner.started.items()
                     if key[1].startswith(hang['metadata']['name'])}
        return _summary(final, cpu['metadata']['name'], hang['metadata']['name'], hang_pods,
                        time.monotonic() - started, table)


def _summary(final: Mapping[str, Mapping[str, Any]], cpu_name: str, hang_name: str,
             hang_pods: Mapping[tuple[str, str], int], seconds: float, table: LiveTable) -> int:
    cpu_status = (final.get(cpu_name) or {}).get('status') or {}
    hang_status = (final.get(hang_name) or {}).get('status') or {}
    processes_gone = bool(hang_pods) and not any(_pid_alive(pid) for pid in hang_pods.values())
    checks = [
        (cpu_status.get('phase') == 'Succeeded',
         f'{cpu_name}: rewritten to CPU-safe settings ({len(cpu_status.get("adjustments") or [])} adjustments) '
         f'and {cpu_status.get("phase", "not finished")}'),
        (hang_status.get('phase') == 'Failed' and hang_status.get('reason') == 'ProgressTimeout',
         f'{hang_name}: {hang_status.get("phase", "not finished")}/{hang_status.get("reason", "")}: '
         f'{hang_status.get("message", "")}'),
        (processes_gone, f'{hang_name}: trainer process {", ".join(map(str, hang_pods.values())) or "?"} '
                         f'{"is gone" if processes_gone else "is still running"}'),
    ]
    table.note('')
    for ok, text in checks:
        table.note(f'{"PASS" if ok else "FAIL"}  {text}')
    ok = all(ok for ok, _ in checks)
    table.note(f'demo {"succeeded" if ok else "failed"} in {seconds:.0f}s')
    return 0 if ok else 1
