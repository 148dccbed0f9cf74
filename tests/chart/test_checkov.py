"""checkov on the chart rendered with every values file.

Skipped checks are justified one by one in charts/trainguard/.checkov.yaml.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

from tests.chart.test_chart import CHART, VALUES_FILES, helm
from tests.crd_schema import ROOT

CHECKOV = ROOT / '.venv-checkov' / 'bin' / 'checkov'   # its own venv: its pins clash with ours (Makefile)


def test_checkov_passes_on_every_rendering(tmp_path: pathlib.Path):
    assert CHECKOV.exists(), 'checkov is missing: `make test` installs it into .venv-checkov'
    for values in [None, *VALUES_FILES]:
        args = ['template', 'tg', str(CHART), '--namespace', 'trainguard-system']
        if values:
            args += ['--values', str(values)]
        (tmp_path / f'{values.stem if values else "defaults"}.yaml').write_text(helm(*args).stdout)
    # --skip-download: no calls to checkov's cloud service (and none are reachable from here).
    result = subprocess.run([str(CHECKOV), '-d', str(tmp_path), '--config-file', str(CHART / '.checkov.yaml'),
                             '--skip-download', '--output', 'json', '--quiet'],
                            capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    failed = [(check['check_id'], check['resource']) for check in report['results']['failed_checks']]
    assert failed == []
    assert report['summary']['passed'] > 100
