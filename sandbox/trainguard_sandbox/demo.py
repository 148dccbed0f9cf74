"""``make demo``: four sample runs on the sandbox, shown as a live ``kubectl get tr`` table.

1. ``manifests/samples/cpu-run.yaml`` — written with batch 32 / 2 workers / 256px, rewritten
   to CPU-safe values, trains to Succeeded;
2. ``manifests/samples/multinode-run.yaml`` — two pods, one torchrun "node" each (two local
   processes here, gloo between them), trains as one DistributedDataParallel job to Succeeded;
3. ``manifests/samples/multinode-hang-demo-run.yaml`` — two pods whose last rank freezes after
   3 steps; rank 0 then blocks in the gradient all-reduce and the gang's heartbeat stops; the
   operator deletes both pods (their processes die with them) and fails the run with
   ProgressTimeout;
4. ``manifests/samples/drain-resilient-run.yaml`` — evicted mid-epoch (the Eviction API, as
   ``kubectl drain`` calls it) with backoffLimit 0: the trainer saves its step on SIGTERM, the
   operator records a disruption, and attempt 2 resumes at that step to Succeeded.

While they run, a real Prometheus (where ``prometheus`` and ``helm`` are installed) scrapes the
operator as prometheus-operator would from the chart's ServiceMonitor and evaluates the chart's
alerts: the hang must fire ``TrainguardRunStalled`` for the run's namespace, and ``fleet.png``
in the workdir is drawn from the dashboard's own queries answered by it. Elsewhere the demo
scrapes /metrics each second itself and says so (trainguard_sandbox.fleetpicture).

Exits 0 only when all four outcomes happened. Every check waits, with a deadline, for the state
it verifies and says what it waited for; none samples once after a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from trainguard.domain.heartbeat import parse_time
from trainguard_sandbox import prometheus
from trainguard_sandbox.app import Sandbox, load_manifest
from trainguard_sandbox.cluster import free_port
from trainguard_sandbox.fleetpicture import FleetRecorder, Panel, draw, prometheus_panels
from trainguard_sandbox.pods import PodInstance

# Written into a workdir the demo owns, so a later demo may clear it and nothing else.
MARKER = '.trainguard-demo'
# What a sandbox writes into its workdir (demos from before MARKER existed left only these).
SANDBOX_ENTRIES = frozenset({MARKER, 'kubeconfig', 'pods', 'volumes', 'tmp'})
# How long the hung run's trainer may outlive the run's Failed status: the pod runner notices
# the pod's deletion at its next poll (0.25 s) and kills the process group.
PROCESS_GONE_SECONDS = 30.0

SAMPLES = pathlib.Path(__file__).parent / 'manifests' / 'samples'
COLUMNS = ('NAME', 'PHASE', 'DEVICE', 'NODES', 'EPOCH', 'ACTIVITY', 'PROGRESS', 'LOSS', 'DICE', 'REASON', 'AGE')


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
        loss, dice = progress.get('loss'), progress.get('dice')
        rows.append((
            run['metadata']['name'], status.get('phase', ''), status.get('device', ''), status.get('nodes', ''),
            status.get('epoch', ''), progress.get('activity', ''),
            f"{progress['percent']}%" if 'percent' in progress else '',
            f'{loss:.4f}' if isinstance(loss, int | float) else '',
            f'{dice:.4f}' if isinstance(dice, int | float) else '', status.get('reason', ''),
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


class WorkdirError(Exception):
    """The demo's folder holds something the demo did not write; it is left alone."""


def prepare_workdir(workdir: pathlib.Path) -> str:
    """Every demo starts from a clean folder: a previous demo's checkpoints would be resumed.

    Only a folder that a demo created (it holds MARKER) is cleared; any other non-empty
    folder is refused rather than deleted. Returns what was done, for the demo's first line.
    """
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists() and not {entry.name for entry in workdir.iterdir()} <= SANDBOX_ENTRIES:
            raise WorkdirError(f'{workdir} is not empty and was not made by a demo; choose another --workdir')
        shutil.rmtree(workdir)
        action = f'cleared {workdir} (left by the previous demo)'
    else:
        action = f'created {workdir}'
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text('made by trainguard-operator sandbox --demo; cleared by the next demo\n')
    return action


async def run_demo(workdir: pathlib.Path, *, timeout: float = 300.0, stream: TextIO = sys.stdout) -> int:
    cpu, multinode, hang, drained = (load_manifest(SAMPLES / name) for name in (
        'cpu-run.yaml', 'multinode-run.yaml', 'multinode-hang-demo-run.yaml', 'drain-resilient-run.yaml'))
    table = LiveTable(stream)
    try:
        table.note(prepare_workdir(workdir))
    except WorkdirError as error:
        table.note(f'demo not started: {error}')
        return 2
    started = time.monotonic()
    port = free_port()
    recorder = FleetRecorder(f'http://127.0.0.1:{port}/metrics')
    fleet = _start_prometheus(workdir / 'prometheus', port, table)
    try:
        return await _run(workdir, timeout, table, started, recorder, fleet, port,
                          cpu, multinode, hang, drained)
    finally:
        if fleet is not None:
            fleet.stop()


def _start_prometheus(workdir: pathlib.Path, port: int, table: LiveTable) -> prometheus.LocalPrometheus | None:
    """A real Prometheus fed from the chart, or None (and one line saying why)."""
    missing = prometheus.available()
    if missing is None:
        try:
            documents = prometheus.render_chart()
            server = prometheus.LocalPrometheus(
                workdir, [prometheus.scrape_config(documents, f'127.0.0.1:{port}', 'trainguard-sandbox')],
                prometheus.rule_file(prometheus.one_of_kind(documents, 'PrometheusRule')))
            server.start()
        except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as error:
            missing = f'prometheus did not start ({error})'
        else:
            table.note(f'fleet view: a real Prometheus at {server.url} scrapes the operator as the chart\'s '
                       'ServiceMonitor says and evaluates the chart\'s alerts')
            return server
    table.note(f'fleet view: {missing}; the demo scrapes the operator itself and draws from that')
    return None


async def _run(workdir: pathlib.Path, timeout: float, table: LiveTable, started: float, recorder: FleetRecorder,
               fleet: prometheus.LocalPrometheus | None, port: int, cpu: dict[str, Any], multinode: dict[str, Any],
               hang: dict[str, Any], drained: dict[str, Any]) -> int:
    loop = asyncio.get_running_loop()
    drained_name = drained['metadata']['name']
    wall_start = time.time()
    async with Sandbox(workdir, env={'TRAINGUARD_METRICS_PORT': str(port)}) as sandbox:
        table.note(f'sandbox API at {sandbox.api_url} (kubeconfig: {sandbox.kubeconfig}); '
                   f'trainer output in {workdir / "pods"}')
        for run in (cpu, multinode, hang, drained):
            await sandbox.apply(run)
            table.note(f'trainingrun.trainguard.io/{run["metadata"]["name"]} created')
        shown_optimizations, evicted = False, False
        while time.monotonic() - started < timeout:
            runs = await sandbox.runs()
            if not shown_optimizations:
                for event in await sandbox.events(cpu['metadata']['name']):
                    if event['reason'] == 'CPUOptimized':
                        for line in event['message'].split('; '):
                            table.note(line)
                        shown_optimizations = True
            table.show(render_table(table_rows(runs, datetime.datetime.now(datetime.UTC))))
            if fleet is None:
                await _scrape(loop, recorder, time.monotonic() - started)
            evicted = evicted or await _drain_when_training(sandbox, runs, drained_name, table)
            phases = {run['metadata']['name']: (run.get('status') or {}).get('phase') for run in runs}
            if all(phase in ('Succeeded', 'Failed') for phase in phases.values()) and len(phases) == 4:
                break
            await asyncio.sleep(1.0)
        final = {run['metadata']['name']: run for run in await sandbox.runs()}
        if fleet is None:
            await _scrape(loop, recorder, time.monotonic() - started)
            picture = _picture(recorder.panels(), workdir / 'fleet.png', f'{recorder.scrapes} scrapes of the '
                               'operator\'s /metrics by the demo')
            alerts = None
        else:
            alerts = await _alerts(fleet, hang['metadata'].get('namespace') or 'default')
            panels = await loop.run_in_executor(None, lambda: prometheus_panels(
                fleet.query_range, wall_start, time.time(), 1.0, '4s'))
            picture = _picture(panels, workdir / 'fleet.png', 'the dashboard\'s queries answered by a real '
                               'Prometheus')
        assert sandbox.runner is not None
        hang_pods = [instance for instance in sandbox.runner.instances
                     if instance.name.startswith(hang['metadata']['name'])]
        processes = await _processes_stopped(sandbox, hang_pods)
        assert sandbox.emulator is not None
        refused = [message for _, _, message in sandbox.emulator.refusals]
        drain_check = _drain_survived(final.get(drained_name) or {}, workdir / 'pods' / 'default', evicted)
        return _summary(final, cpu['metadata']['name'], multinode['metadata']['name'], hang['metadata']['name'],
                        processes, refused, drain_check, picture, alerts, time.monotonic() - started, table)


async def _scrape(loop: asyncio.AbstractEventLoop, recorder: FleetRecorder, seconds: float) -> None:
    """One scrape of the operator's metrics; a failed one is a gap in the picture, not an error."""
    with contextlib.suppress(OSError):
        await loop.run_in_executor(None, recorder.scrape, seconds)


def _picture(panels: list[Panel], path: pathlib.Path, source: str) -> tuple[bool, str]:
    """Draw the fleet panels; they must show what the other checks prove happened."""
    titles = draw(panels, path, source)
    events = panels[3].lines
    stalls = max((value for line, points in events.items() if line.startswith('stalls') for _, value in points),
                 default=0)
    disruptions = max((value for line, points in events.items() if line.startswith('disruptions')
                       for _, value in points), default=0)
    trainer_phases = sorted(line for line, points in panels[1].lines.items() if any(value for _, value in points))
    ok = path.exists() and 'Training' in trainer_phases and stalls > 0 and disruptions > 0
    return ok, (f'fleet view: {len(titles)} dashboard panels from {source} drawn into {path} '
                f'(trainers seen {", ".join(trainer_phases) or "none"}; stalls seen: {stalls > 0}, '
                f'disruptions seen: {disruptions > 0})')


async def _alerts(fleet: prometheus.LocalPrometheus, namespace: str) -> tuple[bool, str]:
    """The chart's alerts as the real Prometheus evaluated them: the hang fired TrainguardRunStalled
    for the run's namespace (not the operator's), and TrainguardOperatorDown is quiet."""
    def stalled() -> list[dict[str, Any]]:
        return [alert for alert in fleet.alerts() if alert['labels']['alertname'] == 'TrainguardRunStalled'
                and alert['state'] == 'firing']
    try:
        firing = await fleet.wait_for('TrainguardRunStalled firing', stalled, timeout=30)
    except TimeoutError as error:
        return False, f'alerts: {error}'
    names = sorted({alert['labels']['alertname'] for alert in fleet.alerts()})
    labels = firing[0]['labels']
    ok = [alert['labels'].get('namespace') for alert in firing] == [namespace] and 'TrainguardOperatorDown' not in names
    return ok, (f'alerts: TrainguardRunStalled fired in a real Prometheus for namespace {labels.get("namespace")} '
                f'({labels.get("reason")}, class {labels.get("class")}): "{firing[0]["annotations"]["summary"]}"; '
                f'alerts pending or firing: {", ".join(names)}')


async def _drain_when_training(sandbox: Sandbox, runs: Sequence[Mapping[str, Any]], name: str,
                               table: LiveTable) -> bool:
    """Evict the run's pod once it is a few steps into training, as `kubectl drain` would."""
    run = next((run for run in runs if run['metadata']['name'] == name), {})
    status = run.get('status') or {}
    if status.get('phase') != 'Running' or int((status.get('progress') or {}).get('step') or 0) < 2:
        return False
    pod = status.get('podName') or f'{name}-1'
    await sandbox.evict(pod)
    table.note(f'evicted {pod} mid-epoch (the Eviction API, as `kubectl drain` does)')
    return True


def _drain_survived(run: Mapping[str, Any], logs: pathlib.Path, evicted: bool) -> tuple[bool, str]:
    status = run.get('status') or {}
    second = logs / f'{run.get("metadata", {}).get("name", "")}-2.log'
    resumed = next((line.split('resuming from ', 1)[1].split(': ', 1)[1] for line in
                    (second.read_text(errors='replace').splitlines() if second.exists() else [])
                    if 'resuming from ' in line), '')
    ok = (evicted and status.get('phase') == 'Succeeded' and status.get('disruptions') == 1
          and not status.get('failedAttempts') and bool(resumed))
    history = status.get('disruptionHistory') or [{}]
    return ok, (f'{run.get("metadata", {}).get("name")}: {status.get("phase", "not finished")} after '
                f'{status.get("disruptions", 0)} disruption ({history[-1].get("reason", "none")}) with '
                f'backoffLimit 0; attempt 2 resumed at {resumed or "?"}')


async def _processes_stopped(sandbox: Sandbox, pods: list[PodInstance]) -> tuple[bool, str]:
    """Wait for the hung gang to be gone: every pod deleted, every pod's processes killed and exited."""
    pids = ', '.join(f'{pod.name} pid {pod.pid}' for pod in pods) or '?'
    if not pods:
        return False, 'no trainer process was ever started'
    assert sandbox.runner is not None
    try:
        waited = await sandbox.runner.wait_stopped(pods, timeout=PROCESS_GONE_SECONDS)
    except TimeoutError as error:
        return False, (f'trainer processes ({pids}) still running {PROCESS_GONE_SECONDS:.0f}s after the run failed: '
                       f'{error}')
    return True, (f'every pod of the gang and its processes are gone ({pids}; waited {waited:.1f}s for the pod '
                  'deletions to kill them)')


def _summary(final: Mapping[str, Mapping[str, Any]], cpu_name: str, multinode_name: str, hang_name: str,
             processes: tuple[bool, str], refused: list[str], drain: tuple[bool, str],
             picture: tuple[bool, str], alerts: tuple[bool, str] | None, seconds: float, table: LiveTable) -> int:
    cpu_status = (final.get(cpu_name) or {}).get('status') or {}
    gang_status = (final.get(multinode_name) or {}).get('status') or {}
    gang_progress = gang_status.get('progress') or {}
    hang_status = (final.get(hang_name) or {}).get('status') or {}
    processes_gone, process_text = processes
    progress = cpu_status.get('progress') or {}
    # Succeeded alone could be a trainer that resumed a finished checkpoint and trained nothing:
    # the run must also have mirrored its heartbeats up to the last epoch.
    trained = progress.get('percent') == 100 and progress.get('epoch') == progress.get('epochs') \
        and isinstance(progress.get('bestDice'), int | float)
    checks = [
        (cpu_status.get('phase') == 'Succeeded' and bool(cpu_status.get('adjustments')),
         f'{cpu_name}: rewritten to CPU-safe settings ({len(cpu_status.get("adjustments") or [])} adjustments) '
         f'and {cpu_status.get("phase", "not finished")}'),
        (trained, f'{cpu_name}: trained here, heartbeats mirrored to {progress.get("percent", 0)}% '
                  f'(epoch {progress.get("epoch", "-")}/{progress.get("epochs", "-")}, '
                  f'loss {progress.get("loss", "-")}, validation Dice {progress.get("dice", "-")}, best '
                  f'{progress.get("bestDice", "-")} at epoch {progress.get("bestEpoch", "-")})'),
        (gang_status.get('phase') == 'Succeeded' and gang_progress.get('worldSize') == 2
         and gang_progress.get('percent') == 100,
         f'{multinode_name}: {gang_status.get("phase", "not finished")} as one job of '
         f'{gang_progress.get("worldSize", "?")} ranks on 2 pods, heartbeats mirrored to '
         f'{gang_progress.get("percent", 0)}% (loss {gang_progress.get("loss", "-")})'),
        (hang_status.get('phase') == 'Failed' and hang_status.get('reason') == 'ProgressTimeout',
         f'{hang_name}: {hang_status.get("phase", "not finished")}/{hang_status.get("reason", "")}: '
         f'{hang_status.get("message", "")}'),
        (processes_gone, f'{hang_name}: {process_text}'),
        drain,
        picture,
        *([alerts] if alerts is not None else []),
        (not refused, 'RBAC: the operator (manifests/rbac) and every trainer (the namespace\'s trainer identity, '
                      'limited to its own run by the trainer policy) did all this with no request refused'
         if not refused else f'RBAC refused: {"; ".join(refused[:3])}'),
    ]
    table.note('')
    for ok, text in checks:
        table.note(f'{"PASS" if ok else "FAIL"}  {text}')
    ok = all(ok for ok, _ in checks)
    table.note(f'demo {"succeeded" if ok else "failed"} in {seconds:.0f}s')
    return 0 if ok else 1
