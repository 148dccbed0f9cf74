"""What Kueue's plain-Pod integration does to trainguard's pods, for tests without Kueue.

Kueue's pod webhook adds the scheduling gate ``kueue.x-k8s.io/admission`` to every pod that
names a queue (label ``kueue.x-k8s.io/queue-name``) in a namespace it manages; admitting the
workload (a pod group admitted whole) removes the gate from every pod; preempting it sets
``TerminationTarget=True`` on every pod of the group and deletes them.
"""

from __future__ import annotations

from typing import Any

GATE = 'kueue.x-k8s.io/admission'
QUEUE_LABEL = 'kueue.x-k8s.io/queue-name'


def gate_queued_pods(pod: dict[str, Any]) -> None:
    """The pod webhook (register with ``emulator.pod_create_hooks.append``)."""
    labels = (pod.get('metadata') or {}).get('labels') or {}
    if QUEUE_LABEL in labels:
        pod.setdefault('spec', {}).setdefault('schedulingGates', []).append({'name': GATE})
        labels['kueue.x-k8s.io/managed'] = 'true'


def admission_patch() -> dict[str, Any]:
    """Admitted: the gate goes (merge patch; Kueue removes only its own, and trainguard sets none)."""
    return {'spec': {'schedulingGates': None}}


def preemption_status() -> dict[str, Any]:
    return {'status': {'conditions': [{'type': 'TerminationTarget', 'status': 'True', 'reason': 'Preempted',
                                       'message': 'Preempted to accommodate a higher priority Workload'}]}}


PRIORITY_LABEL = 'kueue.x-k8s.io/priority-class'


def lower_priority(pods: list[dict[str, Any]], priorities: dict[str, int], than: int) -> list[dict[str, Any]]:
    """The admitted pods Kueue would preempt for a workload of priority ``than`` (its
    ``withinClusterQueue: LowerPriority`` policy): those whose WorkloadPriorityClass, read from
    the pod's ``kueue.x-k8s.io/priority-class`` label, is lower; a pod without one counts as 0."""
    def priority(pod: dict[str, Any]) -> int:
        return priorities.get(((pod.get('metadata') or {}).get('labels') or {}).get(PRIORITY_LABEL, ''), 0)
    return [pod for pod in pods if not (pod.get('spec') or {}).get('schedulingGates') and priority(pod) < than]
