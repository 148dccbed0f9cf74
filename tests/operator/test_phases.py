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


async def test_a_training_beat_after_data_preparation_clears_it_and_silence_is_still_a_hang(api, operator):
    """status.progress is merge-patched: the PreparingData fields must not outlive the phase,
    or every later reconcile would see a "new" beat and a hang would never be caught."""
    await operator.start()
    await start_running(api, 'cleared', startupTimeoutSeconds=60, progressTimeoutSeconds=120)
    await beat(api, 'cleared', **PREPARING, done=999, detail='caching')
    await api.wait_for_run('cleared', lambda r: (r['status'].get('progress') or {}).get('done') == 999)
    await beat(api, 'cleared', phase='Training', step=3, time='2026-11-25T12:00:09Z')
    running = await api.wait_for_run('cleared', lambda r: r['status']['progress'].get('phase') == 'Training')
    assert not {'done', 'total', 'detail'} & set(running['status']['progress']), running['status']['progress']
    assert running['status']['progress']['activity'] == 'Training'
    failed = await api.wait_for_run('cleared', phase('Failed'), timeout=300)
    assert failed['status']['reason'] == 'ProgressTimeout'
    assert 'epoch 1/2, step 3/16' in failed['status']['message']


async def test_set_up_is_held_to_the_startup_timeout_not_the_progress_timeout(api, operator):
    """Imports and the gang's rendezvous count nothing: a Starting beat followed by a silence
    longer than progressTimeoutSeconds is not a hang until startupTimeoutSeconds has passed."""
    await operator.start()
    await start_running(api, 'setting-up', startupTimeoutSeconds=240, progressTimeoutSeconds=30)
    await beat(api, 'setting-up', phase='Starting', epoch=0, step=0, steps=0, detail='joining 4 ranks')
    await api.wait_for_run('setting-up', lambda r: (r['status'].get('progress') or {}).get('phase') == 'Starting')
    await asyncio.sleep(120)   # four progress timeouts
    assert (await api.get('setting-up'))['status']['phase'] == 'Running'
    failed = await api.wait_for_run('setting-up', phase('Failed'), timeout=300)
    assert failed['status']['reason'] == 'StartupTimeout'
    assert 'while Starting (joining 4 ranks) (startupTimeoutSeconds 240)' in failed['status']['message']
