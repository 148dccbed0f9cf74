"""The chart's alert rules and dashboard, as Prometheus and Grafana would read them: every
PromQL expression parsed (promql-parser, the Prometheus parser's Rust port) and the metric
names it selects, for tests that hold them against what the operator exports."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import promql_parser
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHART = ROOT / 'charts' / 'trainguard'
DASHBOARD = CHART / 'files' / 'dashboard.json'
# Grafana's variables, replaced as Grafana would before the query reaches Prometheus.
GRAFANA_VARIABLES = {'$__rate_interval': '5m', '$namespace': '.*', '$job': '.*'}
# Prometheus' own series: not the operator's to export.
PROMETHEUS_SERIES = {'up'}


def render_monitoring(helm: str, *extra: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [helm, 'template', 'tg', str(CHART), '--namespace', 'trainguard-system', '--set',
         'metrics.prometheusRule.enabled=true', '--set', 'metrics.dashboard.enabled=true', *extra],
        capture_output=True, text=True, check=True, timeout=120)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every panel target, Grafana variables filled in."""
    for panel in dashboard['panels']:
        for target in panel.get('targets', []):
            yield panel['title'], grafana_to_promql(target['expr'])


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def selected_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (raises ValueError when it does not parse)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        kind = type(node).__name__
        if kind == 'VectorSelector':
            names.add(node.name or next(m.value for m in node.matchers.matchers if m.name == '__name__'))
            return
        for attribute in ('expr', 'lhs', 'rhs', 'vector_selector', 'param'):
            child = getattr(node, attribute, None)
            if child is not None and not isinstance(child, str | int | float):
                walk(child)
        for argument in getattr(node, 'args', None) or []:
            walk(argument)

    walk(promql_parser.parse(expr))
    return names


def exported_metric_names(exposition: str) -> set[str]:
    """Metric names a /metrics text declares (``# TYPE``), with the series names counters get."""
    names: set[str] = set()
    for match in re.finditer(r'^# TYPE (\S+) (\S+)$', exposition, re.MULTILINE):
        name, kind = match.groups()
        names.add(name)
        if kind == 'counter':
            names |= {f'{name}_total', f'{name}_created'}
    return names
