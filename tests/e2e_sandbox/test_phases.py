"""Heartbeats in every phase with real trainers: a data preparation longer than the startup
timeout trains to Succeeded while the status shows it, and one that stops is a ProgressTimeout
that names the phase. The slow and the hung volume are the trainer's test switches, set in the
pods' environment by a pod webhook stand-in (the operator knows nothing of them)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from tests.e2e_sandbox.test_sandbox import run, wait_for

pytestmark = pytest.mark.timeout(240)
SWITCHES = {   # run name -> the trainer's environment
    'slow-data': {'TRAINGUARD_SIMULATE_SLOW_PREPARATION_SECONDS': '0.6'},
    'hung-data': {'TRAINGUARD_SIMULATE_SLOW_PREPARATION_SECONDS': '0.2',
                  'TRAINGUARD_SIMULATE_PREPARATION_HANG_AFTER_ITEMS': '10'},
}


def inject_switches(pod: dict[str, Any]) -> None:
    run_name = (pod.get('metadata') or {}).get('labels', {}).get('trainguard.io/run', '')
    for container in pod['spec']['containers']:
        container.setdefault('env', []).extend(
            {'name': name, 'value': value} for name, value in SWITCHES.get(run_name, {}).items())


async def test_a_long_data_preparation_trains_and_a_stopped_one_is_a_hang_naming_its_phase(sandbox):
    assert sandbox.emulator is not None
    sandbox.emulator.pod_create_hooks.append(inject_switches)
    data = {'source': 'synthetic', 'numSamples': 40}   # 40 x 0.6 s: 24 s of preparation
    await sandbox.apply(run('slow-data', dataset=data, startupTimeoutSeconds=15, progressTimeoutSeconds=10,
                            hyperparameters={'batchSize': 8, 'numWorkers': 0, 'epochs': 1, 'resolution': 32,
                                             'cropSize': 32}))
    await sandbox.apply(run('hung-data', dataset=data, startupTimeoutSeconds=60, progressTimeoutSeconds=6))

    activities: set[str] = set()
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        slow = await sandbox.run('slow-data')
        status = slow.get('status') or {}
        activities.add((status.get('progress') or {}).get('activity') or '')
        if status.get('phase') in ('Succeeded', 'Failed'):
            break
        await asyncio.sleep(0.25)
    assert status.get('phase') == 'Succeeded', (status.get('reason'), status.get('message'))
    preparing = sorted(a for a in activities if re.fullmatch(r'PreparingData (\d+)/40 \(generating\)', a))
    assert any(int(a.split()[1].split('/')[0]) > 0 for a in preparing), activities
    assert {'Training'} <= activities and any(a.startswith('Starting') for a in activities), activities

    hung = await wait_for(sandbox, 'hung-data', ('Failed', 'Succeeded'), timeout=120)
    assert hung['status']['reason'] == 'ProgressTimeout', hung['status']
    assert re.search(r'no progress for \d+s \(last: hung in PreparingData \(\d+/40\), generating\)',
                     hung['status']['message']), hung['status']['message']
