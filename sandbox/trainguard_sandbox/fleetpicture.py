"""The dashboard's key panels for the demo's own runs, drawn without Grafana.

Where a real Prometheus runs (trainguard_sandbox.prometheus), each panel is the dashboard's own
PromQL (charts/trainguard/files/dashboard.json) answered by it over the demo's span: the
picture is what Grafana would show (:func:`prometheus_panels`). Elsewhere the demo scrapes the
operator's /metrics once a second itself and draws the same panels from those scrapes
(:class:`FleetRecorder`). Either way one PNG, with the panels' titles from the dashboard.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trainguard.domain import fleet, heartbeat

# chart/ is a link to charts/trainguard/ (packaged like manifests/).
DASHBOARD = pathlib.Path(__file__).parent / 'chart' / 'files' / 'dashboard.json'
# Series of the key panels: metric name -> the label that names a line.
KEPT = {'trainguard_runs': 'phase', 'trainguard_running_runs': 'trainer_phase',
        'trainguard_oldest_heartbeat_age_seconds': 'namespace', 'trainguard_attempts_total': 'reason',
        'trainguard_stalls_total': 'class', 'trainguard_disruptions_total': 'reason'}
TRAINER_PHASES = ('NoHeartbeat', *heartbeat.PHASES)
RUN_PHASES = fleet.PHASES
# One colour per state, the same wherever it is drawn (red only for what went wrong).
COLOURS = {'Pending': '#b0b0b0', 'Queued': '#e6c229', 'Running': '#4c72b0', 'Suspended': '#c4a484',
           'Succeeded': '#55a868', 'Failed': '#c44e52', 'NoHeartbeat': '#d0d0d0', 'Starting': '#8c8c8c',
           'PreparingData': '#64b5cd', 'Training': '#55a868', 'Validating': '#8172b2', 'Checkpointing': '#dd8452'}


@dataclasses.dataclass
class FleetRecorder:
    """Scrapes and keeps, per kept metric and line, (seconds since the first scrape, value)."""
    url: str
    series: dict[str, dict[str, list[tuple[float, float]]]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(lambda: collections.defaultdict(list)))
    scrapes: int = 0

    def record(self, exposition: str, seconds: float) -> None:
        totals: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                line_label = KEPT.get(sample.name)
                if line_label is not None:
                    totals[sample.name][sample.labels.get(line_label, '')] += sample.value
        for name, lines in totals.items():
            for line, value in lines.items():
                self.series[name][line].append((seconds, value))
        self.scrapes += 1

    def scrape(self, seconds: float) -> None:
        """One scrape (blocking: call it from a thread)."""
        with urllib.request.urlopen(self.url, timeout=5) as response:
            self.record(response.read().decode(), seconds)

    def panels(self, dashboard_path: pathlib.Path = DASHBOARD) -> list[Panel]:
        """The four panels the picture shows, from these scrapes."""
        titles = panel_titles(json.loads(dashboard_path.read_text()))
        counters = {}
        for metric, prefix in (('trainguard_attempts_total', 'attempts'), ('trainguard_stalls_total', 'stalls'),
                               ('trainguard_disruptions_total', 'disruptions')):
            for line, points in sorted(self.series.get(metric, {}).items()):
                counters[f'{prefix}: {line}'] = list(points)
        return [Panel('Runs by phase', dict(self.series.get('trainguard_runs', {})), 'stacked', 'runs', RUN_PHASES),
                Panel(titles[20], dict(self.series.get('trainguard_running_runs', {})), 'stacked', 'runs',
                      TRAINER_PHASES),
                Panel(titles[21], {f'namespace {line}': points for line, points in
                                   self.series.get('trainguard_oldest_heartbeat_age_seconds', {}).items()},
                      'lines', 'seconds'),
                Panel('Attempts, stalls and disruptions (totals at the end)', counters, 'totals', 'count')]


@dataclasses.dataclass
class Panel:
    """One drawn panel: its lines (name -> (seconds, value) points) and how to draw them."""
    title: str
    lines: dict[str, list[tuple[float, float]]]
    kind: str                       # stacked | lines | totals (each line's last value, as bars)
    unit: str
    order: Sequence[str] = ()

    def peak(self) -> float:
        return max((value for points in self.lines.values() for _, value in points), default=0.0)


def panel_titles(dashboard: Mapping[str, Any]) -> dict[int, str]:
    return {panel['id']: panel['title'] for panel in dashboard['panels']}


# Grafana's variables, replaced as Grafana does before a query reaches Prometheus (every
# namespace and job selected; $__rate_interval is the caller's: Grafana's is four scrapes).
def grafana_to_promql(expr: str, rate_interval: str = '5m') -> str:
    for variable, value in {'$__rate_interval': rate_interval, '$namespace': '.*', '$job': '.*'}.items():
        expr = expr.replace(variable, value)
    return expr


def _legend(template: str, labels: Mapping[str, str]) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label."""
    return re.sub(r'\{\{\s*(\w+)\s*\}\}', lambda match: labels.get(match.group(1), ''), template or '')


# The dashboard panels the picture draws, by id: runs by phase (the stat panels, one per
# phase), what running trainers do, the oldest heartbeat; then stalls, disruptions, attempts.
PHASE_PANELS = (10, 11, 12, 13, 14, 15)
TRAINERS, OLDEST, ATTEMPTS, STALLS, DISRUPTIONS = 20, 21, 30, 32, 33


def prometheus_panels(query_range: Callable[[str, float, float, float], list[dict[str, Any]]],
                      start: float, end: float, step: float, rate_interval: str,
                      dashboard_path: pathlib.Path = DASHBOARD) -> list[Panel]:
    """The picture's panels, each line a series of the dashboard's own query answered by Prometheus."""
    panels = {panel['id']: panel for panel in json.loads(dashboard_path.read_text())['panels']}

    def lines(panel_id: int, prefix: str = '') -> dict[str, list[tuple[float, float]]]:
        found: dict[str, list[tuple[float, float]]] = {}
        for target in panels[panel_id].get('targets', []):
            for series in query_range(grafana_to_promql(target['expr'], rate_interval), start, end, step):
                name = prefix + _legend(target.get('legendFormat', ''), series['metric'])
                found[name] = [(float(at) - start, float(value)) for at, value in series['values']]
        return found

    phases: dict[str, list[tuple[float, float]]] = {}
    for panel_id in PHASE_PANELS:
        phases.update(lines(panel_id))
    events = {**lines(STALLS, 'stalls: '), **lines(DISRUPTIONS, 'disruptions: '), **lines(ATTEMPTS, 'attempts: ')}
    return [Panel('Runs by phase (' + ', '.join(panels[i]['title'] for i in PHASE_PANELS) + ')', phases, 'stacked',
                  'runs', RUN_PHASES),
            Panel(panels[TRAINERS]['title'], lines(TRAINERS), 'stacked', 'runs', TRAINER_PHASES),
            Panel(panels[OLDEST]['title'], {f'namespace {name}': points for name, points in lines(OLDEST).items()},
                  'lines', 'seconds'),
            Panel(f'{panels[STALLS]["title"]}; {panels[DISRUPTIONS]["title"].lower()}; '
                  f'{panels[ATTEMPTS]["title"].lower()} (increase over {rate_interval})',
                  {name: points for name, points in events.items() if any(value for _, value in points)},
                  'lines', 'count')]


def draw(panels: Sequence[Panel], path: pathlib.Path, source: str) -> list[str]:
    """Write the PNG (a 2 x 2 grid); returns the titles of the panels drawn."""
    import matplotlib

    matplotlib.use('Agg')   # no display: a file
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(13, 7.5), constrained_layout=True)
    for axis, panel in zip(axes.flat, panels, strict=True):
        axis.set_title(panel.title, fontsize=10, loc='left')
        axis.set_ylabel(panel.unit)
        axis.grid(alpha=0.3)
        if panel.kind == 'totals':
            _totals(axis, panel.lines)
            continue
        axis.set_xlabel('seconds into the demo')
        if panel.kind == 'stacked':
            _stacked(axis, panel.lines, panel.order)
        else:
            for line, points in sorted(panel.lines.items()):
                axis.plot(*zip(*points, strict=True), label=line, drawstyle='steps-post')
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc='upper left')
    figure.suptitle(f'trainguard fleet view: the demo\'s runs ({source}; panels of '
                    'charts/trainguard/files/dashboard.json)', fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return [panel.title for panel in panels]


def _stacked(axis: Any, lines: Mapping[str, Sequence[tuple[float, float]]], order: Sequence[str]) -> None:
    times = sorted({time for points in lines.values() for time, _ in points})
    names = [name for name in order if name in lines] + sorted(set(lines) - set(order))
    rows = []
    for name in names:
        at = dict(lines[name])
        rows.append((name, [at.get(time, 0.0) for time in times]))
    rows = [(name, values) for name, values in rows if any(values)]   # a state never seen has no legend entry
    if times and rows:
        axis.stackplot(times, [values for _, values in rows], labels=[name for name, _ in rows], step='post',
                       colors=[COLOURS.get(name, '#999999') for name, _ in rows], alpha=0.9)


def _totals(axis: Any, lines: Mapping[str, Sequence[tuple[float, float]]]) -> None:
    """Each counter's last value, one bar per line (attempts by why, stalls by class, disruptions);
    a line still at 0 (created before its first event) has no bar."""
    colours = {'attempts': '#4c72b0', 'stalls': '#c44e52', 'disruptions': '#dd8452'}
    bars = [(line, points[-1][1], colours.get(line.split(':')[0], '#999999'))
            for line, points in lines.items() if points and points[-1][1]]
    if bars:
        positions = range(len(bars))
        axis.barh(list(positions), [value for _, value, _ in bars], color=[colour for *_, colour in bars])
        axis.set_yticks(list(positions), [label for label, _, _ in bars], fontsize=8)
        axis.invert_yaxis()
        axis.set_ylabel('')
        axis.set_xlabel('count')
        for position, (_, value, _) in zip(positions, bars, strict=True):
            axis.text(value, position, f' {value:.0f}', va='center', fontsize=8)
