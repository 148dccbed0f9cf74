"""Heartbeats in every phase with real trainers: a data preparation longer than the startup
timeout trains to Succeeded while the status shows it, and one that stops is a ProgressTimeout
that names the phase. The slow and the hung volume are the trainer's test switches, set in the
pods' environment by a pod webhook stand-in (the operator knows nothing of them).

The operator serves metrics here: the fleet view's figures are read off a scrape while the
runs go, and every metric the chart's alerts and dashboard name must be in that scrape. Where
Debian's ``prometheus`` is installed, a real Prometheus scrapes the operator as prometheus-operator
would from the chart's ServiceMonitor, with the chart's rules: the hang fires
TrainguardRunStalled naming the run's namespace, TrainguardOperatorDown stays quiet, and every
dashboard query returns data for these runs."""

from __future__ import annotations

import asyncio
import pathlib
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chart.test_chart import HELM
from tests.e2e_sandbox.test_sandbox import run, wait_for
from tests.monitoring import (
    PROMETHEUS_SERIES,
    dashboard_queries,
    exported_metric_names,
    load_dashboard,
    render_monitoring,
    selected_metrics,
)
from tests.operator.test_metrics import scrape
from trainguard_sandbox import prometheus
from trainguard_sandbox.app import Sandbox
from trainguard_sandbox.cluster import free_port

pytestmark = pytest.mark.timeout(240)
SWITCHES = {   # run name -> the trainer's environment
    'slow-data': {'TRAINGUARD_SIMULATE_SLOW_PREPARATION_SECONDS': '0.6'},
    'hung-data': {'TRAINGUARD_SIMULATE_SLOW_PREPARATION_SECONDS': '0.2',
                  'TRAINGUARD_SIMULATE_PREPARATION_HANG_AFTER_ITEMS': '10'},
}


def inject_switches(pod: dict[str, Any]) -> None:
    run_name = (pod.get('metadata') or {}).get('labels', {}).get('trainguard.io/run', '')
    for container in pod['spec']['containers']:
        container.setdefault('env', []).extend(
            {'name': name, 'value': value} for name, value in SWITCHES.get(run_name, {}).items())


@pytest.fixture()
async def sandbox(tmp_path: pathlib.Path):
    port = free_port()
    async with Sandbox(tmp_path, sweep_seconds=1, env={'TRAINGUARD_METRICS_PORT': str(port)}) as running:
        running.metrics_port = port   # type: ignore[attr-defined]
        yield running


@pytest.fixture()
def fleet_prometheus(tmp_path: pathlib.Path, sandbox: Sandbox) -> Iterator[prometheus.LocalPrometheus | None]:
    """A real Prometheus fed from the chart (None where it is not installed: the rest still runs)."""
    if prometheus.available() is not None:
        yield None
        return
    documents = prometheus.render_chart(helm=HELM)
    server = prometheus.LocalPrometheus(
        tmp_path / 'prometheus', [prometheus.scrape_config(documents, f'127.0.0.1:{sandbox.metrics_port}', 'op-0')],
        prometheus.rule_file(prometheus.one_of_kind(documents, 'PrometheusRule')))
    with server:
        yield server


def test_a_real_prometheus_is_installed_for_the_fleet_checks():
    """Says in the report when the real-Prometheus checks of the test below did not run."""
    missing = prometheus.available()
    if missing is not None:
        pytest.skip(f'the real-Prometheus checks of the phases test did not run: {missing}')


def rule_expressions() -> list[str]:
    """The expressions of the PrometheusRule the chart renders."""
    (rule,) = [doc for doc in render_monitoring(HELM) if doc['kind'] == 'PrometheusRule']
    return [item['expr'] for group in rule['spec']['groups'] for item in group['rules']]


async def test_a_long_data_preparation_trains_and_a_stopped_one_is_a_hang_naming_its_phase(sandbox, fleet_prometheus):
    assert sandbox.emulator is not None
    began = time.time()
    sandbox.emulator.pod_create_hooks.append(inject_switches)
    data = {'source': 'synthetic', 'numSamples': 40}   # 40 x 0.6 s: 24 s of preparation
    await sandbox.apply(run('slow-data', dataset=data, startupTimeoutSeconds=15, progressTimeoutSeconds=10,
                            hyperparameters={'batchSize': 8, 'numWorkers': 0, 'epochs': 1, 'resolution': 32,
                                             'cropSize': 32}))
    await sandbox.apply(run('hung-data', dataset=data, startupTimeoutSeconds=60, progressTimeoutSeconds=6))

    activities: set[str] = set()
    trainer_phases: set[str] = set()
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        slow = await sandbox.run('slow-data')
        status = slow.get('status') or {}
        activities.add((status.get('progress') or {}).get('activity') or '')
        trainer_phases |= set(re.findall(r'trainguard_running_runs\{namespace="default",trainer_phase="(\w+)"\} [1-9]',
                                         await scrape(sandbox.metrics_port)))
        if status.get('phase') in ('Succeeded', 'Failed'):
            break
        await asyncio.sleep(0.25)
    assert status.get('phase') == 'Succeeded', (status.get('reason'), status.get('message'))
    preparing = sorted(a for a in activities if re.fullmatch(r'PreparingData (\d+)/40 \(generating\)', a))
    assert any(int(a.split()[1].split('/')[0]) > 0 for a in preparing), activities
    assert {'Training'} <= activities and any(a.startswith('Starting') for a in activities), activities

    hung = await wait_for(sandbox, 'hung-data', ('Failed', 'Succeeded'), timeout=120)
    assert hung['status']['reason'] == 'ProgressTimeout', hung['status']
    assert re.search(r'no progress for \d+s \(last: hung in PreparingData \(\d+/40\), generating\)',
                     hung['status']['message']), hung['status']['message']

    # The fleet view of the same runs, scraped from the operator.
    assert {'PreparingData', 'Training'} <= trainer_phases, trainer_phases
    text = await scrape(sandbox.metrics_port)
    assert 'trainguard_stalls_total{class="NoReport",namespace="default",reason="ProgressTimeout"} 1.0' in text
    assert 'trainguard_namespace_runs{namespace="default",phase="Succeeded",reason="Succeeded"} 1.0' in text
    exported = exported_metric_names(text) | PROMETHEUS_SERIES
    expressions = rule_expressions()
    assert len(expressions) == 6, expressions
    for expr in [*expressions, *(expr for _, expr in dashboard_queries(load_dashboard()))]:
        assert selected_metrics(expr) <= exported, expr

    if fleet_prometheus is not None:
        await the_fleet_view_in_a_real_prometheus(fleet_prometheus, began)


async def the_fleet_view_in_a_real_prometheus(server: prometheus.LocalPrometheus, began: float) -> None:
    def stalled() -> list[dict[str, Any]]:
        return [alert for alert in server.alerts()
                if alert['labels']['alertname'] == 'TrainguardRunStalled' and alert['state'] == 'firing']
    (alert,) = await server.wait_for('TrainguardRunStalled firing', stalled, timeout=30)
    assert (alert['labels']['namespace'], alert['labels']['reason']) == ('default', 'ProgressTimeout'), alert
    assert alert['annotations']['summary'] == 'A training run in default hung and was stopped (ProgressTimeout)'
    assert 'TrainguardOperatorDown' not in {alert['labels']['alertname'] for alert in server.alerts()}
    loop = asyncio.get_running_loop()
    for title, expr in dashboard_queries(load_dashboard(), rate_interval='4s'):
        result = await loop.run_in_executor(None, server.query_range, expr, began, time.time(), 1.0)
        assert result, f'panel {title!r}: no data for {expr}'
        if 'namespace' in expr and 'trainguard_' in expr and 'by (pod)' not in expr:
            assert all(series['metric'].get('namespace', 'default') == 'default' and
                       'exported_namespace' not in series['metric'] for series in result), (title, result)
