"""Prometheus metrics served by the operator: runs by phase and stalls, read over HTTP."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest

from tests.operator.test_lifecycle import beat, beat_and_wait, phase, start_running
from trainguard.domain.config import config_from_env
from trainguard_sandbox.cluster import free_port

pytestmark = pytest.mark.looptime(noop_cycles=2000)


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as response:
            return response.read().decode()
    return await asyncio.get_running_loop().run_in_executor(None, get)


async def test_stalls_and_phases_are_exported(api, operator, operator_memo):
    port = free_port()
    operator_memo.config = config_from_env({'TRAINGUARD_METRICS_PORT': str(port)})
    await operator.start()
    await start_running(api, 'hung')
    # Before the first stall its series is there at 0, so Prometheus sees the stall as an increase.
    before = await scrape(port)
    assert 'trainguard_stalls_total{class="NoReport",namespace="default",reason="ProgressTimeout"} 0.0' in before
    assert 'trainguard_disruptions_total{namespace="default",reason="EvictionByEvictionAPI"} 0.0' in before
    assert 'trainguard_phase_transitions_total{namespace="default",phase="Failed",reason="ProgressTimeout"} 0.0' \
        in before
    await beat_and_wait(api, 'hung', step=2)
    await api.wait_for_run('hung', phase('Failed'), timeout=60 + 15)
    text = await scrape(port)
    assert 'trainguard_stalls_total{class="NoReport",namespace="default",reason="ProgressTimeout"} 1.0' in text
    assert 'trainguard_runs{phase="Failed"} 1.0' in text
    assert 'trainguard_namespace_runs{namespace="default",phase="Failed",reason="ProgressTimeout"} 1.0' in text
    assert 'trainguard_phase_transitions_total{namespace="default",phase="Running",reason="Training"} 1.0' in text
    assert 'trainguard_attempts_total{namespace="default",reason="PodCreated"} 1.0' in text
    assert 'trainguard_failed_in_a_row{namespace="default"} 1.0' in text


async def test_running_runs_say_what_their_trainers_do_and_how_long_they_are_silent(api, operator, operator_memo):
    port = free_port()
    operator_memo.config = config_from_env({'TRAINGUARD_METRICS_PORT': str(port)})
    await operator.start()
    await start_running(api, 'caching', progressTimeoutSeconds=600)
    await beat(api, 'caching', phase='PreparingData', epoch=0, step=0, steps=0, done=3, total=9)
    await api.wait_for_run('caching', lambda r: (r['status'].get('progress') or {}).get('done') == 3)
    await asyncio.sleep(42)
    text = await scrape(port)
    assert 'trainguard_running_runs{namespace="default",trainer_phase="PreparingData"} 1.0' in text
    age = re.search(r'trainguard_oldest_heartbeat_age_seconds\{namespace="default"\} ([0-9.]+)', text)
    assert age is not None and 42 <= float(age.group(1)) < 50, text
