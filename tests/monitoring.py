"""The chart's alert rules and dashboard, as Prometheus and Grafana would read them: every
PromQL expression parsed (promql-parser, the Prometheus parser's Rust port) and the metric
names it selects, for tests that hold them against what the operator exports."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

from trainguard_sandbox.fleetpicture import grafana_to_promql

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHART = ROOT / 'charts' / 'trainguard'
DASHBOARD = CHART / 'files' / 'dashboard.json'
# Prometheus' own series: not the operator's to export.
PROMETHEUS_SERIES = {'up'}


def render_monitoring(helm: str, *extra: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [helm, 'template', 'tg', str(CHART), '--namespace', 'trainguard-system', '--set',
         'metrics.prometheusRule.enabled=true', '--set', 'metrics.dashboard.enabled=true', *extra],
        capture_output=True, text=True, check=True, timeout=120)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def dashboard_queries(dashboard: dict[str, Any], rate_interval: str = '5m') -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every panel target, Grafana variables filled in."""
    for panel in dashboard['panels']:
        for target in panel.get('targets', []):
            yield panel['title'], grafana_to_promql(target['expr'], rate_interval)


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


def scraped_labels(labels: Mapping[str, str], scrape: Mapping[str, Any]) -> dict[str, str]:
    """A model of what Prometheus stores for one exposed sample's labels under a scrape job:
    the target's labels merged (``honor_labels``: the sample's win; else a clash renames the
    sample's to ``exported_<name>``), then ``metric_relabel_configs`` (the replace and labeldrop
    actions the chart uses). tests/chart/test_prometheus.py holds this model against a real
    Prometheus; the promtool cases build their input series with it."""
    (static,) = scrape['static_configs']
    target = {**static['labels'], 'instance': static['targets'][0]}
    result = dict(labels)
    for name, value in target.items():
        if scrape.get('honor_labels'):
            result.setdefault(name, value)
            continue
        if name in result:
            exported = f'exported_{name}'
            while exported in result:
                exported = f'exported_{exported}'
            result[exported] = result.pop(name)
        result[name] = value
    for relabel in scrape.get('metric_relabel_configs', []):
        regex = re.compile(relabel.get('regex', '(.*)'))
        if relabel['action'] == 'replace':
            joined = relabel.get('separator', ';').join(result.get(name, '') for name in relabel['source_labels'])
            match = regex.fullmatch(joined)
            if match:
                result[relabel['target_label']] = match.expand(relabel.get('replacement', '$1').replace('$', '\\'))
        elif relabel['action'] == 'labeldrop':
            result = {name: value for name, value in result.items() if not regex.fullmatch(name)}
        else:
            raise NotImplementedError(relabel['action'])
    return {name: value for name, value in result.items() if value}


def exposition_samples(exposition: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of a /metrics text: (sorted labels with __name__) -> value (a counter's
    ``_created`` too: Prometheus 2.x stores it as a series of its own)."""
    samples: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[tuple(sorted({'__name__': sample.name, **sample.labels}.items()))] = sample.value
    return samples


def promql_series(labels: Mapping[str, str]) -> str:
    """A promtool input series name: ``metric{label="value", ...}``."""
    rest = ', '.join(f'{name}="{value}"' for name, value in sorted(labels.items()) if name != '__name__')
    return f'{labels["__name__"]}{{{rest}}}'
