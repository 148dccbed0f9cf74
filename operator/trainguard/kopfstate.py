"""kopf storages that keep nothing, and a filter for kopf's per-event success lines.

trainguard registers only event-watching handlers (level-triggered, idempotent, their state
in ``.status``) and an admission handler: no create/update/delete handlers whose progress
kopf would have to persist, and no field diffs to compute. kopf still builds a diff-base
"essence" (a deep copy of the body) and clears its progress records on every watch event;
profiled at a 200-run burst that was a quarter of kopf's per-event CPU
(benchmarks/README.md). These no-op storages are kopf's documented extension point for
where it keeps that state; keeping none is right when no handler needs it.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf


class NoDiffBase(kopf.DiffBaseStorage):
    """No essence: nothing reads the "old" and "new" of a change."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


class NoProgress(kopf.ProgressStorage):
    """No per-handler progress: event handlers have none to resume."""

    def fetch(self, *, key: Any, body: Any) -> Any:
        return None

    def store(self, *, key: Any, record: Any, body: Any, patch: Any) -> None:
        return None

    def purge(self, *, key: Any, body: Any, patch: Any) -> None:
        return None

    def touch(self, *, body: Any, patch: Any, value: Any) -> None:
        return None

    def clear(self, *, essence: Any) -> Any:
        return essence


class QuietEventHandlers(logging.Filter):
    """Drop kopf's "Handler 'on_…_event' succeeded." line: one per watch event, thousands in a
    burst, saying nothing the run's status and Events do not say better."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ''
        return not (message.endswith(' succeeded.') and '_event' in message)
