"""The fleet view the chart ships: a PrometheusRule and a Grafana dashboard, both off by default.

What ``promtool check rules`` checks, with the Prometheus parser's Rust port (promql-parser):
every expression parses, durations are Prometheus durations, alerts have a severity, a summary
and a runbook. Beyond it: every metric a rule or a panel selects is one the operator exports
(this module asks the operator's own registry; tests/e2e_sandbox/test_phases.py scrapes a
running operator), every runbook link points at a README section that exists, and every
``$labels.x`` an annotation uses survives the expression's aggregation.
"""

from __future__ import annotations

import json
import re

import kubernetes_validate
import pytest
from prometheus_client import generate_latest

from tests.chart.test_chart import HELM, KUBERNETES_VERSION, by_kind, render
from tests.crd_schema import ROOT
from tests.monitoring import (
    PROMETHEUS_SERIES,
    dashboard_queries,
    exported_metric_names,
    load_dashboard,
    render_monitoring,
    selected_metrics,
)
from trainguard.metrics import Metrics

DURATION = re.compile(r'^([0-9]+(ms|s|m|h|d|w|y))+$')
SEVERITIES = {'critical', 'warning', 'info'}


def operator_metric_names() -> set[str]:
    return exported_metric_names(generate_latest(Metrics(lambda: []).registry).decode())


def rules() -> list[dict]:
    (rule,) = by_kind(render_monitoring(HELM), 'PrometheusRule')
    return [item for group in rule['spec']['groups'] for item in group['rules']]


def test_off_by_default():
    kinds = [doc['kind'] for doc in render()]
    assert 'PrometheusRule' not in kinds and not any(doc['kind'] == 'ConfigMap' and 'dashboard' in
                                                         doc['metadata']['name'] for doc in render())


def test_the_rules_are_what_promtool_accepts():
    (rule,) = by_kind(render_monitoring(HELM), 'PrometheusRule')
    groups = rule['spec']['groups']
    assert len({group['name'] for group in groups}) == len(groups)
    alerts = [item['alert'] for group in groups for item in group['rules']]
    assert len(set(alerts)) == len(alerts) and all(re.fullmatch(r'[A-Z][A-Za-z0-9]+', alert) for alert in alerts)
    for item in rules():
        selected_metrics(item['expr'])          # raises when it does not parse
        assert 'for' not in item or DURATION.match(item['for']), item
        assert item['labels']['severity'] in SEVERITIES, item
        assert {'summary', 'description', 'runbook_url'} <= set(item['annotations']), item


def test_the_alerts_a_platform_team_needs_are_there():
    assert {item['alert'] for item in rules()} == {
        'TrainguardRunStalled', 'TrainguardHeartbeatSilent', 'TrainguardRunsFailingInARow',
        'TrainguardOperatorDown', 'TrainguardReconcileErrors', 'TrainguardWebhookFailing'}


def test_every_rule_selects_only_metrics_the_operator_exports():
    exported = operator_metric_names()
    for item in rules():
        assert selected_metrics(item['expr']) <= exported | PROMETHEUS_SERIES, item['alert']


def test_every_runbook_link_is_a_readme_section():
    readme = (ROOT / 'README.md').read_text()
    anchors = {re.sub(r'[^a-z0-9 -]', '', heading.strip().lower()).replace(' ', '-')
               for heading in re.findall(r'^#+ (.+)$', readme, re.MULTILINE)}
    for item in rules():
        url = item['annotations']['runbook_url']
        assert url.split('#', 1)[1] in anchors, f'{item["alert"]}: no README section for {url}'


def test_annotations_use_only_labels_the_expression_keeps():
    for item in rules():
        used = set(re.findall(r'\$labels\.([a-z_]+)', json.dumps(item['annotations'])))
        kept = set(item.get('labels', {}))
        for by in re.findall(r'by \(([^)]*)\)', item['expr']):
            kept |= {label.strip() for label in by.split(',')}
        assert used <= kept, (item['alert'], used - kept)


def test_the_operator_job_follows_the_release_or_the_value():
    def down_expr(*extra: str) -> str:
        (rule,) = by_kind(render_monitoring(HELM, *extra), 'PrometheusRule')
        return next(item['expr'] for group in rule['spec']['groups'] for item in group['rules']
                    if item['alert'] == 'TrainguardOperatorDown')
    assert down_expr() == 'absent(up{job="tg-trainguard-metrics"} == 1)'
    assert down_expr('--set', 'metrics.prometheusRule.job=operator') == 'absent(up{job="operator"} == 1)'


def test_the_dashboard_is_a_sidecar_configmap_of_the_shipped_json():
    (config_map,) = [doc for doc in by_kind(render_monitoring(HELM), 'ConfigMap')
                     if doc['metadata']['name'].endswith('-dashboard')]
    assert config_map['metadata']['labels']['grafana_dashboard'] == '1'
    kubernetes_validate.validate(config_map, KUBERNETES_VERSION, strict=True)
    assert len(config_map['data']['trainguard.json']) < 256 * 1024   # far below a ConfigMap's 1 MiB
    assert json.loads(config_map['data']['trainguard.json']) == load_dashboard()


def test_every_dashboard_query_parses_and_selects_exported_metrics():
    exported = operator_metric_names()
    dashboard = load_dashboard()
    assert dashboard['uid'] and dashboard['title'] == 'trainguard'
    ids = [panel['id'] for panel in dashboard['panels']]
    assert len(set(ids)) == len(ids)
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 12
    for title, expr in queries:
        assert selected_metrics(expr) <= exported | PROMETHEUS_SERIES, title
    for variable in dashboard['templating']['list']:
        if variable['type'] == 'query':
            metric = re.fullmatch(r'label_values\((\w+), (\w+)\)', variable['query']['query'])
            assert metric is not None and metric.group(1) in exported, variable


@pytest.mark.parametrize('needed', ['trainguard_running_runs', 'trainguard_oldest_heartbeat_age_seconds',
                                    'trainguard_stalls_total', 'trainguard_attempts_total', 'trainguard_retries_total',
                                    'trainguard_disruptions_total', 'trainguard_namespace_runs',
                                    'trainguard_failed_in_a_row'])
def test_the_dashboard_shows_every_fleet_figure(needed):
    assert any(needed in selected_metrics(expr) for _, expr in dashboard_queries(load_dashboard()))
