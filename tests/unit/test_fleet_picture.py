"""The demo's fleet picture: scrapes kept per line, drawn as the dashboard's panels."""

from __future__ import annotations

import json

from trainguard_sandbox.fleetpicture import DASHBOARD, FleetRecorder, draw, panel_titles

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
    titles = draw(recorder, path)
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    dashboard = panel_titles(json.loads(DASHBOARD.read_text()))
    assert dashboard[20] in titles and dashboard[21] in titles
