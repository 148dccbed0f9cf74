"""The command line: flags with environment fallbacks, bad values exit 2 naming the flag, the hang switch."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from trainguard_trainer.cli import parse_config


def test_flags_and_environment_fallbacks():
    config = parse_config(['--batch-size', '8', '--channels', '8,16'],
                          {'TRAINGUARD_STRIDES': '2', 'TRAINGUARD_RUN_NAME': 'unet', 'TRAINGUARD_EPOCHS': '5'})
    assert (config.batch_size, config.channels, config.strides, config.epochs) == (8, (8, 16), (2,), 5)
    assert config.run_name == 'unet' and config.simulate_hang_after_steps is None


@pytest.mark.parametrize(('argv', 'env', 'flag'), [
    (['--batch-size', '0'], {}, '--batch-size'),
    (['--learning-rate', 'fast'], {}, '--learning-rate'),
    (['--device', 'tpu'], {}, '--device'),
    (['--resolution', '64', '--crop-size', '128'], {}, '--crop-size'),
    (['--strides', '2,2'], {}, '--strides'),
    ([], {'TRAINGUARD_BATCH_SIZE': 'many'}, '--batch-size'),
    ([], {'TRAINGUARD_NUM_WORKERS': '-1'}, '--num-workers'),
], ids=['batch-zero', 'lr-text', 'device', 'crop', 'strides', 'env-batch', 'env-workers'])
def test_bad_values_exit_2_naming_the_flag(argv, env, flag):
    process = subprocess.run([sys.executable, '-m', 'trainguard_trainer', *argv], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=60)
    assert process.returncode == 2
    assert f'argument {flag}' in process.stderr


def test_hang_switch_blocks_the_loop_and_stops_the_heartbeat(tmp_path):
    command = [sys.executable, '-m', 'trainguard_trainer', '--device', 'cpu', '--epochs', '2', '--num-samples', '20',
               '--resolution', '32', '--crop-size', '32', '--channels', '8,16', '--strides', '2',
               '--num-res-units', '0', '--heartbeat-seconds', '0.01', '--log-every-steps', '1',
               '--output-dir', str(tmp_path), '--simulate-hang-after-steps', '2']
    log = tmp_path / 'log.txt'
    with log.open('w') as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while 'simulating a hang' not in log.read_text() and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()
                time.sleep(0.2)
            seen = log.read_text()
            assert 'simulating a hang after 2 steps' in seen
            time.sleep(2)
            assert process.poll() is None          # still alive: hung, not finished
            beats = 'heartbeat (no run configured)'
            assert log.read_text().count(beats) == seen.count(beats) == 2
        finally:
            process.kill()
            process.wait()
