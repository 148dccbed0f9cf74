"""The trainer rides out an API outage: a beat never blocks a step, the newest beat replaces the
ones the API could not take, and the first beat after the API returns arrives within one
heartbeat interval (the retry back-off is capped at it).

The API here is a small HTTP server that answers the merge patch, can go away (connections
refused) and can hang (it accepts connections and never answers)."""

from __future__ import annotations

import datetime
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import kubernetes
import pytest

from trainguard_sandbox.cluster import free_port
from trainguard_trainer.heartbeat import Heartbeat, KubernetesSender

INTERVAL = 1.0


class FakeApi:
    """The run's PATCH endpoint on a fixed port, which can be stopped, started and hung."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[float, dict]] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._hang: socket.socket | None = None

    def start(self) -> None:
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                api.received.append((time.monotonic(), body))
                answer = json.dumps({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun',
                                     'metadata': {'name': 'unet'}}).encode()
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(('127.0.0.1', self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._hang is not None:
            self._hang.close()
            self._hang = None

    def hang(self) -> None:
        """Accept connections (the kernel does) and never answer."""
        self.stop()
        self._hang = socket.socket()
        self._hang.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._hang.bind(('127.0.0.1', self.port))
        self._hang.listen(64)

    def beats_after(self, moment: float) -> list[tuple[float, dict]]:
        return [(at, body) for at, body in self.received if at >= moment]


@pytest.fixture()
def fake_api() -> Iterator[FakeApi]:
    api = FakeApi()
    api.start()
    yield api
    api.stop()


@pytest.fixture()
def senders() -> Iterator[list[KubernetesSender]]:
    made: list[KubernetesSender] = []
    yield made
    for sender in made:   # the test's API is gone: nothing to flush, no thread left retrying
        sender.close()


def sender_for(api: FakeApi, senders: list[KubernetesSender]) -> KubernetesSender:
    configuration = kubernetes.client.Configuration(host=f'http://127.0.0.1:{api.port}')
    configuration.retries = 0
    client = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))
    sender = KubernetesSender('unet', 'default', retry_cap_seconds=INTERVAL, final_seconds=5, timeout=(1.0, 1.0),
                              api=client)
    senders.append(sender)
    return sender


def progress(body: dict) -> dict:
    return json.loads(body['metadata']['annotations']['trainguard.io/progress'])


def train_steps(heartbeat: Heartbeat, seconds: float, start_step: int) -> tuple[int, float]:
    """Steps of 10 ms for ``seconds``, each followed by a beat; (steps, the slowest beat call)."""
    slowest, step = 0.0, start_step
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
        step += 1
        began = time.monotonic()
        heartbeat.beat(epoch=1, epochs=1, step=step, steps=10_000, loss=0.5, samples_per_second=100.0)
        slowest = max(slowest, time.monotonic() - began)
    return step, slowest


@pytest.mark.parametrize('outage', ['refused', 'hung'])
def test_an_outage_blocks_no_step_and_the_latest_beat_arrives_within_an_interval_of_the_return(
        fake_api, outage, caplog, senders):
    caplog.set_level(logging.INFO, logger='trainguard_trainer.heartbeat')
    sender = sender_for(fake_api, senders)
    heartbeat = Heartbeat(sender, INTERVAL, time.monotonic, lambda: datetime.datetime.now(datetime.UTC))
    before, _ = train_steps(heartbeat, 2.0, 0)
    assert fake_api.received, 'no beat reached the API before the outage'

    fake_api.stop() if outage == 'refused' else fake_api.hang()
    during, slowest_during = train_steps(heartbeat, 4.0, before)
    # A step never waits for the API: the same step rate, no beat call slower than a few ms.
    assert slowest_during < 0.05, slowest_during
    assert (during - before) / 4.0 > 0.6 * before / 2.0, (before, during)

    fake_api.stop()
    fake_api.start()
    returned = time.monotonic()
    after, _ = train_steps(heartbeat, 2.5, during)
    arrived = fake_api.beats_after(returned)
    assert arrived, 'no beat after the API returned'
    assert arrived[0][0] - returned <= INTERVAL + 0.5, arrived[0][0] - returned
    # The first beat after the return is the newest (a beat from during the outage at least),
    # not the oldest one the API missed: no backlog.
    assert progress(arrived[0][1])['step'] > before
    assert sender.flush(5.0)
    assert progress(fake_api.received[-1][1])['step'] > during
    assert after > during
    messages = [record.getMessage() for record in caplog.records]
    assert sum('unreachable (' in message for message in messages) == 1, messages
    assert sum('reachable again' in message for message in messages) == 1, messages


def test_the_last_beat_is_flushed_before_exit_and_an_api_that_never_returns_does_not_hold_it(fake_api, senders):
    sender = sender_for(fake_api, senders)
    sender({'phase': 'Training', 'step': 7})
    assert sender.flush(5.0)
    assert progress(fake_api.received[-1][1])['step'] == 7
    fake_api.stop()
    sender({'phase': 'Training', 'step': 8})
    began = time.monotonic()
    assert not sender.flush(1.5)
    assert time.monotonic() - began < 3.0


EXIT_WHILE_RETRYING = """
import sys, time
import kubernetes
from trainguard_trainer.heartbeat import KubernetesSender

configuration = kubernetes.client.Configuration()
configuration.host, configuration.retries = sys.argv[1], 0
api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))
for step in range(3):   # the progress and stall senders of a run, retrying as fast as they can
    KubernetesSender('unet', 'default', retry_cap_seconds=0.001, final_seconds=0.2, timeout=(0.5, 0.5),
                     api=api)({'phase': 'Training', 'step': step})
time.sleep(0.3)
"""


def test_a_trainer_that_ends_while_the_api_is_away_exits_cleanly(tmp_path):
    """Training is over, the API is away, the last beats are still being retried: the process
    must exit 0. A daemon thread left retrying while the interpreter finalizes aborted it
    (SIGABRT, exit 134) in 28 of 30 tries before the senders stopped their threads at exit."""
    address = f'http://127.0.0.1:{free_port()}'   # nothing listens: every patch is refused at once
    for attempt in range(5):
        done = subprocess.run([sys.executable, '-c', EXIT_WHILE_RETRYING, address], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, (attempt, done.returncode, done.stderr[-2000:])
        assert 'the API is unreachable' in done.stderr
