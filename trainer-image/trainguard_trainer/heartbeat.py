"""The progress heartbeat: patched into the run's trainguard.io/progress annotation.

It is called where the trainer makes progress, in every phase (Starting, PreparingData: an
item generated or cached, Training: an optimizer step, Validating: a batch, Checkpointing),
never from a timer thread: a hung phase must stop beating, or the operator could not tell it
is hung.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
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
    """Merge-patches the run's annotation with the official client (in-cluster, else $KUBECONFIG)."""

    def __init__(self, name: str, namespace: str, annotation: str = ANNOTATION) -> None:
        import kubernetes  # imported here: local runs without a cluster never need it

        if os.environ.get('KUBERNETES_SERVICE_HOST'):
            configuration = kubernetes.client.Configuration()
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            client = kubernetes.client.ApiClient(configuration)
        else:
            client = kubernetes.config.new_client_from_config(
                config_file=os.environ.get('KUBECONFIG') or os.path.expanduser('~/.kube/config'))
        self._api = kubernetes.client.CustomObjectsApi(client)
        self._name, self._namespace, self._annotation = name, namespace, annotation

    def __call__(self, payload: dict[str, Any]) -> None:
        self._api.patch_namespaced_custom_object(
            'trainguard.io', 'v1alpha1', self._namespace, 'trainingruns', self._name,
            {'metadata': {'annotations': {self._annotation: json.dumps(payload, sort_keys=True)}}},
            _content_type='application/merge-patch+json')


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
        payload = {**fields, 'worldSize': self._world_size,
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
