"""The run's state machine: from what was observed to what should be done, as data.

``reconcile`` is level-triggered: given the stored run, its current pod (as observed) and the
time, it returns a Plan (children to create, a pod to delete, one status merge-patch, Events
and log lines). Applying a Plan and reconciling again yields an empty Plan, which is what
makes the handlers idempotent and lets a periodic sweep call the same function.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Mapping
from typing import Any

from trainguard.domain import builders
from trainguard.domain.gang import Gang, GangSummary, PodAbsence, PodView, summarize
from trainguard.domain.heartbeat import PROGRESS_ANNOTATION, Heartbeat, format_time, parse_heartbeat
from trainguard.domain.observer import UNLIMITED_VIEW, View, hold_until
from trainguard.domain.pods import PodState
from trainguard.domain.policy import CpuLimits, effective_device, plan_rewrite
from trainguard.domain.retry import HANG_REASONS, adapt_for_retry
from trainguard.domain.spec import Hyperparameters, RunSpec, SpecError, parse_hyperparameters, parse_spec
from trainguard.domain.stall import Stalled, active_seconds, judge_gang_start, judge_stall
from trainguard.domain.stallreport import STALL_ANNOTATION, parse_stall_report
from trainguard.domain.template import with_run_priority

TERMINAL_PHASES = frozenset({'Succeeded', 'Failed'})

HANG_ANNOTATION = 'trainguard.io/simulate-hang-after-steps'
# Demo/test switch: hang after N steps only in an attempt that has DataLoader workers (the
# incident's cause), so a retry that learned (numWorkers 0) runs through.
HANG_WITH_WORKERS_ANNOTATION = 'trainguard.io/simulate-hang-with-workers-after-steps'


__all__ = ['Gang', 'Plan', 'PodAbsence', 'PodView', 'Settings', 'reconcile']


@dataclasses.dataclass(frozen=True)
class Settings:
    """The operator configuration the state machine needs."""

    limits: CpuLimits = dataclasses.field(default_factory=CpuLimits)
    pod: builders.PodSettings = dataclasses.field(
        default_factory=lambda: builders.PodSettings(image='ghcr.io/trainguard/trainer:0.1.0'))
    # A new run's first status is written once its pod is seen (Running, or with something to
    # report), or this long after the operator first saw the run: a pod that starts promptly
    # costs one status write, not two (Pending, then Running). 0: write at once.
    first_status_grace_seconds: float = 5.0

    def heartbeat_seconds(self, spec: RunSpec) -> int:
        """Beat at least three times per progress timeout, so one late beat is not a stall."""
        return max(1, min(self.pod.heartbeat_seconds, spec.progress_timeout_seconds // 3))


@dataclasses.dataclass(frozen=True)
class Event:
    type: str      # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass
class Plan:
    spec_patch: dict[str, Any] | None = None
    # Created in this order. A child with no ownerReference is shared by the namespace (the
    # trainer identity): the runtime may skip it once it knows it exists.
    children: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    delete_pods: list[str] = dataclasses.field(default_factory=list)   # at once (grace 0): hung or failed
    stop_pods: list[str] = dataclasses.field(default_factory=list)     # gracefully: the trainer saves first
    status_patch: dict[str, Any] | None = None
    events: list[Event] = dataclasses.field(default_factory=list)
    logs: list[str] = dataclasses.field(default_factory=list)
    heartbeat_problem: str | None = None
    stalled: str | None = None           # StartupTimeout | ProgressTimeout when this plan stops a hung attempt
    disrupted: str | None = None         # the disruption's reason when this plan records one
    stall_class: str | None = None       # the stall report's class (DataLoaderWorkers, Collective, ...) if any
    started_attempt: str | None = None   # why this plan starts an attempt: PodCreated, Retrying, Resumed, Disrupted
    retried: str | None = None           # the reason of the failed attempt this plan retries
    held: str | None = None              # why a stalled attempt is not stopped now (mass silence): Stalled=Unknown

    @property
    def empty(self) -> bool:
        return not (self.spec_patch or self.children or self.delete_pods or self.stop_pods or self.status_patch
                    or self.events)


def reconcile(run: Mapping[str, Any], pod: PodView | Gang, now: datetime.datetime, settings: Settings, *,
              first_seen: datetime.datetime | None = None, view: View = UNLIMITED_VIEW) -> Plan:
    """``pod``: the current attempt's pods in rank order (a Gang), or one pod's view.

    ``first_seen``: when this operator process first saw the run (its own clock); a run seen
    less than ``settings.first_status_grace_seconds`` ago may wait for its pod before its first
    status write (the sweep writes it once the grace is over).
    Unknown (e.g. after a restart): the status is written at once, as it always was.

    ``view``: what the operator could observe of the API (trainguard.domain.observer): a stall
    is not acted on while the view is lost, within a heartbeat interval plus a margin of the
    view's start (process start, takeover, an outage's end), or while most runs went silent
    at once (then ``Stalled=Unknown``).
    """
    status: dict[str, Any] = dict(run.get('status') or {})
    if status.get('phase') in TERMINAL_PHASES:
        return Plan()  # terminal: no more pods, no more checks
    metadata = run.get('metadata') or {}
    ref = builders.RunRef(metadata.get('name', ''), metadata.get('namespace', ''), metadata.get('uid', ''))
    plan = Plan()
    target: dict[str, Any] = {'observedGeneration': metadata.get('generation', 1)}

    try:
        spec = parse_spec(run.get('spec') or {})
    except SpecError as error:
        _finish(target, status, 'Failed', 'InvalidSpec', f'the spec is invalid: {error}', now)
        return _conclude(plan, status, target, now)

    queue = (metadata.get('labels') or {}).get(builders.QUEUE_LABEL, '')
    if queue and not spec.queue_name:   # the run's own Kueue label names the queue too
        spec = dataclasses.replace(spec, queue_name=queue)
    spec = dataclasses.replace(spec, template=with_run_priority(spec.template, metadata.get('labels') or {}))
    annotations = metadata.get('annotations') or {}
    rewrite = plan_rewrite(spec, (run.get('spec') or {}).get('hyperparameters') or {}, annotations, settings.limits)
    plan.spec_patch = rewrite.spec_patch
    if plan.spec_patch and 'spec' in plan.spec_patch:
        # The rewrite bumps metadata.generation by one; report the generation it produces, so
        # the status is not patched a second time only to catch up with our own spec write.
        target['observedGeneration'] += 1
    adjustments = [adjustment.to_api() for adjustment in rewrite.adjustments]
    recorded = status.get('adjustments') or []
    retries = [entry for entry in recorded if 'attempt' in entry]  # kept: history of adapted retries
    if adjustments and [entry for entry in recorded if 'attempt' not in entry] != adjustments:
        target['adjustments'] = adjustments + retries
        plan.logs += [adjustment.log_line() for adjustment in rewrite.adjustments]
        plan.events.append(Event('Normal', 'CPUOptimized', '; '.join(plan.logs)))
    target['device'] = effective_device(spec)
    hp = _attempt_hyperparameters(status, rewrite.effective)

    attempts = int(status.get('attempts') or 0)
    in_grace = attempts == 0 and first_seen is not None and \
        0 <= (now - first_seen).total_seconds() < settings.first_status_grace_seconds
    if attempts == 0 and not _observed(pod) and spec.suspend:
        target.update(phase='Suspended', reason='Suspended', activeSince=None,
                      message='created suspended: no pod starts until spec.suspend is false')
        return _conclude(plan, status, target, now)
    if attempts == 0 and not _observed(pod):
        _activate(target, status, now)
        _start_attempt(plan, target, ref, spec, hp, 1, settings, annotations, now, 'PodCreated',
                       _created(ref, spec, 1))
        if in_grace:  # children only; the first status waits for the pod (settings.first_status_grace_seconds)
            plan.events, plan.logs = [], []
            return plan
        return _conclude(plan, status, target, now)
    if attempts == 0:  # the first attempt's pods exist, its status was not written yet: adopt it
        attempts = 1
        _activate(target, status, now)
        target.update(attempts=1, podName=builders.attempt_pod_names(ref.name, 1, spec.num_nodes)[0],
                      phase='Pending', reason='PodCreated', message=_created(ref, spec, 1))
        if spec.num_nodes > 1:
            target['attemptCreationTime'] = metadata.get('creationTimestamp') or format_time(now)

    current_pod = target.get('podName') or status.get('podName') or builders.pod_name(ref.name, attempts)
    gang = pod if isinstance(pod, Gang) else Gang(((current_pod, pod),))
    summary = summarize(gang)
    target['nodes'] = summary.nodes
    if in_grace and isinstance(summary.state, PodState) and summary.state.phase == 'Pending' \
            and summary.state.reason == 'PodPending':
        return Plan()  # nothing worth a write yet: the pod is on its way
    where = f'pod {current_pod}' if summary.total == 1 else f'{summary.total} pods ({current_pod} is rank 0)'
    attempt = _Attempt(plan, target, status, ref, spec, hp, attempts, settings, annotations, now, summary,
                       current_pod, where, parse_heartbeat(annotations.get(PROGRESS_ANNOTATION)), view)
    for situation in SITUATIONS:
        if situation(attempt):
            break
    return _conclude(plan, status, target, now)


@dataclasses.dataclass
class _Attempt:
    """The current attempt as observed, and the plan and status being built for it."""

    plan: Plan
    target: dict[str, Any]
    status: Mapping[str, Any]
    ref: builders.RunRef
    spec: RunSpec
    hp: Hyperparameters
    number: int
    settings: Settings
    annotations: Mapping[str, str]
    now: datetime.datetime
    summary: GangSummary
    pod_name: str          # rank 0's
    where: str             # "pod x" or "2 pods (x is rank 0)", for messages
    beat: Heartbeat | str | None
    view: View

    @property
    def state(self) -> PodView:
        return self.summary.state

    @property
    def phase(self) -> str | None:
        return self.target.get('phase', self.status.get('phase'))

    def fail(self, reason: str, message: str) -> None:
        """End the attempt: retried within backoffLimit, else the run fails."""
        _fail_attempt(self.plan, self.target, self.ref, self.spec, self.hp, self.number, self.settings,
                      self.annotations, reason, message, self.now, self.status)


# One function per situation of a started attempt, in order; each returns True when it
# concluded the reconcile (no later situation applies). A new situation is one more entry.

def _pods_gone(attempt: _Attempt) -> bool:
    if attempt.state is not PodAbsence.GONE:
        return False
    attempt.fail('PodDeleted', f'trainer pod {attempt.pod_name} was deleted')
    return True


def _succeeded(attempt: _Attempt) -> bool:
    if not (isinstance(attempt.state, PodState) and attempt.state.phase == 'Succeeded'):
        return False
    # The last beat (epoch end) and the pod's exit can arrive together: mirror it too.
    _mirror(attempt.target, attempt.status, attempt.beat, attempt.now)
    _finish(attempt.target, attempt.status, 'Succeeded', 'Succeeded', f'training finished in {attempt.where}',
            attempt.now, attempt.spec)
    return True


def _failed(attempt: _Attempt) -> bool:
    state = attempt.state
    if not (isinstance(state, PodState) and state.phase == 'Failed'):
        return False
    attempt.plan.delete_pods += attempt.summary.live  # never a half-gang left holding nodes
    attempt.fail(state.reason, state.message)
    return True


def _starting_or_running(attempt: _Attempt) -> bool:
    """Phase and reason from the pods; a gang not fully running in time is stopped."""
    state, target, status = attempt.state, attempt.target, attempt.status
    if not isinstance(state, PodState):
        return False
    if status.get('phase') == 'Queued':   # admitted: the clocks run from now
        _activate(target, status, attempt.now)
        if attempt.spec.num_nodes > 1:
            target['attemptCreationTime'] = format_time(attempt.now)
    if state.phase == 'Running':
        target.update(phase='Running', reason='Training', message=f'training in {attempt.where}')
        if not status.get('attemptStartTime'):
            target['attemptStartTime'] = format_time(attempt.now)
        if not status.get('startTime'):
            target['startTime'] = format_time(attempt.now)
        return False
    if state.reason != 'PodPending' or attempt.phase != 'Pending':
        # A plain "pending" says less than PodCreated or Retrying, so it does not replace them.
        target.update(phase='Pending', reason=state.reason, message=state.message)
    verdict = judge_gang_start({**status, **target}, attempt.now, startup_timeout=attempt.spec.startup_timeout_seconds)
    if not isinstance(verdict, Stalled):
        return False
    attempt.plan.stalled = verdict.reason  # an unschedulable member: free the nodes the others hold
    attempt.plan.delete_pods += attempt.summary.live
    attempt.fail(verdict.reason, f'{verdict.message}; {state.message}')
    return True


def _heartbeat(attempt: _Attempt) -> bool:
    """Mirror a new beat while running; a malformed one is reported, never applied."""
    if isinstance(attempt.beat, str):
        attempt.plan.heartbeat_problem = attempt.beat
    elif attempt.phase == 'Running':
        _mirror(attempt.target, attempt.status, attempt.beat, attempt.now)
    return False


def _stalled(attempt: _Attempt) -> bool:
    """A running attempt silent past its timeout: every rank's pod deleted, retried or failed."""
    if attempt.phase != 'Running':
        return False
    verdict = judge_stall({**attempt.status, **attempt.target}, attempt.now,
                          progress_timeout=attempt.spec.progress_timeout_seconds,
                          startup_timeout=attempt.spec.startup_timeout_seconds)
    if not isinstance(verdict, Stalled):
        return False
    if hold_until(attempt.view, attempt.now, attempt.settings.heartbeat_seconds(attempt.spec),
                  _silent_since(verdict, attempt.now)) is not None:
        return True   # silence the operator could not observe is not held against the run
    if attempt.view.mass_silence:
        attempt.plan.held = attempt.view.mass_silence
        return True
    attempt.plan.stalled = verdict.reason
    attempt.plan.delete_pods += attempt.summary.live  # the hung processes die with their pods, every rank's
    message = verdict.message
    report = parse_stall_report(attempt.annotations.get(STALL_ANNOTATION), attempt.number)
    if report is not None:  # where it hung, from the trainer's watchdog
        attempt.plan.stall_class = report.kind
        message = f'{message}; {report.summary}'
        attempt.target['stallReport'] = report.to_status()
    attempt.fail(verdict.reason, message)
    return True


def _suspended(attempt: _Attempt) -> bool:
    """spec.suspend: every pod stopped gracefully (they save), no timer runs, nothing is counted."""
    if not attempt.spec.suspend:
        return False
    target, status = attempt.target, attempt.status
    attempt.plan.stop_pods += attempt.summary.to_stop
    _deactivate(target, status, attempt.now)
    live = len(attempt.summary.live)
    target.update(phase='Suspended', reason='Suspended',
                  message=f'suspended: stopping {live} trainer pod(s), each saves a checkpoint first' if live
                  else 'suspended: no trainer pod runs; set spec.suspend to false to resume')
    return True


def _resumed(attempt: _Attempt) -> bool:
    """Out of suspension: once the last attempt's pods are gone, a new attempt resumes from its checkpoint."""
    if attempt.phase != 'Suspended':
        return False
    if attempt.summary.live:
        attempt.plan.stop_pods += attempt.summary.to_stop
        attempt.target.update(reason='Resuming', message='resuming once the suspended attempt\'s pods have stopped')
        return True
    _activate(attempt.target, attempt.status, attempt.now)
    number = attempt.number + 1
    _start_attempt(attempt.plan, attempt.target, attempt.ref, attempt.spec, attempt.hp, number, attempt.settings,
                   attempt.annotations, attempt.now, 'Resumed',
                   f'resumed: started attempt {number}, continuing from the last checkpoint')
    return True


def _queued(attempt: _Attempt) -> bool:
    """Pods held by a scheduling gate (Kueue's, until the queue admits the workload): the run
    waits in Queued with no startup clock and no deadline running."""
    summary = attempt.summary
    if not summary.gated or summary.disruption is not None:
        return False
    target = attempt.target
    queue = f'queue {attempt.spec.queue_name}' if attempt.spec.queue_name else 'no queue named'
    target.update(phase='Queued', reason='Queued',
                  message=f'waiting for admission ({queue}): {summary.gated}/{summary.total} trainer pod(s) held by '
                          f'scheduling gate {", ".join(summary.gates)}',
                  attemptCreationTime=None)   # a gang's startup clock starts once it is admitted
    _deactivate(target, attempt.status, attempt.now)
    return True


def _past_deadline(attempt: _Attempt) -> bool:
    """spec.activeDeadlineSeconds: active time (pending included, suspended excluded) is up."""
    deadline = attempt.spec.active_deadline_seconds
    if deadline is None:
        return False
    active = active_seconds({**attempt.status, **attempt.target}, attempt.now)
    if active <= deadline:
        return False
    attempt.plan.stop_pods += attempt.summary.to_stop
    _finish(attempt.target, attempt.status, 'Failed', 'DeadlineExceeded',
            f'active for {active}s, past activeDeadlineSeconds {deadline}; its pods were stopped', attempt.now,
            attempt.spec)
    return True


def _disrupted(attempt: _Attempt) -> bool:
    """The cluster took a pod (drain, preemption, eviction, lost node): not the training's fault.

    Recorded once per attempt; the other members are stopped gracefully (they save at the
    same step); once every pod of the attempt is gone, a new attempt resumes with the same
    settings, counted against maxDisruptions, never against backoffLimit.
    """
    target, status, plan = attempt.target, attempt.status, attempt.plan
    history = list(target.get('disruptionHistory', status.get('disruptionHistory')) or [])
    recorded = bool(history) and history[-1].get('attempt') == attempt.number
    disruption = attempt.summary.disruption
    if disruption is None and not (recorded and attempt.state is PodAbsence.GONE):
        return False   # (recorded and gone: the pods went while the operator was away)
    count = int(target.get('disruptions', status.get('disruptions')) or 0)
    if disruption is not None and not recorded:
        count += 1
        history.append({'attempt': attempt.number, 'reason': disruption.reason, 'message': disruption.message,
                        'time': format_time(attempt.now)})
        target.update(disruptions=count, disruptionHistory=history[-MAX_DISRUPTION_HISTORY:])
        plan.disrupted = disruption.reason
        plan.events.append(Event('Warning', 'Disrupted',
                                 f'attempt {attempt.number}: {disruption.reason}: {disruption.message}; not a '
                                 f'failure ({count} of maxDisruptions {attempt.spec.max_disruptions})'))
    last = history[-1]
    plan.stop_pods += attempt.summary.to_stop   # the rest of the gang saves at the same step and goes
    if attempt.summary.live:
        target.update(reason='Disrupted', message=f'attempt {attempt.number} was disrupted ({last["reason"]}): '
                                                  f'waiting for {len(attempt.summary.live)} pod(s) to stop and save')
        return True
    if count > attempt.spec.max_disruptions:
        _finish(target, status, 'Failed', 'TooManyDisruptions',
                f'{count} attempts were disrupted (maxDisruptions {attempt.spec.max_disruptions}); the last: '
                f'{last["reason"]}: {last["message"]}', attempt.now, attempt.spec)
        return True
    number = attempt.number + 1
    _start_attempt(plan, target, attempt.ref, attempt.spec, attempt.hp, number, attempt.settings,
                   attempt.annotations, attempt.now, 'Disrupted',
                   f'attempt {attempt.number} was disrupted ({last["reason"]}); started attempt {number}, '
                   'resuming from the last checkpoint')
    return True


SITUATIONS: tuple[Callable[[_Attempt], bool], ...] = (
    _suspended, _resumed, _queued, _past_deadline, _disrupted, _pods_gone, _succeeded, _failed,
    _starting_or_running, _heartbeat, _stalled)
MAX_DISRUPTION_HISTORY = 20


def _activate(target: dict[str, Any], status: Mapping[str, Any], now: datetime.datetime) -> None:
    """An active stretch begins (a new run, a resume): the deadline clock runs from here."""
    if not status.get('activeSince'):
        target['activeSince'] = format_time(now)


def _deactivate(target: dict[str, Any], status: Mapping[str, Any], now: datetime.datetime) -> None:
    """The active stretch ends (suspended, finished): its seconds are added up, the clock stops."""
    if status.get('activeSince'):
        target['activeSeconds'] = active_seconds(status, now)
        target['activeSince'] = None


def _observed(pod: PodView | Gang) -> bool:
    """Whether any pod of the attempt was seen (on the watch, or confirmed gone)."""
    if isinstance(pod, Gang):
        return any(view is not PodAbsence.UNKNOWN for _, view in pod.members)
    return pod is not PodAbsence.UNKNOWN


def _mirror(target: dict[str, Any], status: Mapping[str, Any], beat: Heartbeat | str | None,
            now: datetime.datetime) -> None:
    """Copy a new heartbeat into the status, stamped with the operator's own clock."""
    if isinstance(beat, Heartbeat) and not beat.same_beat(status.get('progress') or {}):
        target['progress'] = beat.to_status(now)
        if beat.training_position:
            target['epoch'] = f'{beat.epoch}/{beat.epochs}'


def _created(ref: builders.RunRef, spec: RunSpec, attempt: int) -> str:
    names = builders.attempt_pod_names(ref.name, attempt, spec.num_nodes)
    if len(names) == 1:
        return f'created trainer pod {names[0]}'
    return f'created {len(names)} trainer pods {names[0]} .. {names[-1]} and Service {builders.service_name(ref.name)}'


def _start_attempt(plan: Plan, target: dict[str, Any], ref: builders.RunRef, spec: RunSpec,
                   hp: Hyperparameters, attempt: int, settings: Settings, annotations: Mapping[str, str],
                   now: datetime.datetime, reason: str, message: str) -> None:
    pod_settings = dataclasses.replace(settings.pod, heartbeat_seconds=settings.heartbeat_seconds(spec))
    plan.started_attempt = reason
    hang = _hang_switch(annotations, hp)
    # The pod needs its ServiceAccount at admission; the Role and binding only for the
    # trainer's first beat, which retries until they exist: they follow the pods, off the
    # path to them. The namespace's shared identity has no owner: the runtime creates it
    # once per namespace and skips it afterwards (Plan.children).
    if settings.pod.trainer_identity == builders.NAMESPACE_IDENTITY:
        plan.children.append(builders.build_namespace_service_account(ref.namespace))
        identity_after = [builders.build_namespace_role(ref.namespace),
                          builders.build_namespace_role_binding(ref.namespace)]
    else:
        plan.children.append(builders.build_service_account(ref))
        identity_after = [builders.build_role(ref), builders.build_role_binding(ref)]
    if spec.num_nodes > 1:
        plan.children.append(builders.build_service(ref))
        target['attemptCreationTime'] = format_time(now)  # the gang's startup deadline counts from here
    plan.children += [builders.build_pod(ref, spec, hp, attempt, pod_settings, hang, rank)
                      for rank in range(spec.num_nodes)]
    plan.children += identity_after
    target.update(phase='Pending', reason=reason, message=message, attempts=attempt,
                  podName=builders.attempt_pod_names(ref.name, attempt, spec.num_nodes)[0], attemptStartTime=None,
                  nodes=f'0/{spec.num_nodes}')


def failed_attempts(status: Mapping[str, Any]) -> int:
    """Attempts that failed by the training's fault (not disrupted, not resumed): the backoffLimit budget."""
    recorded = status.get('failedAttempts')
    if isinstance(recorded, int):
        return recorded
    # A status from before the field: every attempt but the current one was a failure's retry.
    return max(0, int(status.get('attempts') or 1) - 1 - int(status.get('disruptions') or 0))


def _fail_attempt(plan: Plan, target: dict[str, Any], ref: builders.RunRef, spec: RunSpec, hp: Hyperparameters,
                  attempts: int, settings: Settings, annotations: Mapping[str, str],
                  reason: str, message: str, now: datetime.datetime, status: Mapping[str, Any]) -> None:
    failed = failed_attempts({**status, **target}) + 1
    target['failedAttempts'] = failed
    if failed <= spec.backoff_limit and reason not in NOT_RETRIED:
        plan.retried = reason
        plan.events.append(Event('Warning', reason, f'attempt {attempts}: {message}'))
        hp, changes = adapt_for_retry(hp, reason, attempts + 1, spec.retry_policy)
        if changes:
            lines = [change.log_line() for change in changes]
            plan.logs += lines
            plan.events.append(Event('Normal', 'RetryAdjusted', '; '.join(lines)))
            target['attemptHyperparameters'] = hp.to_api()
            target['adjustments'] = [*target.get('adjustments', status.get('adjustments') or []),
                                     *(change.to_api() for change in changes)]
        _start_attempt(plan, target, ref, spec, hp, attempts + 1, settings, annotations, now, 'Retrying',
                       f'attempt {attempts} failed ({reason}: {message}); started attempt {attempts + 1}'
                       f' (retry {failed} of {spec.backoff_limit})')
    else:
        suffix = f' after {attempts} attempts' if attempts > 1 else ''
        if reason in HANG_REASONS:  # `kubectl describe` shows why it stopped
            plan.events.append(Event('Warning', reason, f'attempt {attempts}: {message}'))
        _finish(target, status, 'Failed', reason, message + suffix, now, spec)


def silent_past_grace(run: Mapping[str, Any], view: View, now: datetime.datetime, settings: Settings) -> bool:
    """A running run silent past its timeout, and past the grace its operator's view gives it:
    what the mass-silence rule counts (trainguard.domain.observer)."""
    status = run.get('status') or {}
    if status.get('phase') != 'Running':
        return False
    try:
        spec = parse_spec(run.get('spec') or {})
    except SpecError:
        return False
    verdict = judge_stall(status, now, progress_timeout=spec.progress_timeout_seconds,
                          startup_timeout=spec.startup_timeout_seconds)
    return isinstance(verdict, Stalled) and hold_until(view, now, settings.heartbeat_seconds(spec),
                                                        _silent_since(verdict, now)) is None


def _silent_since(verdict: Stalled, now: datetime.datetime) -> datetime.datetime:
    """When the silence began (a second early: silent_seconds is rounded down, and an early
    start errs toward the grace)."""
    return now - datetime.timedelta(seconds=verdict.silent_seconds + 1)


# Failures a new attempt cannot fix: the same image on the same kind of node fails the same way.
NOT_RETRIED = frozenset({'GPUUnavailable', 'InvalidDataset'})


def _finish(target: dict[str, Any], status: Mapping[str, Any], phase: str, reason: str, message: str,
            now: datetime.datetime, spec: RunSpec | None = None) -> None:
    """A terminal phase: nothing of the run holds a node, and its active-time clock stops."""
    target.update(phase=phase, reason=reason, message=message, completionTime=format_time(now))
    if spec is not None:
        target['nodes'] = f'0/{spec.num_nodes}'
    _deactivate(target, status, now)


def _hang_switch(annotations: Mapping[str, str], hp: Hyperparameters) -> int | None:
    value = annotations.get(HANG_ANNOTATION, '')
    with_workers = annotations.get(HANG_WITH_WORKERS_ANNOTATION, '')
    if not value.isdigit() and with_workers.isdigit() and hp.num_workers > 0:
        value = with_workers
    return int(value) if value.isdigit() else None


def _attempt_hyperparameters(status: Mapping[str, Any], effective: Hyperparameters) -> Hyperparameters:
    """The current attempt's settings: adapted by retries (status), else the spec's effective ones."""
    recorded = status.get('attemptHyperparameters')
    if not isinstance(recorded, Mapping):
        return effective
    try:
        return parse_hyperparameters(recorded, field='status.attemptHyperparameters')
    except SpecError:
        return effective


def conditions(phase: str, reason: str, message: str, generation: int,
               previous: list[dict[str, Any]], now: datetime.datetime, held: str | None = None) -> list[dict[str, Any]]:
    """Ready follows kstatus (True only when Succeeded), so Flux and Argo CD read health from it.
    ``held``: the run looks stalled but the operator suspects its own view: Stalled is Unknown."""
    truth = {
        'Ready': phase == 'Succeeded',
        'Progressing': phase in ('Pending', 'Running', 'Queued'),
        'Stalled': phase == 'Failed',
        'Suspended': phase == 'Suspended',   # Job's condition type, for tools that read it
    }
    before = {condition.get('type'): condition for condition in previous}
    result = []
    for kind, value in truth.items():
        text = 'True' if value else 'False'
        why, text_message = reason or phase, message
        if kind == 'Stalled' and held:
            text, why, text_message = 'Unknown', 'MassSilence', held
        old = before.get(kind) or {}
        since = old.get('lastTransitionTime') if old.get('status') == text else None
        result.append({'type': kind, 'status': text, 'reason': why, 'message': text_message,
                       'lastTransitionTime': since or format_time(now), 'observedGeneration': generation})
    return result


def _conclude(plan: Plan, status: Mapping[str, Any], target: dict[str, Any], now: datetime.datetime) -> Plan:
    """Turn the target status into a minimal merge patch, with conditions and a phase Event."""
    phase = target.get('phase', status.get('phase'))
    if phase:
        reason = target.get('reason', status.get('reason', ''))
        message = target.get('message', status.get('message', ''))
        previous = status.get('conditions') or []
        target['conditions'] = conditions(phase, reason, message, target['observedGeneration'], previous, now,
                                          plan.held)
        if plan.held and not any(condition.get('type') == 'Stalled' and condition.get('status') == 'Unknown'
                                 for condition in previous):
            plan.events.append(Event('Warning', 'MassSilence', plan.held))
        if phase != status.get('phase'):
            plan.events.append(Event('Warning' if phase == 'Failed' else 'Normal', phase, message))
    patch = {key: value for key, value in target.items() if status.get(key) != value}
    plan.status_patch = patch or None
    return plan
