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
# What the trainer is doing; every phase beats on real progress (an item cached, a batch
# validated), so silence in any phase is a hang. Older trainers send no phase: Training.
PHASES = ('Starting', 'PreparingData', 'Training', 'Validating', 'Checkpointing')
# Set-up (imports, joining the process group, the model): judged against
# startupTimeoutSeconds, since it has no steps to count and its length depends on the image
# and the cluster, not on the run's progress. Every other phase is judged against
# progressTimeoutSeconds.
SETUP_PHASES = frozenset({'Starting'})
# Fields a phase beat may leave out; written as null so a merge patch of status.progress
# removes what an earlier beat wrote (a PreparingData 340/1000 must not outlive its phase).
_PHASE_FIELDS = ('phase', 'activity', 'detail', 'done', 'total')


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
    phase: str | None = None        # one of PHASES; None from older trainers (Training)
    done: int | None = None         # items or batches done in this phase (PreparingData, Validating)
    total: int | None = None
    detail: str | None = None       # what the phase is at, e.g. "caching", "waiting for rank 1"
    dice: float | None = None       # the last validation's mean Dice (0..1); absent before the first
    best_dice: float | None = None  # the best validation's mean Dice so far, and its epoch
    best_epoch: int | None = None

    @property
    def percent(self) -> int:
        if self.epoch < 1 or self.steps < 1:
            return 0
        done = (self.epoch - 1) * self.steps + self.step
        return max(0, min(100, int(100 * done / (self.epochs * self.steps))))

    @property
    def training_position(self) -> bool:
        """Whether the beat says where training is (an epoch): set-up and data preparation do
        not, and leave the last known position (a resumed attempt's) in the status."""
        return self.epoch >= 1

    @property
    def activity(self) -> str:
        """The printer column: ``Training``, ``PreparingData 340/1000 (caching)``, ``Validating 3/10``."""
        phase = self.phase or 'Training'
        if self.done is not None and self.total:
            phase = f'{phase} {self.done}/{self.total}'
        return f'{phase} ({self.detail})' if self.detail else phase

    def to_status(self, observed_at: datetime.datetime) -> dict[str, Any]:
        """The status.progress merge patch: every phase field is written (null when absent)."""
        status: dict[str, Any] = {'time': self.time, 'lastProgressTime': format_time(observed_at)}
        if self.training_position:
            status.update(epoch=self.epoch, epochs=self.epochs, step=self.step, steps=self.steps,
                          percent=self.percent)
        else:
            status['epochs'] = self.epochs
        if self.loss is not None:
            status['loss'] = round(self.loss, 6)
        if self.samples_per_second is not None:
            status['samplesPerSecond'] = round(self.samples_per_second, 3)
        if self.world_size is not None:
            status['worldSize'] = self.world_size
        if self.dice is not None:   # how good the model is; kept from beat to beat until the next validation
            status['dice'] = round(self.dice, 4)
        if self.best_dice is not None:
            status.update(bestDice=round(self.best_dice, 4), bestEpoch=self.best_epoch)
        status.update({key: self._phase_field(key) for key in _PHASE_FIELDS})
        return status

    def _phase_field(self, key: str) -> Any:
        if self.phase is None:   # an older trainer: no phase fields at all
            return None
        return self.activity if key == 'activity' else getattr(self, key)

    def same_beat(self, progress: dict[str, Any]) -> bool:
        """Whether status.progress already mirrors this heartbeat (so no write is needed)."""
        position = (('epoch', self.epoch), ('step', self.step), ('steps', self.steps)) \
            if self.training_position else ()
        quality = (('dice', round(self.dice, 4)),) if self.dice is not None else ()
        return all(progress.get(key) == value for key, value in (
            *position, ('epochs', self.epochs), ('time', self.time), *quality,
            *((key, self._phase_field(key)) for key in _PHASE_FIELDS)))

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


def _fraction(payload: dict[str, Any], key: str) -> float | None:
    """A score between 0 and 1 (a Dice), or None when the beat has none."""
    value = _number(payload, key)
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f'"{key}" must be between 0 and 1, got {value!r}')
    return value


def _detail(payload: dict[str, Any]) -> str | None:
    value = payload.get('detail')
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f'"detail" must be a string, got {value!r}')
    return value[:120]   # shown in a message: an annotation's long text stays out of the status


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
    phase = payload.get('phase')
    if phase is not None and phase not in PHASES:
        return f'the {PROGRESS_ANNOTATION} annotation is malformed: "phase" must be one of {", ".join(PHASES)}, ' \
               f'got {phase!r}'
    training = phase in (None, 'Training')   # before training starts there is no epoch or step yet
    try:
        beat = Heartbeat(
            epoch=_count(payload, 'epoch', 1 if training else 0), epochs=_count(payload, 'epochs', 1),
            step=_count(payload, 'step', 0), steps=_count(payload, 'steps', 1 if training else 0),
            loss=_number(payload, 'loss'), samples_per_second=_number(payload, 'samplesPerSecond'),
            time=str(payload.get('time', '')),
            world_size=_count(payload, 'worldSize', 1) if 'worldSize' in payload else None,
            phase=phase,
            done=_count(payload, 'done', 0) if payload.get('done') is not None else None,
            total=_count(payload, 'total', 0) if payload.get('total') is not None else None,
            detail=_detail(payload),
            dice=_fraction(payload, 'dice'),
            best_dice=_fraction(payload, 'bestDice'),
            best_epoch=_count(payload, 'bestEpoch', 1) if payload.get('bestDice') is not None else None,
        )
    except ValueError as error:
        return f'the {PROGRESS_ANNOTATION} annotation is malformed: {error}'
    if beat.epoch > beat.epochs or beat.step > beat.steps:
        return (f'the {PROGRESS_ANNOTATION} annotation is inconsistent: epoch {beat.epoch}/{beat.epochs},'
                f' step {beat.step}/{beat.steps}')
    return beat
