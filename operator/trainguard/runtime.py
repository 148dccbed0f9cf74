"""The operator's in-memory view of runs and pods, and the one place a Plan is applied.

kopf delivers watch events for runs and pods; both update this view and reconcile the
affected run. A periodic sweep reconciles every live run too, which is how stalls are
detected (one task for all runs, not a timer per run) and how a failed write is retried.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import datetime
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from trainguard.domain import observer
from trainguard.domain import reconcile as machine
from trainguard.domain.builders import RUN_LABEL, attempt_pod_names
from trainguard.domain.config import Config
from trainguard.domain.heartbeat import PROGRESS_ANNOTATION
from trainguard.domain.pods import PodState, observe_deleted_pod, observe_pod
from trainguard.domain.spec import MAX_NODES
from trainguard.domain.stall import due_for_sweep
from trainguard.domain.stallreport import STALL_ANNOTATION
from trainguard.kube import KubeApi
from trainguard.metrics import Metrics

Clock = Callable[[], datetime.datetime]
RunKey = tuple[str, str]  # (namespace, name)
# How long our own write stays authoritative when no watch event confirms it; long, because
# a busy operator can lag its watch by tens of seconds (measured at 1,000-run bursts).
PIN_SECONDS = 300.0
RESYNC_SWEEPS = 6  # a full reconcile of every live run every 6 sweeps (30 s by default)
OUTAGE_EVENT_RETRIES = (1.0, 2.0, 4.0, 8.0, 16.0)   # seconds between tries of the outage's Event
SWEEP_WORKERS = 8  # runs reconciled side by side by the sweeper
EVENT_WORKERS = 8  # runs reconciled side by side for watch events that need the API
RESYNC_WORKERS = 2  # the periodic full resync, in the background: it must not crowd out stall checks


def _num_nodes(run: Mapping[str, Any]) -> int:
    """spec.numNodes (fixed once the run exists: a CRD transition rule); 1 when absent or invalid,
    where reconcile reports the invalid spec."""
    value = (run.get('spec') or {}).get('numNodes', 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_NODES else 1


def _beats(run: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """What the trainer last wrote on its run: its heartbeat and its stall report."""
    annotations = (run.get('metadata') or {}).get('annotations') or {}
    return annotations.get(PROGRESS_ANNOTATION), annotations.get(STALL_ANNOTATION)


def system_clock() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass
class Runtime:
    config: Config
    api: KubeApi
    clock: Clock = system_clock
    runs: dict[RunKey, dict[str, Any]] = dataclasses.field(default_factory=dict)
    pods: dict[RunKey, PodState | machine.PodAbsence] = dataclasses.field(default_factory=dict)
    _pins: dict[RunKey, tuple[dict[str, Any], float]] = dataclasses.field(default_factory=dict)
    _locks: collections.defaultdict[RunKey, threading.Lock] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(threading.Lock))
    _warned: dict[RunKey, str] = dataclasses.field(default_factory=dict)
    _written: dict[RunKey, str] = dataclasses.field(default_factory=dict)  # resourceVersion of our last write
    _first_seen: dict[RunKey, datetime.datetime] = dataclasses.field(default_factory=dict)  # runs without a status
    _observed_since: dict[RunKey, datetime.datetime] = dataclasses.field(default_factory=dict)  # first event here
    # Children that must follow a run's pods (the trainer's Role and binding) and failed: retried.
    _owed: dict[RunKey, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    # Shared children (the namespace's trainer identity) this process created or found: (kind, ns, name).
    _shared_known: set[tuple[str, str, str]] = dataclasses.field(default_factory=set)
    _shared_guard: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    api_view: observer.ApiView = dataclasses.field(init=False)
    _mass_silence: str | None = dataclasses.field(default=None, init=False)
    _guard: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    metrics: Metrics = dataclasses.field(init=False)
    _sweep_executor: concurrent.futures.ThreadPoolExecutor = dataclasses.field(init=False)
    _event_executor: concurrent.futures.ThreadPoolExecutor = dataclasses.field(init=False)
    _resync_executor: concurrent.futures.ThreadPoolExecutor = dataclasses.field(init=False)
    _resync_task: asyncio.Task[Any] | None = dataclasses.field(default=None, init=False)
    _closing: threading.Event = dataclasses.field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: list(self.runs.values()), lambda: self.clock())
        # The view starts now: a run is not judged on silence from before this process could see it.
        self.api_view = observer.ApiView(since=self.clock())
        if self.api is not None:   # tests of the view alone pass none
            self.api.on_contact = self._contact
        for namespace in self.config.namespaces:   # known before any run: their series exist from the start
            self.metrics.namespace_seen(namespace)
        self._sweep_executor = concurrent.futures.ThreadPoolExecutor(SWEEP_WORKERS, thread_name_prefix='sweep')
        self._event_executor = concurrent.futures.ThreadPoolExecutor(EVENT_WORKERS, thread_name_prefix='reconcile')
        self._resync_executor = concurrent.futures.ThreadPoolExecutor(RESYNC_WORKERS, thread_name_prefix='resync')

    # -- observing ------------------------------------------------------------------------

    def observe_run(self, body: Mapping[str, Any]) -> RunKey:
        """Remember the newest run body; watch events from before our own last write are skipped.

        resourceVersions are opaque (no ordering may be assumed), and kopf may merge several
        events into one, so the event carrying our write's exact version can be skipped. But
        only the operator writes the status: an event whose status equals the status we last
        wrote is our write or newer; any other status is from before it.
        """
        key = (body['metadata']['namespace'], body['metadata']['name'])
        self.metrics.namespace_seen(key[0])
        with self._guard:
            # When this process (a restart, a new leader) first heard of the run: it is not
            # judged on silence from before that (trainguard.domain.observer).
            self._observed_since.setdefault(key, self.clock())
            if not (body.get('status') or {}).get('phase'):
                self._first_seen.setdefault(key, self.clock())
            else:
                self._first_seen.pop(key, None)
            pin = self._pins.get(key)
            if pin is not None:
                written_status, until = pin
                if (body.get('status') or {}) == written_status or time.monotonic() > until:
                    del self._pins[key]
                else:
                    return key  # an event from before our write; our write's response is newer
            self.runs[key] = dict(body)
        return key

    def forget_run(self, key: RunKey) -> None:
        with self._guard:
            run = self.runs.pop(key, None)
            self._pins.pop(key, None)
            self._warned.pop(key, None)
            self._written.pop(key, None)
            self._first_seen.pop(key, None)
            self._observed_since.pop(key, None)
            self._owed.pop(key, None)
            self._locks.pop(key, None)
        attempts = int(((run or {}).get('status') or {}).get('attempts') or 0)
        nodes = _num_nodes(run or {})
        for attempt in range(1, attempts + 1):  # its pods go with it (garbage collector)
            for name in attempt_pod_names(key[1], attempt, nodes):
                self.pods.pop((key[0], name), None)

    def observe_pod(self, event_type: str, pod: Mapping[str, Any]) -> RunKey | None:
        metadata = pod.get('metadata') or {}
        owner = next((ref['name'] for ref in metadata.get('ownerReferences') or []
                      if ref.get('kind') == 'TrainingRun'), (metadata.get('labels') or {}).get(RUN_LABEL))
        if not owner:
            return None
        pod_key = (metadata['namespace'], metadata['name'])
        if event_type == 'DELETED':   # a pod the cluster took is remembered as a disruption, not a deletion
            self.pods[pod_key] = observe_deleted_pod(pod) or machine.PodAbsence.GONE
        else:
            self.pods[pod_key] = observe_pod(pod)
        return (metadata['namespace'], owner)

    # -- deciding and acting --------------------------------------------------------------

    def reconcile(self, key: RunKey, logger: logging.Logger | logging.LoggerAdapter[Any]) -> machine.Plan | None:
        """Decide from the freshest view and apply the plan; serialized per run across threads."""
        with self._guard:  # defaultdict's insert is not atomic: two threads could get two locks
            lock = self._locks[key]
        with lock:
            run = self.runs.get(key)
            if run is None:
                return None
            view = self._pod_view(run)
            assert view is not None  # read=True: an unobserved pod is read from the API
            plan = machine.reconcile(run, view, self.clock(), self.config.settings,
                                     first_seen=self._first_seen.get(key), view=self.view_of(key))
            if plan.stalled:
                # Before stopping a run, read it: a watch that was cut (an API outage, a
                # reconnect) may not have delivered its latest beat yet, and a cache is only
                # as fresh as its watch. One GET per stall, never on the hot path.
                fresh = self.api.read_run(*key)
                if fresh is None:
                    return None
                if _beats(fresh) != _beats(run):
                    self.observe_run(fresh)
                    run = self.runs.get(key, run)
                    plan = machine.reconcile(run, view, self.clock(), self.config.settings,
                                             first_seen=self._first_seen.get(key), view=self.view_of(key))
            self._apply(key, run, plan, logger)
            return plan

    def view_of(self, key: RunKey) -> observer.View:
        """What the operator could observe of this run: its view of the API, from when it first
        heard of the run at the latest, and whether most runs went silent at once."""
        view = self.api_view.view(self._mass_silence)
        heard = self._observed_since.get(key)
        if heard is not None and view.since is not None and heard > view.since:
            view = dataclasses.replace(view, since=heard)
        return view

    def _contact(self, answered: bool) -> None:
        """Each request's outcome (KubeApi.on_contact), from any thread."""
        now = self.clock()
        with self._guard:
            if answered:
                outage = self.api_view.answered(now)
            else:
                outage = None
                if self.api_view.failed(now):
                    self.metrics.api_reachable.set(0)
                    logging.getLogger(__name__).warning(
                        'the API server is unreachable: no run is judged on silence until it answers again')
        if outage is not None:
            self._regained(outage)

    def _regained(self, outage: observer.Outage) -> None:
        self.metrics.api_reachable.set(1)
        self.metrics.api_outages.inc()
        self.metrics.api_outage_seconds.inc(outage.seconds)
        logging.getLogger(__name__).warning('%s', outage.message()[0].upper() + outage.message()[1:])
        pod, namespace = os.environ.get('POD_NAME'), os.environ.get('POD_NAMESPACE')
        if pod and namespace:   # an Event on the operator's own Pod, where `kubectl describe` shows it
            threading.Thread(target=self._report_outage, args=(namespace, pod, outage.message()),
                             name='outage-event', daemon=True).start()

    def _report_outage(self, namespace: str, pod: str, message: str) -> None:
        """Post the outage's Event, retried: a kube-apiserver that has just come back may refuse
        requests for a few seconds while its RBAC caches fill (seen on 1.36: 403 naming
        ``system:basic-user`` not found), and this Event is how a human learns of the outage."""
        for delay in (*OUTAGE_EVENT_RETRIES, None):
            if self.api.post_pod_event(namespace, pod, 'Warning', 'ApiUnreachable', message, self.clock()):
                return
            # Waits end at close(): a thread still retrying as the interpreter exits can abort it.
            if delay is not None and self._closing.wait(delay):
                return

    async def reconcile_soon(self, key: RunKey, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        """Reconcile after a watch event: on the loop when the event changes nothing (decided
        without blocking), else in a worker thread, since applying a plan calls the API."""
        if self.settled(key):
            return
        await asyncio.get_running_loop().run_in_executor(self._event_executor, self.reconcile, key, logger)

    def is_own_echo(self, body: Mapping[str, Any]) -> bool:
        """The watch event of the operator's own last write: the very object its write returned
        (same resourceVersion), which it reconciled when it wrote it. Nothing to do."""
        metadata = body.get('metadata') or {}
        version = metadata.get('resourceVersion')
        return version is not None and self._written.get((metadata.get('namespace'), metadata.get('name'))) == version

    def settled(self, key: RunKey) -> bool:
        """True when reconciling now would do nothing. Never blocks: a run whose lock is held,
        or whose pods would have to be read from the API first, is not judged here (False)."""
        with self._guard:
            lock = self._locks[key]
        if not lock.acquire(blocking=False):
            return False
        try:
            run = self.runs.get(key)
            if run is None:
                return True
            view = self._pod_view(run, read=False)
            if view is None:
                return False
            plan = machine.reconcile(run, view, self.clock(), self.config.settings,
                                     first_seen=self._first_seen.get(key), view=self.view_of(key))
            problem = plan.heartbeat_problem
            return plan.empty and not (problem and self._warned.get(key) != problem)
        finally:
            lock.release()

    def _pod_view(self, run: Mapping[str, Any], *, read: bool = True) -> machine.Gang | machine.PodAbsence | None:
        """The current attempt's pods in rank order (one for a single-node run); None when a pod
        was never observed and ``read`` is off."""
        status = run.get('status') or {}
        name = status.get('podName')
        if status.get('phase') in machine.TERMINAL_PHASES:
            return machine.PodAbsence.UNKNOWN
        namespace = run['metadata']['namespace']
        names = attempt_pod_names(run['metadata']['name'], int(status.get('attempts') or 1), _num_nodes(run))
        if not name:
            # No status yet (its first write waits for the pod): the first attempt's pods as
            # the watch has shown them, never read from the API, since they may not exist yet.
            return machine.Gang(tuple((member, self.pods.get((namespace, member), machine.PodAbsence.UNKNOWN))
                                      for member in names))
        if len(names) == 1:
            names = [name]  # the name the status recorded (runs from before gangs included)
        members = []
        for member in names:
            key = (namespace, member)
            if key not in self.pods:
                if not read:
                    return None
                # Not seen on the watch yet (e.g. just after a restart): ask once rather than guess.
                pod = self.api.read_pod(*key)
                self.pods[key] = machine.PodAbsence.GONE if pod is None else observe_pod(pod)
            members.append((member, self.pods[key]))
        return machine.Gang(tuple(members))

    def _apply(self, key: RunKey, run: Mapping[str, Any], plan: machine.Plan,
               logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        namespace, name = key
        for doomed in plan.delete_pods:
            self.api.delete_pod(namespace, doomed)
            self.pods[(namespace, doomed)] = machine.PodAbsence.GONE
        for stopping in plan.stop_pods:   # the watch shows them terminating, then gone
            self.api.delete_pod(namespace, stopping, graceful=True)
            view = self.pods.get((namespace, stopping))
            if isinstance(view, PodState):   # asked once: not again before the watch says so
                self.pods[(namespace, stopping)] = dataclasses.replace(view, terminating=True)
        if plan.spec_patch:
            self._remember(key, self.api.patch_run(namespace, name, plan.spec_patch))
        self._create_children(key, plan.children, logger)
        if plan.status_patch:
            self._remember(key, self.api.patch_run_status(namespace, name, plan.status_patch))
        self.metrics.count(namespace, plan)
        for line in plan.logs:
            logger.info(line)
        now = self.clock()
        for event in plan.events:
            self.api.post_event(run, event.type, event.reason, event.message, now)
        problem = plan.heartbeat_problem
        if problem and self._warned.get(key) != problem:
            self._warned[key] = problem
            logger.warning(problem)
            self.api.post_event(run, 'Warning', 'MalformedProgress', problem, now)

    def _create_children(self, key: RunKey, children: list[dict[str, Any]],
                         logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        """Create in the plan's order (domain.reconcile: what the pod needs at admission, the
        pods, then what only the trainer's first beat needs).

        A shared child (no owner: the namespace's trainer identity) is skipped once this
        process has created or found it, so a namespace's later runs put only their pods on
        the path. A failure on a pod, or before the first, raises: nothing is half-started and
        the next reconcile tries again. A failure after the pods leaves the rest owed: retried
        on every sweep until created, while the trainer's first beats retry meanwhile."""
        pending = self._owed.pop(key, []) + list(children)
        after_pods = len(pending) > len(children)   # owed children always follow their pods
        for index, child in enumerate(pending):
            metadata = child['metadata']
            shared = (child['kind'], metadata['namespace'], metadata['name'])
            is_shared = not metadata.get('ownerReferences')
            if is_shared and shared in self._shared_known:
                continue
            try:
                if is_shared:   # one thread creates it; runs of the same namespace started together skip it
                    with self._shared_guard:
                        if shared not in self._shared_known:
                            self.api.create_if_absent(child)
                            self._shared_known.add(shared)
                else:
                    self.api.create_if_absent(child)
            except Exception as error:
                if child['kind'] == 'Pod' or not after_pods:
                    # Perhaps a shared child went away (a deleted ServiceAccount refuses the pod):
                    # the next attempt creates the namespace's identity again.
                    with self._shared_guard:
                        self._shared_known = {known for known in self._shared_known if known[1] != key[0]}
                    raise
                self._owed[key] = [rest for rest in pending[index:] if rest['kind'] != 'Pod']
                logger.warning('could not create %s %s (%s); retried on the next sweep, and the trainer\'s first '
                               'heartbeats retry until it exists', child['kind'], metadata['name'], error)
                return
            after_pods = after_pods or child['kind'] == 'Pod'

    def _remember(self, key: RunKey, body: Mapping[str, Any] | None) -> None:
        if not body or 'metadata' not in body:
            return
        with self._guard:
            self.runs[key] = dict(body)
            self._pins[key] = (dict(body.get('status') or {}), time.monotonic() + PIN_SECONDS)
            self._written[key] = body['metadata'].get('resourceVersion', '')

    # -- sweeping -------------------------------------------------------------------------

    async def sweep_forever(self, logger: logging.Logger) -> None:
        """Re-check live runs on a fixed interval: stalls every sweep, everything on a resync.

        The deadline check is pure and runs here on the loop for every run; only runs that are
        due go to a worker thread for the full reconcile (API calls). Every RESYNC_SWEEPS-th
        sweep also reconciles every other live run, which retries writes that failed before;
        that resync runs in the background on its own workers, so with thousands of live runs
        it never delays the next sweep's stall checks (it once added 5-8 s at 1,700 runs).
        """
        loop = asyncio.get_running_loop()
        try:
            await self._sweep_loop(loop, logger)
        finally:
            if self._resync_task is not None:
                self._resync_task.cancel()
                await asyncio.gather(self._resync_task, return_exceptions=True)

    async def _sweep_loop(self, loop: asyncio.AbstractEventLoop, logger: logging.Logger) -> None:
        sweeps = 0
        while True:
            await asyncio.sleep(self.config.sweep_seconds)
            sweeps += 1
            # Can the operator hear the API at all? Requests tell it too; the probe also covers
            # a quiet spell with nothing to write. While it cannot, nothing is judged.
            if not await loop.run_in_executor(self._sweep_executor, self.api.probe):
                continue
            now = self.clock()
            grace = self.config.settings.first_status_grace_seconds
            runs = list(self.runs.items())
            self._judge_mass_silence(runs, now, logger)
            due = [key for key, run in runs
                   if key in self._owed
                   or due_for_sweep(run, now, resync=False, first_seen=self._first_seen.get(key), grace=grace)]
            if sweeps % RESYNC_SWEEPS == 0 and (self._resync_task is None or self._resync_task.done()):
                urgent = set(due)
                rest = [key for key, run in runs if key not in urgent
                        and due_for_sweep(run, now, resync=True, first_seen=self._first_seen.get(key), grace=grace)]
                self._resync_task = asyncio.create_task(self._sweep_all(loop, rest, logger, self._resync_executor))
            # Runs that went silent together are stopped together: reconciles of different runs
            # run side by side (each run has its own lock); one after another, 50 simultaneous
            # stalls took 15 s longer to act on (benchmarks/README.md).
            await self._sweep_all(loop, due, logger, self._sweep_executor)

    def _judge_mass_silence(self, runs: list[tuple[RunKey, dict[str, Any]]], now: datetime.datetime,
                            logger: logging.Logger) -> None:
        """Most running runs silent at once: the observer's problem, not theirs (domain.observer)."""
        running = [(key, run) for key, run in runs if (run.get('status') or {}).get('phase') == 'Running']
        silent = sum(1 for key, run in running
                     if machine.silent_past_grace(run, self.view_of(key), now, self.config.settings))
        message = observer.mass_silence(len(running), silent)
        if message and not self._mass_silence:
            logger.warning('%s', message)
            self.metrics.mass_silences.inc()
        elif self._mass_silence and not message:
            logger.warning('heartbeats are back: running runs are judged on their silence again')
        self.metrics.mass_silence.set(1 if message else 0)
        self._mass_silence = message

    async def _sweep_all(self, loop: asyncio.AbstractEventLoop, keys: list[RunKey], logger: logging.Logger,
                         executor: concurrent.futures.ThreadPoolExecutor) -> None:
        await asyncio.gather(*(self._sweep_one(loop, key, logger, executor) for key in keys))

    async def close(self) -> None:
        """Cancel queued reconciles and wait for those in flight: a thread left mid-request when
        the operator stops would write to an API (or a test's emulator) that is going away."""
        self._closing.set()
        for executor in (self._sweep_executor, self._event_executor, self._resync_executor):
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(executor.shutdown, wait=True, cancel_futures=True))

    async def _sweep_one(self, loop: asyncio.AbstractEventLoop, key: RunKey, logger: logging.Logger,
                         executor: concurrent.futures.ThreadPoolExecutor) -> None:
        try:  # the pool's size bounds how many runs are reconciled at once
            await loop.run_in_executor(executor, self.reconcile, key, logger)
        except Exception:  # one run's problem never stops the sweep for the others
            self.metrics.reconcile_errors.inc()
            logger.exception('reconciling %s/%s failed; will retry on the next sweep', *key)
