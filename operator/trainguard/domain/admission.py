"""The MutatingWebhookConfiguration trainguard registers for its CPU-safety webhook: pure builders.

Why not kopf's managed mode (``settings.admission.managed``): kopf then manages a
*validating* configuration beside the mutating one, and a refused create or patch of either
ends one of kopf's root tasks, which stops the whole operator (seen on a real API server:
the chart granted only the mutating kind, and the operator exited a minute after start).
trainguard registers exactly one configuration of one kind, with webhooks shaped as kopf
builds them (``kopf._core.engines.admission.build_webhooks``; a unit test compares the two),
and a registration that fails is retried with back-off and reported, never fatal.
"""

from __future__ import annotations

import copy
import urllib.parse
from collections.abc import Mapping
from typing import Any

CONFIGURATION_NAME = 'trainguard.io'   # the object's name: RBAC grants patch on this name only
HANDLER_ID = 'cpu-safety'              # kopf serves the handler at /<id>
WEBHOOK_NAME = f'{HANDLER_ID}.{CONFIGURATION_NAME}'
TIMEOUT_SECONDS = 30                   # the permitted maximum; the rewrite itself takes microseconds
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0


def _with_handler_path(client_config: Mapping[str, Any]) -> dict[str, Any]:
    """The server's client config with the handler's path appended (URL or Service), as kopf does."""
    config = copy.deepcopy(dict(client_config))
    path = '/' + urllib.parse.quote(HANDLER_ID)
    if config.get('url') is not None:
        config['url'] = config['url'].rstrip('/') + path
    if config.get('service') is not None:
        config['service']['path'] = config['service'].get('path', '') + path
    return config


def mutating_webhooks(client_config: Mapping[str, Any], *, group: str, version: str,
                      plural: str) -> list[dict[str, Any]]:
    """The ``webhooks`` list: one webhook for CREATE and UPDATE of TrainingRuns.

    ``failurePolicy: Ignore``: while the operator is away runs are admitted as written and its
    reconcile applies the same rewrite (README, "Admission webhook").
    """
    return [{
        'name': WEBHOOK_NAME,
        'sideEffects': 'None',
        'failurePolicy': 'Ignore',
        'matchPolicy': 'Equivalent',
        'rules': [{'apiGroups': [group], 'apiVersions': [version], 'resources': [plural],
                   'operations': ['CREATE', 'UPDATE'], 'scope': '*'}],
        'objectSelector': None,
        'clientConfig': _with_handler_path(client_config),
        'timeoutSeconds': TIMEOUT_SECONDS,
        'admissionReviewVersions': ['v1', 'v1beta1'],
    }]


def mutating_webhook_configuration(webhooks: list[dict[str, Any]],
                                   labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The whole object, for the first registration (later ones patch ``webhooks`` only)."""
    return {
        'apiVersion': 'admissionregistration.k8s.io/v1', 'kind': 'MutatingWebhookConfiguration',
        'metadata': {'name': CONFIGURATION_NAME,
                     'labels': {'app.kubernetes.io/managed-by': 'trainguard', **(labels or {})}},
        'webhooks': webhooks,
    }


def retry_delay(failures: int) -> float:
    """Seconds before the next registration attempt after this many failures in a row.

    Doubling from 5 s to a 5-minute ceiling: a cluster admin who fixes the RBAC sees the
    webhook registered within minutes, and a refusing server gets a dozen requests an hour.
    """
    if failures <= 0:
        return 0.0
    return min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (failures - 1))
