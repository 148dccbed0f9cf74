"""The MutatingWebhookConfiguration trainguard registers itself (trainguard.domain.admission).

Whole-object equality with what kopf's managed mode would build for the same handler, so
taking the registration out of kopf (issue 23) changes nothing the API server sees.
"""

from __future__ import annotations

import kopf
import pytest
from kopf._cogs.structs.references import Resource
from kopf._core.engines.admission import build_webhooks
from kopf._core.intents.causes import WebhookType

from trainguard import GROUP, PLURAL, VERSION
from trainguard.domain.admission import (
    CONFIGURATION_NAME,
    mutating_webhook_configuration,
    mutating_webhooks,
    retry_delay,
)
from trainguard.handlers import register

CA = 'LS0tLS1CRUdJTi=='


@pytest.mark.parametrize('client_config', [
    {'url': 'https://127.0.0.1:9443', 'caBundle': CA},
    {'url': 'https://127.0.0.1:9443/', 'caBundle': CA},
    {'service': {'namespace': 'trainguard-system', 'name': 'tg-trainguard-webhook', 'port': 443, 'path': ''},
     'caBundle': CA},
], ids=['url', 'url-with-slash', 'service'])
def test_the_webhooks_are_what_kopf_builds_for_the_handler(client_config):
    registry = register(kopf.OperatorRegistry(), webhook=True)
    handlers = registry._webhooks.get_all_handlers()
    expected = build_webhooks([h for h in handlers if h.reason == WebhookType.MUTATING],
                              resources=[Resource(GROUP, VERSION, PLURAL)], name_suffix=CONFIGURATION_NAME,
                              client_config=client_config)
    for webhook in expected:   # kopf lists the operations from a set, in no fixed order
        for rule in webhook['rules']:
            rule['operations'] = sorted(rule['operations'])
    assert mutating_webhooks(client_config, group=GROUP, version=VERSION, plural=PLURAL) == expected
    assert not [h for h in handlers if h.reason == WebhookType.VALIDATING]   # nothing else to register


def test_the_configuration_object():
    webhooks = mutating_webhooks({'url': 'https://h:1', 'caBundle': CA}, group=GROUP, version=VERSION, plural=PLURAL)
    assert mutating_webhook_configuration(webhooks) == {
        'apiVersion': 'admissionregistration.k8s.io/v1', 'kind': 'MutatingWebhookConfiguration',
        'metadata': {'name': 'trainguard.io', 'labels': {'app.kubernetes.io/managed-by': 'trainguard'}},
        'webhooks': [{
            'name': 'cpu-safety.trainguard.io', 'sideEffects': 'None', 'failurePolicy': 'Ignore',
            'matchPolicy': 'Equivalent',
            'rules': [{'apiGroups': ['trainguard.io'], 'apiVersions': ['v1alpha1'], 'resources': ['trainingruns'],
                       'operations': ['CREATE', 'UPDATE'], 'scope': '*'}],
            'objectSelector': None, 'clientConfig': {'url': 'https://h:1/cpu-safety', 'caBundle': CA},
            'timeoutSeconds': 30, 'admissionReviewVersions': ['v1', 'v1beta1']}],
    }


@pytest.mark.parametrize(('failures', 'delay'), [(0, 0), (1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (50, 300)],
                         ids=['none', 'first', 'second', 'third', 'sixth', 'ceiling', 'long-after'])
def test_registration_retries_back_off_to_five_minutes(failures, delay):
    assert retry_delay(failures) == delay
