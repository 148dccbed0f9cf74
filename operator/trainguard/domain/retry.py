"""Retries that learn: the next attempt's settings from why the last one failed.

In the incident this project comes from, the DataLoader's worker processes hung the job: a
retry with the same ``num_workers`` hangs again. Memory works the same way: an attempt
killed for memory dies again at the same batch size. So a hung attempt with workers is
retried with none, and an attempt out of memory with half the batch. Changes accumulate
across attempts and never loosen; ``spec.retryPolicy: same`` opts out. The spec is never
changed (GitOps sees no drift): the settings go to the pod and to the run's status.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from trainguard.domain.spec import Hyperparameters

HANG_REASONS = frozenset({'StartupTimeout', 'ProgressTimeout'})
MEMORY_REASONS = frozenset({'OOMKilled', 'GPUOutOfMemory'})
_SNAKE = {'numWorkers': 'num_workers', 'batchSize': 'batch_size', 'cropSize': 'crop_size'}
MIN_CROP = 16   # the trainer's smallest crop (--crop-size)


@dataclasses.dataclass(frozen=True)
class RetryAdjustment:
    field: str
    old: int
    new: int
    reason: str          # the failure that caused it, e.g. ProgressTimeout
    attempt: int         # the attempt that runs with the new value

    def to_api(self) -> dict[str, Any]:
        why = {'numWorkers': 'DataLoader workers may have hung the attempt',
               'batchSize': 'the attempt ran out of memory',
               'cropSize': 'the attempt ran out of memory with a batch of one'}[self.field]
        return {'field': self.field, 'from': self.old, 'to': self.new, 'attempt': self.attempt,
                'reason': f'{self.reason}: {why}'}

    def log_line(self) -> str:
        verb = 'Forcing' if self.field == 'numWorkers' else 'Halving'
        return (f'[RETRY_ADJUSTMENT] {verb} {_SNAKE[self.field]}={self.new} for attempt {self.attempt} '
                f'after {self.reason} (was {self.old})')


def adapt_for_retry(hp: Hyperparameters, failure: str, next_attempt: int,
                    policy: str) -> tuple[Hyperparameters, list[RetryAdjustment]]:
    """The next attempt's settings: safer where the failure points, otherwise the same."""
    if policy != 'adapt':
        return hp, []
    changes: list[RetryAdjustment] = []
    if failure in HANG_REASONS and hp.num_workers > 0:
        changes.append(RetryAdjustment('numWorkers', hp.num_workers, 0, failure, next_attempt))
        hp = dataclasses.replace(hp, num_workers=0)
    if failure in MEMORY_REASONS and hp.batch_size > 1:
        halved = hp.batch_size // 2  # >= 1, since batch_size > 1
        changes.append(RetryAdjustment('batchSize', hp.batch_size, halved, failure, next_attempt))
        hp = dataclasses.replace(hp, batch_size=halved)
    elif failure in MEMORY_REASONS and hp.crop_size >= 2 * MIN_CROP:
        # A batch of one that still does not fit: half the patch (in 3D an eighth of the voxels).
        halved = hp.crop_size // 2
        changes.append(RetryAdjustment('cropSize', hp.crop_size, halved, failure, next_attempt))
        hp = dataclasses.replace(hp, crop_size=halved)
    return hp, changes
