"""A control-plane outage is not a hang (trainguard.domain.observer).

The operator reaches the emulated API through a door (trainguard_sandbox.outage) that the test
closes for longer than the runs' progress timeout: connections cut and refused, as a stopped
kube-apiserver does. A healthy run's trainer could not beat meanwhile; it must survive with no
extra attempt. A frozen run in the same test is still failed, on time after the outage. Most
runs silent at once is held (Stalled=Unknown), and one hung run among many is still caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator

import pytest

from tests.operator.conftest import EVENTS
from tests.operator.test_lifecycle import beat, phase, start_running
from tests.operator.test_metrics import scrape
from trainguard.domain.config import config_from_env
from trainguard.domain.heartbeat import parse_time
from trainguard_sandbox.cluster import free_port, write_kubeconfig
from trainguard_sandbox.outage import ApiDoor

pytestmark = pytest.mark.looptime(noop_cycles=2000)
TIMEOUT = 30          # progressTimeoutSeconds of every run here; heartbeat interval: 10 s
OUTAGE = 67           # longer than the timeout, as measured on a real control plane


@pytest.fixture()
async def door(cluster, tmp_path, monkeypatch) -> AsyncIterator[ApiDoor]:
    """The operator's API address goes through a door the test can close."""
    url = str(cluster.servers[0].url).rstrip('/')
    host, port = re.match(r'https?://([^:/]+):(\d+)', url).groups()
    token = _token_of(monkeypatch)
    async with ApiDoor(host, int(port)) as opened:
        monkeypatch.setenv('KUBECONFIG', str(write_kubeconfig(tmp_path / 'door.kubeconfig', opened.url, token=token)))
        yield opened


def _token_of(monkeypatch) -> str:
    import os

    import yaml
    with open(os.environ['KUBECONFIG'], encoding='utf-8') as file:
        return yaml.safe_load(file)['users'][0]['user']['token']


async def keep_beating(api, door: ApiDoor, names: list[str], every: float = 5.0, first_after: float = 0.0) -> None:
    """Trainers that beat every few seconds while they can reach the API (not while it is away);
    ``first_after``: their first beat comes that late (a trainer's retry back-off, at most an interval)."""
    await asyncio.sleep(first_after)
    count = 1
    while True:
        count += 1
        if door.is_open:
            for name in names:
                with contextlib.suppress(AssertionError):
                    await beat(api, name, **position(count))
        await asyncio.sleep(every)


def position(count: int) -> dict[str, int]:
    """The count-th beat's epoch and step (16 steps an epoch), so every beat is new."""
    return {'epoch': 1 + count // 16, 'epochs': 100, 'step': count % 16 + 1}


def loop_time() -> float:
    return asyncio.get_running_loop().time()


async def test_an_outage_longer_than_the_timeout_fails_no_healthy_run_and_still_catches_a_frozen_one(
        api, operator, operator_memo, door, monkeypatch):
    monkeypatch.setenv('POD_NAME', 'trainguard-0')
    monkeypatch.setenv('POD_NAMESPACE', 'default')
    port = free_port()
    operator_memo.config = config_from_env({'TRAINGUARD_METRICS_PORT': str(port)})
    await operator.start()
    await start_running(api, 'healthy', progressTimeoutSeconds=TIMEOUT)
    await start_running(api, 'frozen', progressTimeoutSeconds=TIMEOUT)
    await beat(api, 'frozen', step=1)     # it beat once, then its trainer froze
    beating = asyncio.create_task(keep_beating(api, door, ['healthy']))
    try:
        await asyncio.sleep(20)
        await door.close()
        await asyncio.sleep(OUTAGE)
        await door.open()
        reopened = loop_time()
        frozen = await api.wait_for_run('frozen', phase('Failed'), timeout=TIMEOUT + 10 + 15 + 5)
        failed_after = loop_time() - reopened
        await asyncio.sleep(2 * TIMEOUT)      # the healthy run, beating again, stays healthy
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    healthy = await api.get('healthy')
    assert healthy['status']['phase'] == 'Running', (healthy['status'].get('message'), reopened, failed_after)
    assert healthy['status']['attempts'] == 1
    assert frozen['status']['reason'] == 'ProgressTimeout', frozen['status']
    # Caught after the outage within its timeout plus one heartbeat interval (it had been
    # silent far longer: that silence was not all observable, so it got the grace, no more).
    assert failed_after <= TIMEOUT + 10, failed_after
    text = await scrape(port)
    assert 'trainguard_api_outages_total 1.0' in text, text
    seconds = float(re.search(r'^trainguard_api_outage_seconds_total ([0-9.e+]+)$', text, re.MULTILINE).group(1))
    assert OUTAGE - 10 <= seconds <= OUTAGE + 15, seconds
    assert 'trainguard_api_reachable 1.0' in text
    async def outage_events() -> list:   # posted from a thread of its own, retried until taken
        return [event for event in await api.list(EVENTS) if event['reason'] == 'ApiUnreachable']
    await api.wait_for(outage_events, what='the ApiUnreachable Event')
    events = await outage_events()
    assert len(events) == 1 and events[0]['involvedObject']['name'] == 'trainguard-0', events
    assert re.search(r'could not reach the API server for \d+s', events[0]['message']), events[0]['message']


async def test_most_runs_silent_at_once_are_held_and_one_hung_run_among_many_is_caught(api, operator):
    await operator.start()
    names = [f'run-{index}' for index in range(4)]
    for name in names:
        await start_running(api, name, progressTimeoutSeconds=TIMEOUT)
        await beat(api, name, step=1)
    # One hangs while the others beat: caught on time.
    beating = asyncio.create_task(keep_beating_forever(api, names[1:]))
    try:
        hung = await api.wait_for_run(names[0], phase('Failed'), timeout=TIMEOUT + 30)
        assert hung['status']['reason'] == 'ProgressTimeout'
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    silenced = loop_time()
    # Then all three go silent at once (their trainers cannot reach the API, the operator can):
    # held, Stalled=Unknown with the reason, an Event each; none stopped.
    held = [await api.wait_for_run(name, lambda run: any(
        condition['type'] == 'Stalled' and condition['status'] == 'Unknown' for condition in
        run['status'].get('conditions', [])), timeout=TIMEOUT + 30) for name in names[1:]]
    assert all(run['status']['phase'] == 'Running' for run in held)
    (condition,) = [c for c in held[0]['status']['conditions'] if c['type'] == 'Stalled']
    assert condition['reason'] == 'MassSilence' and '3 of 3 running runs went silent' in condition['message']
    assert loop_time() - silenced >= TIMEOUT
    events = [event for event in await api.list(EVENTS) if event['reason'] == 'MassSilence']
    assert sorted(event['involvedObject']['name'] for event in events) == names[1:]
    # Beats return: judged again, Stalled back to False, nobody stopped.
    for name in names[1:]:
        await beat(api, name, **position(1000))
    for name in names[1:]:
        run = await api.wait_for_run(name, lambda run: any(
            condition['type'] == 'Stalled' and condition['status'] == 'False' for condition in
            run['status'].get('conditions', [])), timeout=30)
        assert run['status']['phase'] == 'Running' and run['status']['attempts'] == 1
        assert parse_time(run['status']['progress']['lastProgressTime']) is not None


async def keep_beating_forever(api, names: list[str], every: float = 5.0) -> None:
    count = 1
    while True:
        count += 1
        for name in names:
            await beat(api, name, **position(count))
        await asyncio.sleep(every)


async def test_a_restarted_operator_judges_no_run_on_silence_from_before_it_started(api, operator, door):
    """The whole control plane down, the operator with it (a single-master upgrade): the new
    process's view starts at its start, so a run is not failed on a beat older than it."""
    await operator.start()
    await start_running(api, 'healthy', progressTimeoutSeconds=TIMEOUT)
    await start_running(api, 'frozen', progressTimeoutSeconds=TIMEOUT)
    await beat(api, 'frozen', **position(1))
    await beat(api, 'healthy', **position(1))
    await api.wait_for_run('healthy', lambda run: (run['status'].get('progress') or {}).get('step') == 2)
    await operator.stop()
    await door.close()
    await asyncio.sleep(OUTAGE)        # nobody can reach the API: no beat is written
    await door.open()
    await operator.start()
    started = loop_time()
    beating = asyncio.create_task(keep_beating(api, door, ['healthy'], first_after=8))
    try:
        frozen = await api.wait_for_run('frozen', phase('Failed'), timeout=TIMEOUT + 10 + 15 + 5)
        failed_after = loop_time() - started
        await asyncio.sleep(2 * TIMEOUT)
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    healthy = await api.get('healthy')
    assert (healthy['status']['phase'], healthy['status']['attempts']) == ('Running', 1), healthy['status']
    assert frozen['status']['reason'] == 'ProgressTimeout'
    assert failed_after <= TIMEOUT + 10, failed_after
