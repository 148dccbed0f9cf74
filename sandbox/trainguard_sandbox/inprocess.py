"""The real operator in-process, beside other asyncio work (the emulator, a pod runner, tests).

kopf.operator() assumes it owns the event loop: when it stops, it cancels every task created
after it started. Embedded in the sandbox or in pytest, those include the emulator's,
the pod runner's and pytest's own tasks. A task factory records which tasks were created
outside the operator's context, and kopf is told to leave those alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Collection, Iterator
from typing import Any

import kopf

_INSIDE_OPERATOR: contextvars.ContextVar[bool] = contextvars.ContextVar('inside_operator', default=False)


class _ForeignTasks(Collection[asyncio.Task[Any]]):
    """Tasks created outside the operator, which kopf must not cancel when it stops."""

    def __init__(self) -> None:
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        loop = asyncio.get_running_loop()
        previous = loop.get_task_factory()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            task = previous(loop, coro, **kwargs) if previous else asyncio.Task(coro, loop=loop, **kwargs)
            if not _INSIDE_OPERATOR.get():
                self._tasks.add(task)
            return task

        loop.set_task_factory(factory)
        self._tasks.update(asyncio.all_tasks(loop))

    def __contains__(self, task: object) -> bool:
        return task in self._tasks

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)


class OperatorRunner:
    """Runs the real operator (trainguard.handlers) as a task in the current event loop."""

    def __init__(self, memo: kopf.Memo, registry: kopf.OperatorRegistry | None = None) -> None:
        self.memo = memo
        self.registry = registry
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._foreign = _ForeignTasks()

    async def start(self) -> None:
        import trainguard.handlers  # noqa: F401  registers the handlers in kopf's default registry

        self._stop = asyncio.Event()
        ready = asyncio.Event()

        async def run() -> None:
            _INSIDE_OPERATOR.set(True)
            tasks = await kopf.spawn_tasks(clusterwide=True, standalone=True, stop_flag=self._stop,
                                           ready_flag=ready, memo=self.memo, registry=self.registry)
            await kopf.run_tasks(tasks, ignored=self._foreign)

        self._task = asyncio.create_task(run())
        done, _ = await asyncio.wait([self._task, asyncio.ensure_future(ready.wait())],
                                     return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            self._task.result()  # re-raise why the operator died at start-up

    async def stop(self) -> None:
        if self._task is not None and self._stop is not None:
            self._stop.set()
            done, _ = await asyncio.wait([self._task], timeout=30)
            assert done, 'the operator did not stop within 30s'
            if not self._task.cancelled() and self._task.exception() is not None:
                raise self._task.exception()
            self._task = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()
