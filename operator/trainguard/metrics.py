"""Prometheus metrics: what a cluster operator alerts on (stalled runs, failing reconciles)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PHASES = ('Pending', 'Queued', 'Running', 'Suspended', 'Succeeded', 'Failed')


class _RunsByPhase(Collector):
    """Computed at scrape time from the operator's view, so it can never drift from it."""

    def __init__(self, runs: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self._runs = runs

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = collections.Counter((run.get('status') or {}).get('phase') or 'Pending' for run in self._runs())
        family = GaugeMetricFamily('trainguard_runs', 'TrainingRuns the operator sees, by phase', labels=['phase'])
        for phase in PHASES:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


class Metrics:
    def __init__(self, runs: Callable[[], Iterable[Mapping[str, Any]]]) -> None:
        self.registry = CollectorRegistry()
        self.stalls = Counter('trainguard_stalls', 'Hung attempts stopped (pod deleted)', ['reason'],
                              registry=self.registry)
        self.transitions = Counter('trainguard_phase_transitions', 'Runs entering a phase', ['phase'],
                                   registry=self.registry)
        self.disruptions = Counter('trainguard_disruptions', 'Attempts the cluster took away (drain, preemption, '
                                   'eviction): retried, not failures', ['reason'], registry=self.registry)
        self.reconcile_errors = Counter('trainguard_reconcile_errors', 'Reconciles that raised and will be retried',
                                        registry=self.registry)
        self.webhook_failures = Counter('trainguard_webhook_failures',
                                        'Admission webhook servers that could not start (runs are admitted '
                                        'unchanged; the operator rewrites them itself)', registry=self.registry)
        self.webhook_registration_failures = Counter(
            'trainguard_webhook_registration_failures',
            'Refused or failed attempts to register the MutatingWebhookConfiguration (retried with back-off)',
            registry=self.registry)
        self.registry.register(_RunsByPhase(runs))
