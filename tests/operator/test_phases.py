"""Heartbeats in every phase through the real operator: a long data preparation is progress (no
StartupTimeout), and silence in it is a hang that names the phase."""

from __future__ import annotations

import asyncio

import pytest

from tests.operator.test_lifecycle import beat, phase, start_running

pytestmark = pytest.mark.looptime(noop_cycles=2000)
PREPARING = {'phase': 'PreparingData', 'epoch': 0, 'step': 0, 'steps': 0, 'total': 1000}


async def test_data_preparation_longer_than_the_startup_timeout_is_not_a_hang(api, operator):
    await operator.start()
    await start_running(api, 'caching', startupTimeoutSeconds=60, progressTimeoutSeconds=120)
    for done in (100, 200, 300, 340):   # every 50 s: together past startupTimeoutSeconds (60)
        await beat(api, 'caching', **PREPARING, done=done)
        await api.wait_for_run('caching', lambda r, d=done: (r['status'].get('progress') or {}).get('done') == d)
        await asyncio.sleep(50)
    run = await api.get('caching')
    assert run['status']['phase'] == 'Running', run['status']
    assert run['status']['progress']['activity'] == 'PreparingData 340/1000'
    # Then the cache fill stops: ProgressTimeout, naming the phase.
    failed = await api.wait_for_run('caching', phase('Failed'), timeout=200)
    assert failed['status']['reason'] == 'ProgressTimeout'
    assert 'hung in PreparingData (340/1000)' in failed['status']['message']
