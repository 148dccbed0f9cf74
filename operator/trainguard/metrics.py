"""Prometheus metrics: the fleet view (trainguard.domain.fleet) and the operator's own health.

The chart's PrometheusRule and Grafana dashboard query these metrics: tests/chart/test_monitoring.py
holds every query against this registry, tests/e2e_sandbox/test_phases.py against a scrape of
the running operator.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from trainguard.domain import fleet
from trainguard.domain.reconcile import Plan


class _FleetState(Collector):
    """Gauges computed at scrape time from the operator's view, so they can never drift from it."""

    def __init__(self, runs: Callable[[], Iterable[Mapping[str, Any]]],
                 clock: Callable[[], datetime.datetime]) -> None:
        self._runs, self._clock = runs, clock

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = fleet.snapshot(self._runs(), self._clock())
        yield _family('trainguard_runs', 'TrainingRuns the operator sees, by phase', ['phase'],
                      {(phase,): count for phase, count in state.runs.items()})
        yield _family('trainguard_namespace_runs', 'TrainingRuns by namespace, phase and reason',
                      ['namespace', 'phase', 'reason'], state.by_reason)
        yield _family('trainguard_running_runs', 'Running TrainingRuns by what the trainer last said it was doing '
                      '(Starting, PreparingData, Training, Validating, Checkpointing, NoHeartbeat)',
                      ['namespace', 'trainer_phase'], state.trainer_phases)
        yield _family('trainguard_oldest_heartbeat_age_seconds', 'Seconds since the oldest last heartbeat among '
                      'Running TrainingRuns (or since the attempt started, before its first)', ['namespace'],
                      {(namespace,): seconds for namespace, seconds in state.oldest_heartbeat_seconds.items()})
        yield _family('trainguard_failed_in_a_row', 'TrainingRuns that ended Failed since the last one that '
                      'Succeeded, by completion time (among runs still present)', ['namespace'],
                      {(namespace,): count for namespace, count in state.failed_in_a_row.items()})


def _family(name: str, documentation: str, labels: list[str],
            values: Mapping[tuple[str, ...], float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label_values, value in sorted(values.items()):
        family.add_metric(list(label_values), value)
    return family


class Metrics:
    def __init__(self, runs: Callable[[], Iterable[Mapping[str, Any]]],
                 clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)) -> None:
        self.registry = CollectorRegistry()
        self.stalls = Counter('trainguard_stalls', 'Hung attempts stopped (pod deleted), by timeout and by the '
                              "stall report's class", ['namespace', 'reason', 'class'], registry=self.registry)
        self.transitions = Counter('trainguard_phase_transitions', 'Runs entering a phase, with the reason',
                                   ['namespace', 'phase', 'reason'], registry=self.registry)
        self.attempts = Counter('trainguard_attempts', 'Attempts started, by why (PodCreated, Retrying, Resumed, '
                                'Disrupted)', ['namespace', 'reason'], registry=self.registry)
        self.retries = Counter('trainguard_retries', 'Failed attempts retried, by the failure retried',
                               ['namespace', 'reason'], registry=self.registry)
        self.disruptions = Counter('trainguard_disruptions', 'Attempts the cluster took away (drain, preemption, '
                                   'eviction): retried, not failures', ['namespace', 'reason'], registry=self.registry)
        self.reconcile_errors = Counter('trainguard_reconcile_errors', 'Reconciles that raised and will be retried',
                                        registry=self.registry)
        self.webhook_failures = Counter('trainguard_webhook_failures',
                                        'Admission webhook servers that could not start (runs are admitted '
                                        'unchanged; the operator rewrites them itself)', registry=self.registry)
        self.webhook_registration_failures = Counter(
            'trainguard_webhook_registration_failures',
            'Refused or failed attempts to register the MutatingWebhookConfiguration (retried with back-off)',
            registry=self.registry)
        self.api_reachable = Gauge('trainguard_api_reachable', 'Whether the operator can reach the API server now '
                                   '(while it cannot, no run is judged on its silence)', registry=self.registry)
        self.api_reachable.set(1)
        self.api_outages = Counter('trainguard_api_outages', 'Spans the operator could not reach the API server',
                                   registry=self.registry)
        self.api_outage_seconds = Counter('trainguard_api_outage_seconds', 'Seconds the operator could not reach '
                                          'the API server (silence then is held against no run)',
                                          registry=self.registry)
        self.mass_silence = Gauge('trainguard_mass_silence', 'Whether most running runs are silent at once now: '
                                  'none is stopped (Stalled=Unknown) until heartbeats return', registry=self.registry)
        self.mass_silences = Counter('trainguard_mass_silences', 'Times most running runs went silent at once',
                                     registry=self.registry)
        self._counters = {'phase_transitions': self.transitions, 'attempts': self.attempts, 'retries': self.retries,
                          'stalls': self.stalls, 'disruptions': self.disruptions}
        self.registry.register(_FleetState(runs, clock))
        self._namespaces: set[str] = set()
        self._namespaces_lock = threading.Lock()

    def namespace_seen(self, namespace: str) -> None:
        """Create the namespace's counter series at 0 the first time a run there is seen, so
        Prometheus has a 0 before the first event and increase() sees it (fleet.initial_counts)."""
        if namespace in self._namespaces:
            return
        with self._namespaces_lock:
            if namespace in self._namespaces:
                return
            for count in fleet.initial_counts(namespace):
                self._counters[count.metric].labels(**dict(count.labels))
            self._namespaces.add(namespace)

    def count(self, namespace: str, plan: Plan) -> None:
        """Count what an applied plan did."""
        self.namespace_seen(namespace)
        patch = plan.status_patch or {}
        for count in fleet.counted(namespace, phase=patch.get('phase'), reason=patch.get('reason'),
                                   started_attempt=plan.started_attempt, retried=plan.retried,
                                   stalled=plan.stalled, stall_class=plan.stall_class, disrupted=plan.disrupted):
            self._counters[count.metric].labels(**dict(count.labels)).inc()
