"""The dashboard's key panels for the demo's own runs, drawn without Grafana.

The demo scrapes the operator's /metrics once a second (what Prometheus would do), keeps the
series the dashboard's key panels show, and draws them as one PNG when the runs are done, with
the panels' titles taken from charts/trainguard/files/dashboard.json. A newcomer sees what the
fleet view shows, for runs they just watched, with nothing installed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trainguard.domain import fleet, heartbeat

# chart_files/ is a link to charts/trainguard/files/ (packaged like manifests/).
DASHBOARD = pathlib.Path(__file__).parent / 'chart_files' / 'dashboard.json'
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


def panel_titles(dashboard: Mapping[str, Any]) -> dict[int, str]:
    return {panel['id']: panel['title'] for panel in dashboard['panels']}


def draw(recorder: FleetRecorder, path: pathlib.Path, dashboard_path: pathlib.Path = DASHBOARD) -> list[str]:
    """Write the PNG; returns the titles of the panels drawn."""
    import matplotlib

    matplotlib.use('Agg')   # no display: a file
    import matplotlib.pyplot as plt

    titles = panel_titles(json.loads(dashboard_path.read_text()))
    panels = [
        ('Runs by phase', 'trainguard_runs', RUN_PHASES, True, 'runs'),
        (titles[20], 'trainguard_running_runs', TRAINER_PHASES, True, 'runs'),
        (titles[21], 'trainguard_oldest_heartbeat_age_seconds', (), False, 'seconds'),
        ('Attempts, stalls and disruptions (totals at the end)', None, (), False, 'count'),
    ]
    figure, axes = plt.subplots(2, 2, figsize=(13, 7.5), constrained_layout=True)
    for axis, (title, metric, order, stacked, unit) in zip(axes.flat, panels, strict=True):
        axis.set_title(title, fontsize=11, loc='left')
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3)
        if metric is None:
            _counters(axis, recorder)
            continue
        axis.set_xlabel('seconds into the demo')
        if stacked:
            _stacked(axis, recorder.series.get(metric, {}), order)
        else:
            for line, points in sorted(recorder.series.get(metric, {}).items()):
                axis.plot(*zip(*points, strict=True), label=f'namespace {line}', drawstyle='steps-post')
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc='upper left')
    figure.suptitle(f'trainguard fleet view: the demo\'s runs ({recorder.scrapes} scrapes of the operator\'s '
                    '/metrics; panels of charts/trainguard/files/dashboard.json)', fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return [title for title, *_ in panels]


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


def _counters(axis: Any, recorder: FleetRecorder) -> None:
    """Each counter's last value, one bar per line (attempts by why, stalls by class, disruptions)."""
    bars = []
    for metric, prefix, colour in (('trainguard_attempts_total', 'attempts', '#4c72b0'),
                                   ('trainguard_stalls_total', 'stalls', '#c44e52'),
                                   ('trainguard_disruptions_total', 'disruptions', '#dd8452')):
        for line, points in sorted(recorder.series.get(metric, {}).items()):
            bars.append((f'{prefix}: {line}', points[-1][1], colour))
    if bars:
        positions = range(len(bars))
        axis.barh(list(positions), [value for _, value, _ in bars], color=[colour for *_, colour in bars])
        axis.set_yticks(list(positions), [label for label, _, _ in bars], fontsize=8)
        axis.invert_yaxis()
        axis.set_ylabel('')
        axis.set_xlabel('count')
        for position, (_, value, _) in zip(positions, bars, strict=True):
            axis.text(value, position, f' {value:.0f}', va='center', fontsize=8)
