"""The chart's alerts in a real Prometheus: ``promtool check rules`` and ``promtool test rules``
on the rendered PrometheusRule, and a real ``prometheus`` scraping the operator's registry the
way prometheus-operator derives the job from the chart's ServiceMonitor.

Every promtool case builds its input series from the operator's own registry
(trainguard.metrics.Metrics) minute by minute, labelled as Prometheus stores them under the
chart's ServiceMonitor (tests.monitoring.scraped_labels, itself checked against a real
Prometheus below). So each alert case fails if the run's namespace is lost to the target's
(honorLabels) or if a counter is born at its first increment (no 0 before it, no increase()).

Debian's ``prometheus`` package brings both binaries; without them these tests skip, saying so.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import prometheus_client
import pytest
import yaml
from prometheus_client import generate_latest

from tests.chart.test_chart import HELM
from tests.monitoring import exposition_samples, promql_series, scraped_labels
from trainguard.domain.reconcile import Plan
from trainguard.metrics import Metrics
from trainguard_sandbox import prometheus
from trainguard_sandbox.cluster import free_port

PROMTOOL = shutil.which('promtool')
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason='no promtool (apt-get install prometheus)')
needs_prometheus = pytest.mark.skipif(shutil.which('prometheus') is None,
                                      reason='no prometheus (apt-get install prometheus)')
POD = 'trainguard-7d9c-x2'
ADDRESS = '10.0.0.7:9090'      # only a label here: promtool scrapes nothing
START = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.UTC)
RUNBOOK = 'https://github.com/trainguard/trainguard/blob/main/README.md#runbook-'


def chart(*values: str) -> list[dict[str, Any]]:
    return prometheus.render_chart(*values, helm=HELM)


def rule_file(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return prometheus.rule_file(prometheus.one_of_kind(documents, 'PrometheusRule'))


@needs_promtool
def test_promtool_checks_the_rendered_rules(tmp_path: pathlib.Path):
    path = tmp_path / 'rules.yaml'
    path.write_text(yaml.safe_dump(rule_file(chart())))
    result = subprocess.run([PROMTOOL, 'check', 'rules', str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'SUCCESS: 6 rules found' in result.stdout


# -- promtool test rules ----------------------------------------------------------------------


@dataclasses.dataclass
class Timeline:
    """The operator's registry scraped once a minute while a story happens to it."""
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    now: datetime.datetime = START
    up: float = 1.0

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.runs, lambda: self.now)
        self.scrapes: list[tuple[dict[tuple[tuple[str, str], ...], float], float]] = []

    def play(self, minutes: int, each_minute: Callable[[int, Timeline], None]) -> Timeline:
        for minute in range(minutes):
            self.now = START + datetime.timedelta(minutes=minute)
            each_minute(minute, self)
            self.scrapes.append((exposition_samples(generate_latest(self.metrics.registry).decode()), self.up))
        return self

    def input_series(self, scrape: dict[str, Any]) -> list[dict[str, str]]:
        """promtool's input: one series per label set Prometheus would store, '_' where absent."""
        keys = sorted({key for samples, _ in self.scrapes for key in samples})
        series = [{'series': promql_series(scraped_labels(dict(key), scrape)),
                   'values': ' '.join(_value(samples.get(key)) for samples, _ in self.scrapes)} for key in keys]
        up = scraped_labels({'__name__': 'up'}, {**scrape, 'honor_labels': False})
        series.append({'series': promql_series(up), 'values': ' '.join(_value(up) for _, up in self.scrapes)})
        return series


def _value(value: float | None) -> str:
    return '_' if value is None else repr(float(value))


def stall_in(namespace: str) -> Plan:
    return Plan(status_patch={'phase': 'Failed', 'reason': 'ProgressTimeout'}, stalled='ProgressTimeout')


def seen(namespace: str) -> Callable[[int, Timeline], None]:
    return lambda minute, timeline: timeline.metrics.namespace_seen(namespace)


def first_stall(at: int | None) -> Callable[[int, Timeline], None]:
    def story(minute: int, timeline: Timeline) -> None:
        timeline.metrics.namespace_seen('ml')   # the run is seen when it is created
        if minute == at:
            timeline.metrics.count('ml', stall_in('ml'))
    return story


def running_since(started: datetime.datetime, beats: bool) -> Callable[[int, Timeline], None]:
    def story(minute: int, timeline: Timeline) -> None:
        progress = {'lastProgressTime': timeline.now.strftime('%Y-%m-%dT%H:%M:%SZ')} if beats else {}
        timeline.runs = [{'metadata': {'name': 'r', 'namespace': 'ml'},
                          'status': {'phase': 'Running', 'attempts': 1, 'progress': progress,
                                     'attemptStartTime': started.strftime('%Y-%m-%dT%H:%M:%SZ')}}]
    return story


def failed_runs(count: int) -> Callable[[int, Timeline], None]:
    def story(minute: int, timeline: Timeline) -> None:
        timeline.runs = [{'metadata': {'name': f'r{index}', 'namespace': 'ml'},
                          'status': {'phase': 'Failed', 'reason': 'PodFailed',
                                     'completionTime': f'2026-12-06T11:0{index}:00Z'}} for index in range(count)]
    return story


def reconcile_errors(from_minute: int | None) -> Callable[[int, Timeline], None]:
    def story(minute: int, timeline: Timeline) -> None:
        if from_minute is not None and minute >= from_minute:
            timeline.metrics.reconcile_errors.inc()
    return story


def webhook_registration_failure(at: int | None) -> Callable[[int, Timeline], None]:
    def story(minute: int, timeline: Timeline) -> None:
        if minute == at:
            timeline.metrics.webhook_registration_failures.inc()
    return story


def operator_up(up: bool) -> Callable[[int, Timeline], None]:
    def story(minute: int, timeline: Timeline) -> None:
        timeline.up = 1.0 if up else 0.0
    return story


# The job prometheus-operator names after the metrics Service; the rules' default must match it
# (the quiet OperatorDown case fails otherwise: absent() of a job nobody scrapes always fires).
JOB = 'trainguard-metrics'
STALLED = {'alertname': 'TrainguardRunStalled', 'namespace': 'ml', 'reason': 'ProgressTimeout',
           'class': 'NoReport', 'severity': 'warning'}
STALLED_TEXT = {
    'summary': 'A training run in ml hung and was stopped (ProgressTimeout)',
    'description': '1 attempt(s) in namespace ml stopped in the last 15 minutes as ProgressTimeout, stall class '
                   "NoReport. The run's status.message and status.stallReport say where it hung.",
    'runbook_url': f'{RUNBOOK}trainguardrunstalled'}
SILENT = {'alertname': 'TrainguardHeartbeatSilent', 'namespace': 'ml', 'severity': 'warning'}
SILENT_TEXT = {
    'summary': 'A running run in ml has sent no heartbeat for 1h 0m 0s',
    'description': 'The oldest heartbeat among Running TrainingRuns in ml is 1h 0m 0s old (threshold 1800s).',
    'runbook_url': f'{RUNBOOK}trainguardheartbeatsilent'}
IN_A_ROW = {'alertname': 'TrainguardRunsFailingInARow', 'namespace': 'ml', 'severity': 'warning'}
IN_A_ROW_TEXT = {
    'summary': '3 training runs in a row failed in ml',
    'description': 'The last 3 TrainingRuns to finish in ml all failed: something shared (image, data volume, '
                   'nodes, quota) is more likely than the runs.',
    'runbook_url': f'{RUNBOOK}trainguardrunsfailinginarow'}
DOWN = {'alertname': 'TrainguardOperatorDown', 'namespace': prometheus.RELEASE_NAMESPACE,
        'severity': 'critical'}
DOWN_TEXT = {
    'summary': 'The trainguard operator is down or not scraped',
    'description': f'No instance of job {JOB} has been up for 5 minutes: no run is started, mirrored or stopped '
                   'when hung until it is back.',
    'runbook_url': f'{RUNBOOK}trainguardoperatordown'}
ERRORS = {'alertname': 'TrainguardReconcileErrors', 'namespace': prometheus.RELEASE_NAMESPACE, 'pod': POD,
          'severity': 'warning'}
ERRORS_TEXT = {
    'summary': 'The trainguard operator keeps failing to reconcile runs',
    'description': f'{POD} has raised in reconciles for 15 minutes (16.67m/s); each is retried, but some runs '
                   'are not being handled.',
    'runbook_url': f'{RUNBOOK}trainguardreconcileerrors'}
WEBHOOK = {'alertname': 'TrainguardWebhookFailing', 'namespace': prometheus.RELEASE_NAMESPACE, 'pod': POD,
           'severity': 'warning'}
WEBHOOK_TEXT = {
    'summary': 'The trainguard admission webhook is not serving or not registered',
    'description': f'{POD} could not start or register its admission webhook in the last 15 minutes. Runs are '
                   'still rewritten by the operator itself, one write later.',
    'runbook_url': f'{RUNBOOK}trainguardwebhookfailing'}

# (alert, the story, minutes played, evaluated at minute, the alert expected or None for quiet)
CASES = [
    pytest.param('TrainguardRunStalled', first_stall(20), 30, 25, (STALLED, STALLED_TEXT), id='stalled-first-stall'),
    pytest.param('TrainguardRunStalled', first_stall(None), 30, 25, None, id='stalled-quiet'),
    pytest.param('TrainguardHeartbeatSilent', running_since(START, beats=False), 61, 60, (SILENT, SILENT_TEXT),
                 id='silent-an-hour'),
    pytest.param('TrainguardHeartbeatSilent', running_since(START, beats=True), 61, 60, None, id='silent-quiet'),
    pytest.param('TrainguardRunsFailingInARow', failed_runs(3), 10, 5, (IN_A_ROW, IN_A_ROW_TEXT), id='in-a-row-3'),
    pytest.param('TrainguardRunsFailingInARow', failed_runs(2), 10, 5, None, id='in-a-row-quiet'),
    pytest.param('TrainguardOperatorDown', operator_up(False), 15, 10, (DOWN, DOWN_TEXT), id='down'),
    pytest.param('TrainguardOperatorDown', operator_up(True), 15, 10, None, id='down-quiet'),
    pytest.param('TrainguardReconcileErrors', reconcile_errors(1), 30, 25, (ERRORS, ERRORS_TEXT), id='errors'),
    pytest.param('TrainguardReconcileErrors', reconcile_errors(None), 30, 25, None, id='errors-quiet'),
    pytest.param('TrainguardWebhookFailing', webhook_registration_failure(20), 30, 25, (WEBHOOK, WEBHOOK_TEXT),
                 id='webhook-first-failure'),
    pytest.param('TrainguardWebhookFailing', webhook_registration_failure(None), 30, 25, None, id='webhook-quiet'),
]


def promtool_test(tmp_path: pathlib.Path, documents: list[dict[str, Any]], alert: str,
                  story: Callable[[int, Timeline], None], minutes: int, at: int,
                  expected: tuple[dict[str, str], dict[str, str]] | None) -> subprocess.CompletedProcess[str]:
    scrape = prometheus.scrape_config(documents, ADDRESS, POD, interval='1m')
    series = Timeline().play(minutes, story).input_series(scrape)
    alerts = [] if expected is None else [{
        'exp_labels': {name: value for name, value in expected[0].items() if name != 'alertname'},
        'exp_annotations': expected[1]}]
    (tmp_path / 'rules.yaml').write_text(yaml.safe_dump(rule_file(documents)))
    (tmp_path / 'test.yaml').write_text(yaml.safe_dump({
        'rule_files': ['rules.yaml'], 'evaluation_interval': '1m',
        'tests': [{'interval': '1m', 'input_series': series,
                   'alert_rule_test': [{'eval_time': f'{at}m', 'alertname': alert, 'exp_alerts': alerts}]}]}))
    return subprocess.run([PROMTOOL, 'test', 'rules', 'test.yaml'], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)


@needs_promtool
@pytest.mark.parametrize(('alert', 'story', 'minutes', 'at', 'expected'), CASES)
def test_every_alert_fires_on_its_first_event_naming_the_runs_namespace_and_is_quiet_otherwise(
        tmp_path, alert, story, minutes, at, expected):
    documents = chart()
    result = promtool_test(tmp_path, documents, alert, story, minutes, at, expected)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize('honor_labels', ['true', 'false'])
def test_the_first_stall_fires_naming_the_runs_namespace_whether_or_not_labels_are_honoured(tmp_path, honor_labels):
    documents = chart('--set', f'metrics.serviceMonitor.honorLabels={honor_labels}')
    result = promtool_test(tmp_path, documents, 'TrainguardRunStalled', first_stall(20), 30, 25,
                           (STALLED, STALLED_TEXT))
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real Prometheus scraping the operator's registry --------------------------------------


@needs_prometheus
@pytest.mark.parametrize('honor_labels', ['true', 'false'])
def test_a_real_prometheus_stores_the_runs_namespace_as_the_model_says(tmp_path, honor_labels):
    """The chart's ServiceMonitor, as prometheus-operator feeds Prometheus, keeps each series'
    run namespace in ``namespace`` (honorLabels on, or off and relabelled back), and Prometheus
    stores exactly the label sets tests.monitoring.scraped_labels predicts."""
    runs = [{'metadata': {'name': 'r', 'namespace': 'ml'},
             'status': {'phase': 'Running', 'attempts': 1, 'attemptStartTime': '2026-12-06T11:59:00Z'}}]
    metrics = Metrics(lambda: runs, lambda: START)
    metrics.count('ml', stall_in('ml'))
    port = free_port()
    server, _ = prometheus_client.start_http_server(port, addr='127.0.0.1', registry=metrics.registry)
    try:
        documents = chart('--set', f'metrics.serviceMonitor.honorLabels={honor_labels}')
        scrape = prometheus.scrape_config(documents, f'127.0.0.1:{port}', POD)
        with prometheus.LocalPrometheus(tmp_path / 'prometheus', [scrape]) as server_under_test:
            deadline = time.monotonic() + 60
            while not (stored := server_under_test.series('{__name__=~"trainguard_.*"}')):
                assert time.monotonic() < deadline, server_under_test.log_tail()
                time.sleep(0.5)
            exposed = exposition_samples(generate_latest(metrics.registry).decode())
            predicted = sorted(sorted(scraped_labels(dict(key), scrape).items()) for key in exposed)
            assert sorted(sorted(series.items()) for series in stored) == predicted
            running = server_under_test.query('trainguard_running_runs')
            assert [(sample['metric']['namespace'], sample['metric'].get('exported_namespace'))
                    for sample in running] == [('ml', None)]
            (up,) = server_under_test.query('up')
            assert up['metric']['namespace'] == prometheus.RELEASE_NAMESPACE and up['value'][1] == '1'
    finally:
        server.shutdown()
