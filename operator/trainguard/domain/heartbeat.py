"""The trainer's progress heartbeat: parsed tolerantly, never raising.

The trainer writes JSON into the ``trainguard.io/progress`` annotation. Anything can end up
in an annotation (a hand edit, an older trainer), so parsing returns either a Heartbeat or
a human reason, and a bad value never crashes a handler.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from typing import Any

PROGRESS_ANNOTATION = 'trainguard.io/progress'


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None
    samples_per_second: float | None
    time: str
    world_size: int | None = None   # training processes in the run; absent from older trainers

    @property
    def percent(self) -> int:
        done = (self.epoch - 1) * self.steps + self.step
        return max(0, min(100, int(100 * done / (self.epochs * self.steps))))

    def to_status(self, observed_at: datetime.datetime) -> dict[str, Any]:
        status: dict[str, Any] = {
            'epoch': self.epoch, 'epochs': self.epochs, 'step': self.step, 'steps': self.steps,
            'percent': self.percent, 'time': self.time, 'lastProgressTime': format_time(observed_at),
        }
        if self.loss is not None:
            status['loss'] = round(self.loss, 6)
        if self.samples_per_second is not None:
            status['samplesPerSecond'] = round(self.samples_per_second, 3)
        if self.world_size is not None:
            status['worldSize'] = self.world_size
        return status

    def same_beat(self, progress: dict[str, Any]) -> bool:
        """Whether status.progress already mirrors this heartbeat (so no write is needed)."""
        return all(progress.get(key) == value for key, value in (
            ('epoch', self.epoch), ('epochs', self.epochs), ('step', self.step),
            ('steps', self.steps), ('time', self.time)))

    def describe(self) -> str:
        loss = f', loss {self.loss:.2f}' if self.loss is not None else ''
        return f'epoch {self.epoch}/{self.epochs}, step {self.step}/{self.steps}{loss}'


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def parse_time(text: Any) -> datetime.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace('Z', '+00:00'))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _count(payload: dict[str, Any], key: str, minimum: int) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'"{key}" must be an integer >= {minimum}, got {value!r}')
    return value


def _number(payload: dict[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f'"{key}" must be a finite number, got {value!r}')
    return float(value)


def parse_heartbeat(text: str | None) -> Heartbeat | str | None:
    """A Heartbeat, None when there is none, or a string saying what is wrong with it."""
    if text is None or text == '':
        return None
    try:
        payload = json.loads(text)
    except (ValueError, TypeError) as error:
        return f'the {PROGRESS_ANNOTATION} annotation is not JSON ({error})'
    if not isinstance(payload, dict):
        return f'the {PROGRESS_ANNOTATION} annotation must be a JSON object, got {type(payload).__name__}'
    try:
        beat = Heartbeat(
            epoch=_count(payload, 'epoch', 1), epochs=_count(payload, 'epochs', 1),
            step=_count(payload, 'step', 0), steps=_count(payload, 'steps', 1),
            loss=_number(payload, 'loss'), samples_per_second=_number(payload, 'samplesPerSecond'),
            time=str(payload.get('time', '')),
            world_size=_count(payload, 'worldSize', 1) if 'worldSize' in payload else None,
        )
    except ValueError as error:
        return f'the {PROGRESS_ANNOTATION} annotation is malformed: {error}'
    if beat.epoch > beat.epochs or beat.step > beat.steps:
        return (f'the {PROGRESS_ANNOTATION} annotation is inconsistent: epoch {beat.epoch}/{beat.epochs},'
                f' step {beat.step}/{beat.steps}')
    return beat
