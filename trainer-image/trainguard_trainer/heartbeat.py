"""The progress heartbeat: patched into the run's trainguard.io/progress annotation.

It is called where the trainer makes progress, in every phase (Starting, PreparingData: an
item generated or cached, Training: an optimizer step, Validating: a batch, Checkpointing),
never from a timer thread: a hung phase must stop beating, or the operator could not tell it
is hung.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)
ANNOTATION = 'trainguard.io/progress'
STALL_ANNOTATION = 'trainguard.io/stall-report'  # the watchdog's summary (trainguard_trainer.watchdog)
FORCED_PHASES = ('Starting', 'PreparingData', 'Validating')


class Sender(Protocol):
    def __call__(self, payload: dict[str, Any]) -> None: ...


def log_only(payload: dict[str, Any]) -> None:
    log.info('heartbeat (no run configured): %s', json.dumps(payload))


def log_stall_only(payload: dict[str, Any]) -> None:
    log.info('stall summary (no run configured): %s', json.dumps(payload))


class KubernetesSender:
    """Merge-patches the run's annotation with the official client (in-cluster, else $KUBECONFIG),
    from a thread of its own, so an API that is slow or away never blocks a training step.

    A call only hands the payload over: the newest replaces one not yet sent (never a backlog,
    the operator wants the latest progress). The thread sends it with bounded timeouts; a
    failed send is retried with exponential back-off and jitter, capped at ``retry_cap_seconds``
    (the heartbeat interval), so the first beat after the API returns arrives within one
    interval. It logs once when the API becomes unreachable, once past ``unreachable_limit_seconds``
    (training goes on regardless: a finished run with unreported progress is still finished),
    and once when it is back. At exit it waits up to ``final_seconds`` for the last beat, then
    stops its thread: a daemon thread still retrying (and logging) while the interpreter
    finalizes can take the process down with SIGABRT, turning a finished run's exit 0 into 134.
    """

    def __init__(self, name: str, namespace: str, annotation: str = ANNOTATION, *,
                 retry_cap_seconds: float = 10.0, unreachable_limit_seconds: float = 120.0,
                 final_seconds: float = 15.0, timeout: tuple[float, float] = (5.0, 10.0),
                 api: Any = None) -> None:
        if api is None:
            import kubernetes  # imported here: local runs without a cluster never need it

            configuration = kubernetes.client.Configuration()
            if os.environ.get('KUBERNETES_SERVICE_HOST'):
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            else:
                kubernetes.config.load_kube_config(
                    config_file=os.environ.get('KUBECONFIG') or os.path.expanduser('~/.kube/config'),
                    client_configuration=configuration)
            configuration.retries = 0   # our own retries, with back-off; urllib3's would hold the thread
            api = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))
        self._api = api
        self._name, self._namespace, self._annotation = name, namespace, annotation
        self._retry_cap, self._limit, self._final, self._timeout = (
            retry_cap_seconds, unreachable_limit_seconds, final_seconds, timeout)
        self._pending: dict[str, Any] | None = None
        self._busy = False
        self._closed = threading.Event()
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f'heartbeat-{annotation}', daemon=True)
        self._thread.start()
        atexit.register(self._at_exit)
        self.sent = 0
        self.failures = 0

    def __call__(self, payload: dict[str, Any]) -> None:
        with self._condition:
            self._pending = payload     # the newest replaces one not yet sent
            self._condition.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (bounded) until the newest payload was sent; False if it could not be."""
        deadline = time.monotonic() + (self._final if timeout is None else timeout)
        with self._condition:
            while (self._pending is not None or self._busy) and not self._closed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning('the API did not take the last %s before exit; the operator has the one before',
                                self._annotation)
                    return False
                self._condition.wait(left)
            return self._pending is None and not self._busy

    def close(self) -> None:
        """Stop the thread without sending what is still pending (call ``flush`` first to send it).

        Waits for a patch in flight, at most its own connect and read timeouts: a thread still in
        a request as the interpreter finalizes aborts it as surely as one still retrying."""
        with self._condition:
            self._closed.set()
            self._condition.notify_all()
        atexit.unregister(self._at_exit)
        if self._thread is not threading.current_thread():
            self._thread.join(sum(self._timeout) + 1.0)

    def _at_exit(self) -> None:
        self.flush()
        self.close()

    def _patch(self, payload: dict[str, Any]) -> None:
        self._api.patch_namespaced_custom_object(
            'trainguard.io', 'v1alpha1', self._namespace, 'trainingruns', self._name,
            {'metadata': {'annotations': {self._annotation: json.dumps(payload, sort_keys=True)}}},
            _content_type='application/merge-patch+json', _request_timeout=self._timeout)

    def _run(self) -> None:
        unreachable_since: float | None = None
        said_limit = False
        delay = 0.0
        while True:
            with self._condition:
                while self._pending is None and not self._closed.is_set():
                    self._condition.wait()
                if self._closed.is_set():
                    return
                payload, self._pending, self._busy = self._pending, None, True
            try:
                self._patch(payload)
            except Exception as error:  # the API being away must never stop training
                self.failures += 1
                now = time.monotonic()
                if unreachable_since is None:
                    unreachable_since = now
                    # An HTTP answer (a policy that admits beats only once the run names this pod,
                    # a Role not created yet) is retried like no answer at all.
                    status = getattr(error, 'status', None)
                    problem = (f'refused the {self._annotation} ({status} {getattr(error, "reason", "")})'
                               if isinstance(status, int) and status else
                               f'is unreachable ({type(error).__name__}: {str(error)[:200]})')
                    log.warning('the API %s; training goes on, the latest %s is retried', problem, self._annotation)
                elif not said_limit and now - unreachable_since > self._limit:
                    said_limit = True
                    log.warning('the API has been unreachable for %.0fs; training goes on and reports its '
                                'progress when the API returns', now - unreachable_since)
                with self._condition:
                    if self._pending is None:
                        self._pending = payload   # retried unless a newer one came meanwhile
                    self._busy = False
                    self._condition.notify_all()
                delay = min(self._retry_cap, max(0.5, delay * 2))
                # Jitter: a cluster's trainers do not retry in step. Woken early by close().
                if self._closed.wait(delay * random.uniform(0.5, 1.0)):
                    return
                continue
            self.sent += 1
            if unreachable_since is not None:
                log.info('the API is reachable again after %.0fs; the latest %s was sent',
                         time.monotonic() - unreachable_since, self._annotation)
            unreachable_since, said_limit, delay = None, False, 0.0
            with self._condition:
                self._busy = False
                self._condition.notify_all()


class Heartbeat:
    """Rate-limits beats to one per interval, plus one at every epoch end; never raises."""

    def __init__(self, sender: Sender, interval_seconds: float,
                 clock: Callable[[], float], wall_clock: Callable[[], datetime.datetime], *,
                 world_size: int = 1) -> None:
        self._sender, self._interval = sender, interval_seconds
        self._world_size = world_size
        self._clock, self._wall_clock = clock, wall_clock
        self._last: float | None = None
        self._stage: tuple[str, str | None] | None = None   # the last beat's phase and detail
        self._trained = False
        self.sent: int = 0
        self.failed: int = 0
        self._quality: dict[str, Any] = {}   # the latest and best validation Dice, on every beat after it

    def quality(self, *, dice: float, best_dice: float, best_epoch: int) -> None:
        """How good the model is (the last and the best validation's mean Dice): carried by
        every beat from now on, so the run's status keeps it between validations."""
        self._quality = {'dice': round(float(dice), 6), 'bestDice': round(float(best_dice), 6),
                         'bestEpoch': int(best_epoch)}

    def beat(self, *, epoch: int, epochs: int, step: int, steps: int, loss: float, samples_per_second: float,
             force: bool = False) -> bool:
        """A training step (or an epoch's end) finished; the first one of the process beats at once."""
        first = not self._trained
        self._trained = True
        return self._send({'phase': 'Training', 'epoch': epoch, 'epochs': epochs, 'step': step, 'steps': steps,
                           'loss': round(float(loss), 6), 'samplesPerSecond': round(float(samples_per_second), 3)},
                          force or first)

    def activity(self, phase: str, *, epochs: int, done: int | None = None, total: int | None = None,
                 epoch: int = 0, step: int = 0, steps: int = 0, detail: str | None = None) -> bool:
        """Progress outside the training steps (Starting, PreparingData, Validating, Checkpointing):
        called on real progress (an item cached, a batch validated), never from a timer. Entering
        a phase that can take long, or a new stage of one (``detail``: generating, caching),
        beats at once so the status shows it; otherwise at most one beat per interval, as for
        steps."""
        payload: dict[str, Any] = {'phase': phase, 'epoch': epoch, 'epochs': epochs, 'step': step, 'steps': steps}
        if done is not None:
            payload.update(done=done, total=total)
        if detail:
            payload['detail'] = detail
        return self._send(payload, (phase, detail) != self._stage and phase in FORCED_PHASES)

    def _send(self, fields: dict[str, Any], force: bool) -> bool:
        now = self._clock()
        if not force and self._last is not None and now - self._last < self._interval:
            return False
        self._stage = (fields['phase'], fields.get('detail'))
        payload = {**fields, **self._quality, 'worldSize': self._world_size,
                   'time': self._wall_clock().astimezone(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}
        self._last = now  # a failed beat also waits an interval: an API outage is not hammered every step
        try:
            self._sender(payload)
        except Exception as error:  # the API being away must never stop training
            self.failed += 1
            log.warning('heartbeat failed (will retry at the next beat): %s', error)
            return False
        self.sent += 1
        return True


def send_starting(sender: Sender, epochs: int, now: datetime.datetime, world_size: int = 1) -> None:
    """The first beat, as soon as the process can send one (before torch and MONAI are
    imported): the run shows the trainer started and its startup clock stops. Never raises."""
    Heartbeat(sender, 0.0, time.monotonic, lambda: now, world_size=world_size).activity(
        'Starting', epochs=epochs, detail='importing torch and MONAI')
