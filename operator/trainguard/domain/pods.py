"""What a trainer pod's state means for its run: phase, reason and a human message."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# The trainer's exit code when its dataset cannot be used (a missing file, a label image of another
# shape, a label value dataset.json does not name): checked before training; the same data fails
# the same way, so no retry (trainguard_trainer.cli).
EXIT_DATASET = 3
# The trainer's exit code when a run asks for a GPU and CUDA is not usable (trainguard_trainer.cli);
# a retry on the same node and image cannot help, so the run fails at once.
EXIT_GPU_UNAVAILABLE = 4
# ... and when CUDA ran out of memory: retried with half the batch (trainguard.domain.retry).
EXIT_GPU_OUT_OF_MEMORY = 5
# ... and when it stopped on SIGTERM after saving a checkpoint (its pod was being stopped).
EXIT_STOPPED = 6

_TRAINER_EXITS = {
    EXIT_DATASET: ('InvalidDataset', f'the trainer could not use its dataset (exit code {EXIT_DATASET})'),
    EXIT_GPU_UNAVAILABLE: ('GPUUnavailable', f'the trainer found no usable GPU (exit code {EXIT_GPU_UNAVAILABLE})'),
    EXIT_GPU_OUT_OF_MEMORY: ('GPUOutOfMemory', f'CUDA ran out of memory (exit code {EXIT_GPU_OUT_OF_MEMORY})'),
    EXIT_STOPPED: ('Stopped', f'the trainer was stopped (SIGTERM) and saved a checkpoint (exit code {EXIT_STOPPED})'),
}
# The reasons those exits give an attempt (EXIT_STOPPED's only ends an attempt being stopped).
TRAINER_EXIT_REASONS = tuple(reason for reason, _ in _TRAINER_EXITS.values())

# The cluster took the pod, the training did nothing wrong: a disruption (retried whole, not
# counted against backoffLimit). kube-apiserver and the kubelet set DisruptionTarget with one of
# these reasons (beta in 1.26, GA in 1.31); Kueue sets TerminationTarget when it preempts.
DISRUPTION_CONDITIONS = ('DisruptionTarget', 'TerminationTarget')
DISRUPTION_REASONS = {
    'PreemptionByScheduler': 'preempted by the scheduler for a higher-priority pod',
    'EvictionByEvictionAPI': 'evicted (node drain or the Eviction API)',
    'DeletionByTaintManager': 'deleted by the taint manager (a NoExecute taint on its node)',
    'DeletionByPodGC': 'deleted by pod garbage collection (its node is gone)',
    'TerminationByKubelet': 'terminated by the kubelet (node pressure or node shutdown)',
    'Evicted': 'evicted by the kubelet',
    'NodeLost': 'its node was lost',
}

WAITING_REASONS_WORTH_REPORTING = frozenset({
    'ImagePullBackOff', 'ErrImagePull', 'InvalidImageName', 'CreateContainerConfigError',
    'CreateContainerError', 'CrashLoopBackOff',
})


@dataclasses.dataclass(frozen=True)
class PodState:
    phase: str            # Pending | Running | Succeeded | Failed
    reason: str = ''
    message: str = ''
    disruption: str = ''  # why the cluster took the pod (a DISRUPTION_REASONS key, or a Kueue reason); '' if not
    terminating: bool = False  # deletion requested, the trainer has its grace period to save and exit
    gates: tuple[str, ...] = ()  # scheduling gates holding it (Kueue's kueue.x-k8s.io/admission: queued)


def disruption_of(pod: Mapping[str, Any]) -> tuple[str, str]:
    """(reason, message) when the cluster, not the training, is ending this pod; ('', '') otherwise."""
    status = pod.get('status') or {}
    for condition in status.get('conditions') or []:
        if condition.get('type') in DISRUPTION_CONDITIONS and condition.get('status') == 'True':
            reason = condition.get('reason') or condition['type']
            return reason, condition.get('message') or DISRUPTION_REASONS.get(reason, reason)
    if status.get('reason') in ('Evicted', 'NodeLost'):
        reason = status['reason']
        return reason, status.get('message') or DISRUPTION_REASONS[reason]
    return '', ''


def observe_deleted_pod(pod: Mapping[str, Any]) -> PodState | None:
    """The last state of a pod that is gone: a disruption is remembered as one; None: just gone."""
    reason, message = disruption_of(pod)
    return PodState('Failed', 'Disrupted', message, disruption=reason) if reason else None


def observe_pod(pod: Mapping[str, Any]) -> PodState:
    state = _observe(pod)
    reason, message = disruption_of(pod)
    terminating = bool((pod.get('metadata') or {}).get('deletionTimestamp'))
    if reason or terminating:
        return dataclasses.replace(state, disruption=reason, terminating=terminating,
                                   message=message if reason else state.message)
    return state


def _observe(pod: Mapping[str, Any]) -> PodState:
    status = pod.get('status') or {}
    phase = status.get('phase') or 'Pending'
    containers = status.get('containerStatuses') or []
    trainer = next((c for c in containers if c.get('name') == 'trainer'), containers[0] if containers else {})
    state = trainer.get('state') or {}
    terminated = state.get('terminated') or {}
    waiting = state.get('waiting') or {}

    if status.get('reason') == 'Evicted':
        return PodState('Failed', 'Evicted', status.get('message') or 'the pod was evicted from its node')
    if terminated.get('reason') == 'OOMKilled':
        limit = _memory_limit(pod)
        return PodState('Failed', 'OOMKilled', 'the trainer ran out of memory and was killed'
                        + (f' (limit {limit})' if limit else ''))
    if phase == 'Failed' and terminated.get('exitCode') in _TRAINER_EXITS:
        reason, fallback = _TRAINER_EXITS[terminated['exitCode']]
        last = (terminated.get('message') or '').strip().splitlines()
        return PodState('Failed', reason, last[-1][:300] if last else fallback)
    if phase == 'Failed':
        code = terminated.get('exitCode')
        detail = f'the trainer exited with code {code}' if code is not None else (
            status.get('message') or 'the pod failed')
        if terminated.get('message'):
            detail += f': {terminated["message"].strip().splitlines()[-1][:300]}'
        return PodState('Failed', 'PodFailed', detail)
    if phase == 'Succeeded':
        return PodState('Succeeded', 'Completed', 'training finished')
    if phase == 'Running':
        return PodState('Running', 'Training', 'the trainer is running')
    gates = tuple(str(gate.get('name', '')) for gate in (pod.get('spec') or {}).get('schedulingGates') or [])
    if phase == 'Pending' and gates:   # no scheduler looks at it before every gate is removed
        return PodState('Pending', 'SchedulingGated', f'held by scheduling gate {", ".join(gates)}', gates=gates)
    if waiting.get('reason') in WAITING_REASONS_WORTH_REPORTING:
        return PodState('Pending', waiting['reason'], waiting.get('message') or waiting['reason'])
    for condition in status.get('conditions') or []:
        if condition.get('type') == 'PodScheduled' and condition.get('status') == 'False':
            return PodState('Pending', condition.get('reason') or 'Unschedulable',
                            condition.get('message') or 'the pod cannot be scheduled')
    return PodState('Pending', 'PodPending', 'waiting for the trainer pod to start')


def _memory_limit(pod: Mapping[str, Any]) -> str:
    for container in (pod.get('spec') or {}).get('containers') or []:
        if container.get('name') == 'trainer':
            return str(((container.get('resources') or {}).get('limits') or {}).get('memory', ''))
    return ''
