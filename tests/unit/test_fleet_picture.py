"""The demo's fleet picture: scrapes kept per line, drawn as the dashboard's panels."""

from __future__ import annotations

import json

from trainguard_sandbox.fleetpicture import (
    DASHBOARD,
    PHASE_PANELS,
    FleetRecorder,
    draw,
    grafana_to_promql,
    panel_titles,
    prometheus_panels,
)

SCRAPE = '''# HELP trainguard_running_runs Running runs
# TYPE trainguard_running_runs gauge
trainguard_running_runs{namespace="a",trainer_phase="Training"} 2.0
trainguard_running_runs{namespace="b",trainer_phase="Training"} 1.0
trainguard_running_runs{namespace="a",trainer_phase="PreparingData"} 1.0
# HELP trainguard_stalls_total Stalls
# TYPE trainguard_stalls_total counter
trainguard_stalls_total{class="NoReport",namespace="a",reason="ProgressTimeout"} 1.0
trainguard_stalls_created{class="NoReport",namespace="a",reason="ProgressTimeout"} 1.7e9
# HELP trainguard_webhook_failures_total Not kept
# TYPE trainguard_webhook_failures_total counter
trainguard_webhook_failures_total 3.0
'''


def test_lines_are_summed_over_the_labels_a_panel_does_not_show():
    recorder = FleetRecorder('http://unused')
    recorder.record(SCRAPE, 1.0)
    recorder.record(SCRAPE.replace('} 2.0', '} 0.0'), 2.0)
    assert dict(recorder.series['trainguard_running_runs']) == {
        'Training': [(1.0, 3.0), (2.0, 1.0)], 'PreparingData': [(1.0, 1.0), (2.0, 1.0)]}
    assert dict(recorder.series['trainguard_stalls_total']) == {'NoReport': [(1.0, 1.0), (2.0, 1.0)]}
    assert set(recorder.series) == {'trainguard_running_runs', 'trainguard_stalls_total'}


def test_the_picture_has_the_dashboards_panels(tmp_path):
    recorder = FleetRecorder('http://unused')
    for second in range(3):
        recorder.record(SCRAPE, float(second))
    path = tmp_path / 'fleet.png'
    titles = draw(recorder.panels(), path, '3 scrapes')
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    dashboard = panel_titles(json.loads(DASHBOARD.read_text()))
    assert dashboard[20] in titles and dashboard[21] in titles


def test_prometheus_panels_are_the_dashboards_queries_with_grafanas_legends(tmp_path):
    asked = []

    def query_range(expr, start, end, step):
        asked.append(expr)
        if 'trainguard_running_runs' in expr:
            return [{'metric': {'trainer_phase': 'Training'}, 'values': [[100.0, '2'], [101.0, '1']]}]
        if 'trainguard_stalls_total' in expr:
            return [{'metric': {'reason': 'ProgressTimeout', 'class': 'NoReport'}, 'values': [[101.0, '1']]},
                    {'metric': {'reason': 'StartupTimeout', 'class': 'NoReport'}, 'values': [[101.0, '0']]}]
        return []

    panels = prometheus_panels(query_range, 100.0, 102.0, 1.0, '4s')
    dashboard = json.loads(DASHBOARD.read_text())
    expected = [grafana_to_promql(target['expr'], '4s') for panel in dashboard['panels']
                if panel['id'] in (*PHASE_PANELS, 20, 21, 30, 32, 33) for target in panel['targets']]
    assert sorted(asked) == sorted(expected) and all('$' not in expr for expr in asked)
    assert panels[1].lines == {'Training': [(0.0, 2.0), (1.0, 1.0)]}
    assert panels[3].lines == {'stalls: ProgressTimeout / NoReport': [(1.0, 1.0)]}   # a line all 0 is left out
    path = tmp_path / 'fleet.png'
    assert draw(panels, path, 'Prometheus')[1] == panel_titles(dashboard)[20]
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
