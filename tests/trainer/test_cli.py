"""The command line: flags with environment fallbacks, bad values exit 2 naming the flag, the hang switch."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from tests.trainer.processes import start_in_group, stop_group
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


def _wait_for_log(log: pathlib.Path, process: subprocess.Popen, predicate, what: str, timeout: float = 60) -> str:
    """The log once predicate(text) holds; fails naming what it waited for, or if the trainer exited."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text()
        if predicate(text):
            return text
        assert process.poll() is None, f'the trainer exited while waiting for {what}:\n{text}'
        assert time.monotonic() < deadline, f'timed out after {timeout}s waiting for {what}:\n{text}'
        time.sleep(0.05)


def test_hang_switch_blocks_the_loop_and_stops_the_heartbeat(tmp_path):
    # 16 training samples / batch 4 = 4 steps an epoch, so the hang comes mid-epoch, before any
    # forced epoch-end beat. --heartbeat-seconds 0 beats at every step, however fast a step is.
    command = [sys.executable, '-m', 'trainguard_trainer', '--device', 'cpu', '--epochs', '2', '--num-samples', '20',
               '--batch-size', '4', '--resolution', '32', '--crop-size', '32', '--channels', '8,16', '--strides', '2',
               '--num-res-units', '0', '--heartbeat-seconds', '0', '--log-every-steps', '1',
               '--system-log-seconds', '0.1', '--output-dir', str(tmp_path), '--simulate-hang-after-steps', '2']
    log = tmp_path / 'log.txt'
    beats = 'heartbeat (no run configured)'
    with log.open('w') as output:
        process = start_in_group(command, output)
        try:
            at_hang = _wait_for_log(log, process, lambda text: 'simulating a hang' in text, 'the hang')
            assert 'simulating a hang after 2 steps' in at_hang
            payloads = [json.loads(line.split(beats + ': ', 1)[1]) for line in at_hang.splitlines() if beats in line]
            steps = [payload['step'] for payload in payloads if payload['phase'] == 'Training']
            assert steps == [1, 2]  # one beat per step, from the loop, up to the hang
            assert [payload['phase'] for payload in payloads][:3] == ['Starting', 'Starting', 'PreparingData']
            # The system-line thread keeps running in a hang: three more of its lines prove the
            # process is alive and time passed in it, whatever the machine's speed.
            after = _wait_for_log(log, process, lambda text: text[len(at_hang):].count('system: cpu') >= 3,
                                  'three system lines after the hang')
            assert process.poll() is None          # still alive: hung, not finished
            assert after.count(beats) == at_hang.count(beats)   # and silent: no beat since the hang
        finally:
            stop_group(process)


def test_a_gpu_run_without_usable_cuda_exits_4_at_once_saying_why(tmp_path):
    """This machine's torch is a CPU-only build: exactly the case of a GPU run on the CPU image."""
    started = time.monotonic()
    process = subprocess.run([sys.executable, '-m', 'trainguard_trainer', '--device', 'gpu', '--batch-size', '32',
                              '--num-workers', '2', '--resolution', '256', '--crop-size', '256',
                              '--output-dir', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert process.returncode == 4, process.stdout + process.stderr
    last = process.stdout.strip().splitlines()[-1]
    assert 'GPU unavailable: this torch build is CPU-only' in last
    assert '"phase": "Starting"' in process.stdout   # the first beat, sent before torch was imported
    assert 'PreparingData' not in process.stdout and 'Training' not in process.stdout   # nothing on the CPU
    print(f'exited in {time.monotonic() - started:.1f}s')
