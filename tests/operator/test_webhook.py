"""The mutating webhook as a real API server uses it: registered by the operator, called over TLS.

The operator starts its webhook server (certificates from ``cryptography``, or a folder as
cert-manager would mount), kopf registers the MutatingWebhookConfiguration with the CA
bundle, and the emulator calls it over HTTPS, verified with that bundle, on CREATE and UPDATE.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
import uuid

import aiohttp
import kmock
import kopf
import pytest

from tests.operator.conftest import EVENTS, NAMESPACE, PODS, RUNS, Api
from tests.operator.identities import chart_rbac
from tests.operator.test_lifecycle import CPU_RUN, phase
from trainguard.domain.config import config_from_env
from trainguard.handlers import register
from trainguard.webhook import generate_certificates
from trainguard_sandbox.cluster import free_port
from trainguard_sandbox.inprocess import OperatorRunner

pytestmark = pytest.mark.timeout(90)
CONFIGS = kmock.resource('admissionregistration.k8s.io', 'v1', 'mutatingwebhookconfigurations')
ORIGINAL = 'trainguard.io/original-hyperparameters'
SAFE = {'batchSize': 4, 'numWorkers': 0, 'epochs': 2, 'learningRate': 0.01, 'resolution': 128, 'cropSize': 128}


def webhook_operator(memo: kopf.Memo, **env: str) -> OperatorRunner:
    """The production start-up path, with the webhook on: the startup handler builds the server."""
    memo.config = config_from_env({'TRAINGUARD_WEBHOOK': 'on', 'TRAINGUARD_WEBHOOK_HOST': '127.0.0.1',
                                   'TRAINGUARD_WEBHOOK_PORT': str(free_port()), **env})
    memo.webhook_addr = '127.0.0.1'
    return OperatorRunner(memo, registry=register(kopf.OperatorRegistry(), webhook=True))


async def registered_webhook(api: Api) -> dict:
    async def find() -> dict | None:
        configs = await api.list(CONFIGS, namespace=None)
        hooks = [hook for config in configs for hook in config.get('webhooks') or []]
        return hooks[0] if hooks and hooks[0].get('clientConfig', {}).get('caBundle') else None
    return await api.wait_for(find, timeout=30, what='the MutatingWebhookConfiguration with a CA bundle')


async def create_when_admitted(api: Api, body: dict) -> dict:
    """The webhook is registered a moment after the operator is ready: wait for it, then create."""
    await registered_webhook(api)
    return await api.create(body)


@pytest.fixture()
def operator_rbac() -> list[dict]:
    """The operator runs as the chart's ServiceAccount with exactly the chart's webhook rules."""
    return chart_rbac('webhook.enabled=true')


@pytest.fixture()
async def stopping():
    runners: list[OperatorRunner] = []
    yield runners.append
    for runner in runners:
        await runner.stop()


async def test_kopf_mode_registers_a_tls_webhook_that_rewrites_on_create(api, operator_memo, stopping):
    runner = webhook_operator(operator_memo)
    stopping(runner)
    await runner.start()
    hook = await registered_webhook(api)
    assert hook['clientConfig']['url'].startswith('https://127.0.0.1:')
    assert hook['failurePolicy'] == 'Ignore' and set(hook['rules'][0]['operations']) == {'CREATE', 'UPDATE'}
    body = copy.deepcopy(CPU_RUN)
    body['metadata']['annotations'] = {'team': 'radiology'}
    created = await api.create(body)
    # Rewritten by the webhook at admission: the object is stored CPU-safe from its first version.
    assert created['spec']['hyperparameters'] == SAFE
    assert created['metadata']['annotations']['team'] == 'radiology'
    assert json.loads(created['metadata']['annotations'][ORIGINAL]) == CPU_RUN['spec']['hyperparameters']
    assert created['metadata']['generation'] == 1


async def test_an_update_of_the_manifest_as_written_yields_the_live_spec(api, operator_memo, stopping):
    """A GitOps server-side dry run (an UPDATE of what git holds) shows no drift."""
    runner = webhook_operator(operator_memo)
    stopping(runner)
    await runner.start()
    live = await create_when_admitted(api, copy.deepcopy(CPU_RUN))
    # What `kubectl apply` / a GitOps sync sends: the manifest from git, with no resourceVersion.
    as_in_git = copy.deepcopy(CPU_RUN)
    url = f'/apis/trainguard.io/v1alpha1/namespaces/{NAMESPACE}/trainingruns/cpu'
    headers = {'Content-Type': 'application/merge-patch+json'}
    async with api.emulator.patch(url, params={'dryRun': 'All'}, json=as_in_git, headers=headers) as response:
        assert response.status == 200, await response.text()
        dry = await response.json()
    assert dry['spec'] == live['spec']
    assert dry['metadata']['annotations'][ORIGINAL] == live['metadata']['annotations'][ORIGINAL]
    # And for real: the sync writes nothing unsafe back, and the spec's generation stays.
    async with api.emulator.patch(url, json=as_in_git, headers=headers) as response:
        assert response.status == 200, await response.text()
        synced = await response.json()
    assert synced['spec']['hyperparameters'] == SAFE and synced['metadata']['generation'] == 1
    assert json.loads(synced['metadata']['annotations'][ORIGINAL]) == CPU_RUN['spec']['hyperparameters']


async def test_a_replace_without_the_annotation_keeps_the_first_admissions_record(api, operator_memo, stopping):
    """`kubectl replace` sends annotations from git (without the record): it is put back."""
    runner = webhook_operator(operator_memo)
    stopping(runner)
    await runner.start()
    live = await create_when_admitted(api, copy.deepcopy(CPU_RUN))
    url = f'/apis/trainguard.io/v1alpha1/namespaces/{NAMESPACE}/trainingruns/cpu'
    async with api.emulator.put(url, params={'dryRun': 'All'}, json=copy.deepcopy(CPU_RUN)) as response:
        assert response.status == 200, await response.text()
        replaced = await response.json()
    assert replaced['spec'] == live['spec']
    assert replaced['metadata']['annotations'][ORIGINAL] == live['metadata']['annotations'][ORIGINAL]


async def test_admitting_the_rewritten_object_again_yields_no_patch(api, operator_memo, stopping):
    runner = webhook_operator(operator_memo)
    stopping(runner)
    await runner.start()
    live = await create_when_admitted(api, copy.deepcopy(CPU_RUN))
    hook = await registered_webhook(api)
    review = {'apiVersion': 'admission.k8s.io/v1', 'kind': 'AdmissionReview', 'request': {
        'uid': str(uuid.uuid4()), 'operation': 'UPDATE', 'name': 'cpu', 'namespace': NAMESPACE,
        'kind': {'group': 'trainguard.io', 'version': 'v1alpha1', 'kind': 'TrainingRun'},
        'resource': {'group': 'trainguard.io', 'version': 'v1alpha1', 'resource': 'trainingruns'},
        'userInfo': {'username': 'alice'}, 'object': live, 'oldObject': live, 'dryRun': False}}
    context = ssl.create_default_context(cadata=base64.b64decode(hook['clientConfig']['caBundle']).decode())
    async with aiohttp.ClientSession() as session, session.post(
            hook['clientConfig']['url'], json=review, ssl=context) as response:
        answer = (await response.json())['response']
    assert answer['allowed'] is True and not answer.get('patch')


async def test_cert_manager_mode_serves_the_mounted_certificates(api, operator_memo, stopping, tmp_path):
    files = generate_certificates(tmp_path / 'webhook-tls', ['127.0.0.1'])  # what cert-manager would mount
    runner = webhook_operator(operator_memo, TRAINGUARD_WEBHOOK_CERT_DIR=str(files.certfile.parent))
    stopping(runner)
    await runner.start()
    hook = await registered_webhook(api)
    assert base64.b64decode(hook['clientConfig']['caBundle']) == files.cafile.read_bytes()
    created = await api.create(copy.deepcopy(CPU_RUN))
    assert created['spec']['hyperparameters'] == SAFE


async def test_a_webhook_that_cannot_start_never_stops_reconciling(api, operator_memo, stopping, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv('POD_NAME', 'trainguard-7d9f')  # the downward API, as the chart sets it
    monkeypatch.setenv('POD_NAMESPACE', NAMESPACE)
    runner = webhook_operator(operator_memo, TRAINGUARD_WEBHOOK_CERT_DIR=str(tmp_path / 'not-mounted'))
    stopping(runner)
    await runner.start()
    await api.create(copy.deepcopy(CPU_RUN))
    run = await api.wait_for_run('cpu', phase('Pending'), timeout=30)
    # Admitted as written (no webhook answered), then rewritten by the operator's own reconcile.
    assert run['spec']['hyperparameters'] == SAFE
    assert operator_memo.runtime.metrics.webhook_failures._value.get() == 1
    assert not [hook for config in await api.list(CONFIGS, namespace=None) for hook in config.get('webhooks') or []]
    events = await api.wait_for(lambda: _webhook_events(api), timeout=30, what='the WebhookFailed Event')
    assert events[0]['involvedObject'] == {'apiVersion': 'v1', 'kind': 'Pod', 'name': 'trainguard-7d9f',
                                           'namespace': NAMESPACE}
    assert 'not-mounted/tls.crt is missing' in events[0]['message']


async def _webhook_events(api: Api, reason: str = 'WebhookFailed') -> list[dict]:
    return [event for event in await api.list(EVENTS) if event['reason'] == reason]


async def replace_cluster_roles(api: Api, docs: list[dict]) -> None:
    """``kubectl replace`` of an install's ClusterRoles, as the cluster admin."""
    for role in (doc for doc in docs if doc['kind'] == 'ClusterRole'):
        url = f'/apis/rbac.authorization.k8s.io/v1/clusterroles/{role["metadata"]["name"]}'
        async with api.emulator.put(url, json=role) as response:
            assert response.status == 200, await response.text()


@pytest.mark.operator_refusals_expected
@pytest.mark.looptime(noop_cycles=2000)
async def test_a_refused_webhook_configuration_never_stops_the_operator(api, cluster, operator_memo, stopping,
                                                                        monkeypatch):
    """Webhook on, but its configuration may not be written (the chart's RBAC with the webhook off):
    the operator keeps serving runs for minutes, says why on its Pod, and registers the webhook
    by itself once an admin grants the rule."""
    monkeypatch.setenv('POD_NAME', 'trainguard-7d9f')
    monkeypatch.setenv('POD_NAMESPACE', NAMESPACE)
    await replace_cluster_roles(api, chart_rbac('webhook.enabled=false'))   # no webhook rules
    runner = webhook_operator(operator_memo)
    stopping(runner)
    await runner.start()
    events = await api.wait_for(lambda: _webhook_events(api, 'WebhookNotRegistered'), timeout=60,
                                what='the WebhookNotRegistered Event')
    assert 'mutatingwebhookconfigurations' in events[0]['message'] and 'forbidden' in events[0]['message']
    await asyncio.sleep(5 * 60)   # loop time: kopf gave up and stopped the operator after about a minute
    await api.create(copy.deepcopy(CPU_RUN))
    run = await api.wait_for_run('cpu', phase('Pending'), timeout=60)
    assert run['spec']['hyperparameters'] == SAFE     # rewritten by the reconcile, not at admission
    assert [pod['metadata']['name'] for pod in await api.list(PODS)] == ['cpu-1']
    failures = operator_memo.runtime.metrics.webhook_registration_failures._value.get()
    assert 5 <= failures <= 10, failures   # back-off: 5, 10, 20, 40, 80, 160 s, then every 300 s
    refused = {(a.verb, a.resource, a.group) for who, a, _ in cluster.refusals if who.name.endswith(':tg-trainguard')}
    assert refused == {('patch', 'mutatingwebhookconfigurations', 'admissionregistration.k8s.io')}
    # An admin applies the chart with the webhook on: the next retry registers it.
    await replace_cluster_roles(api, chart_rbac('webhook.enabled=true'))
    hook = await registered_webhook(api)
    assert hook['name'] == 'cpu-safety.trainguard.io'
    body = copy.deepcopy(CPU_RUN)
    body['metadata']['name'] = 'admitted'
    assert (await api.create(body))['spec']['hyperparameters'] == SAFE


@pytest.mark.parametrize('policy', ['Ignore', 'Fail'])
async def test_the_emulator_honours_failure_policy_of_an_unreachable_webhook(api, policy):
    await api.create({'apiVersion': 'admissionregistration.k8s.io/v1', 'kind': 'MutatingWebhookConfiguration',
                      'metadata': {'name': 'stale.trainguard.io'},
                      'webhooks': [{'name': 'cpu-safety.trainguard.io', 'failurePolicy': policy,
                                    'clientConfig': {'url': f'https://127.0.0.1:{free_port()}/cpu-safety'},
                                    'rules': [{'apiGroups': ['trainguard.io'], 'apiVersions': ['v1alpha1'],
                                               'resources': ['trainingruns'], 'operations': ['CREATE']}],
                                    'sideEffects': 'None', 'admissionReviewVersions': ['v1']}]},
                     resource=CONFIGS, namespace=None)
    async with api.emulator.post(api._url(RUNS, NAMESPACE), json=copy.deepcopy(CPU_RUN)) as response:
        if policy == 'Ignore':
            assert response.status < 300, await response.text()  # admitted as written
            assert (await response.json())['spec']['hyperparameters'] == CPU_RUN['spec']['hyperparameters']
        else:
            assert response.status == 500
            assert 'failed calling webhook "cpu-safety.trainguard.io"' in (await response.json())['message']
