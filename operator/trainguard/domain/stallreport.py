"""The trainer's stall report, as the operator uses it: untrusted, bounded, classified.

The trainer's watchdog writes a compact summary into the run's ``trainguard.io/stall-report``
annotation before the operator stops a hung attempt (trainguard_trainer/watchdog.py). It is
input from a pod: parsed tolerantly, cut to size, stripped of control characters, and never
able to break a handler. A report from another attempt is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

STALL_ANNOTATION = 'trainguard.io/stall-report'
MAX_LINE = 300
MAX_LINES = 12
MAX_TOTAL = 2048
# What classify() answers: where the main thread of a stalled trainer waits.
CLASSES = ('DataLoaderWorkers', 'Collective', 'DataRead', 'Unknown')
_CONTROL = re.compile(r'[\x00-\x1f\x7f]+')


@dataclasses.dataclass(frozen=True)
class StallReport:
    summary: str              # one line: "hung in torch/utils/data/dataloader.py:_try_get_data; ..."
    frames: tuple[str, ...]   # innermost frames of the main thread
    workers: tuple[str, ...]  # DataLoader worker states
    kind: str                 # DataLoaderWorkers | Collective | DataRead | Unknown

    def to_status(self) -> dict[str, Any]:
        return {'class': self.kind, 'summary': self.summary, 'frames': list(self.frames),
                'workers': list(self.workers)}


def _clean(value: Any) -> str:
    return _CONTROL.sub(' ', str(value)).strip()[:MAX_LINE]


def _lines(value: Any) -> tuple[str, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        return ()
    return tuple(_clean(item) for item in list(value)[:MAX_LINES] if _clean(item))


def classify(frames: Sequence[str], workers: Sequence[str], summary: str = '') -> str:
    """Where the main thread waits: by the frames it waits in (the trainer puts the frame its
    summary names first, so a DataLoader frame outside the innermost few still shows), its
    DataLoader workers, and, in a distributed run, the trainer's note that every step waits for
    all ranks (DDP's gradient all-reduce runs inside autograd, so no torch.distributed frame shows)."""
    text = ' '.join(frames).lower()
    if any('exited with' in worker for worker in workers) or 'torch/utils/data/' in text:
        return 'DataLoaderWorkers'
    # Waiting in multiprocessing's plumbing (a batch's shared-memory handles come through the
    # worker's resource sharer) while the run has DataLoader workers: a frozen worker process.
    if workers and frames and 'multiprocessing/' in frames[0].lower():
        return 'DataLoaderWorkers'
    if 'torch/distributed/' in text or 'DistributedDataParallel' in summary:
        return 'Collective'
    if any(word in text for word in ('loadimage', 'nibabel', 'pil/', ' read', ' open', 'io.py')):
        return 'DataRead'
    return 'Unknown'


def parse_stall_report(text: str | None, attempt: int) -> StallReport | None:
    """The report of this attempt, or None (absent, malformed, or from another attempt)."""
    if not text:
        return None
    if len(text) > 262144:  # the API server's limit for all annotations together
        return None
    try:
        payload = json.loads(text)
    except (ValueError, TypeError):
        return None
    if not isinstance(payload, Mapping) or payload.get('attempt') not in (attempt, 0, None):
        return None
    summary = _clean(payload.get('summary', ''))
    if not summary:
        return None
    frames, workers = _lines(payload.get('frames')), _lines(payload.get('workers'))
    while len(summary) + sum(map(len, frames + workers)) > MAX_TOTAL and (frames or workers):
        frames, workers = (frames[1:], workers) if frames else (frames, workers[:-1])
    return StallReport(summary, frames, workers, classify(frames, workers, summary))
