"""Prometheus metrics served by the operator: runs by phase and stalls, read over HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from tests.operator.test_lifecycle import beat_and_wait, phase, start_running
from tests.operator.test_webhook import free_port
from trainguard.domain.config import config_from_env

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
    await beat_and_wait(api, 'hung', step=2)
    await api.wait_for_run('hung', phase('Failed'), timeout=60 + 15)
    text = await scrape(port)
    assert 'trainguard_stalls_total{reason="ProgressTimeout"} 1.0' in text
    assert 'trainguard_runs{phase="Failed"} 1.0' in text
    assert 'trainguard_phase_transitions_total{phase="Running"} 1.0' in text
