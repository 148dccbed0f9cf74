"""The trainer's watchdog says where it hung: the hang switch, and a DataLoader worker that blocks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.trainer.test_cli import _wait_for_log

TINY = ['--device', 'cpu', '--epochs', '1', '--num-samples', '20', '--batch-size', '4', '--resolution', '32',
        '--crop-size', '32', '--channels', '8,16', '--strides', '2', '--num-res-units', '0']
MARK = 'stall summary (no run configured): '


def summary_of(text: str) -> dict:
    line = next(line for line in text.splitlines() if MARK in line)
    return json.loads(line.split(MARK, 1)[1])


@pytest.mark.parametrize(('switch', 'hung_in', 'workers'), [
    (['--simulate-hang-after-steps', '2', '--stall-report-seconds', '0.5'],
     'trainguard_trainer/train.py:_hang_forever', []),
    (['--num-workers', '1', '--simulate-worker-block-after-items', '2', '--startup-report-seconds', '1'],
     'torch/utils/data/dataloader.py:_try_get_data', ['is alive']),
], ids=['loop-hang', 'worker-blocks'])
def test_a_stall_report_names_the_frame_within_seconds(tmp_path, switch, hung_in, workers):
    log = tmp_path / 'log.txt'
    with log.open('w') as output:
        process = subprocess.Popen([sys.executable, '-m', 'trainguard_trainer', *TINY, *switch,
                                    '--output-dir', str(tmp_path / 'out')], stdout=output, stderr=subprocess.STDOUT)
        try:
            text = _wait_for_log(log, process, lambda text: MARK in text, 'the stall summary', timeout=60)
        finally:
            process.kill()
            process.wait()
    summary = summary_of(text)
    assert summary['summary'].startswith('hung in ') and summary['summary'].endswith(hung_in)
    assert [state.split(') ', 1)[1] for state in summary['workers']] == workers
    report = (tmp_path / 'out' / 'stall-report.txt').read_text()
    assert '--- thread MainThread ---' in report and 'rss ' in report   # every thread's stack, and the process
    assert len(json.dumps(summary)) < 2048
