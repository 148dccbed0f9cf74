"""The mutating webhook: an AdmissionReview POSTed to kopf's own WebhookServer (kmock calls no webhooks)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket

import aiohttp
import jsonpatch
import kopf
import pytest

from tests.operator.conftest import OperatorRunner
from tests.operator.test_lifecycle import CPU_RUN
from trainguard.handlers import register

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def review(obj: dict) -> dict:
    return {
        'apiVersion': 'admission.k8s.io/v1', 'kind': 'AdmissionReview',
        'request': {
            'uid': 'a5d3c7f0-0000-4000-8000-000000000001',
            'kind': {'group': 'trainguard.io', 'version': 'v1alpha1', 'kind': 'TrainingRun'},
            'resource': {'group': 'trainguard.io', 'version': 'v1alpha1', 'resource': 'trainingruns'},
            'requestKind': {'group': 'trainguard.io', 'version': 'v1alpha1', 'kind': 'TrainingRun'},
            'requestResource': {'group': 'trainguard.io', 'version': 'v1alpha1', 'resource': 'trainingruns'},
            'name': obj['metadata']['name'], 'namespace': 'default', 'operation': 'CREATE',
            'userInfo': {'username': 'alice'}, 'object': obj, 'oldObject': None, 'dryRun': False, 'options': {},
        },
    }


async def post_review(port: int, obj: dict) -> dict:
    """POST as the API server would; kopf opens the port shortly after the operator is ready."""
    for _ in range(100):
        try:
            async with aiohttp.ClientSession() as session, session.post(
                    f'http://127.0.0.1:{port}/cpu-safety', json=review(obj)) as response:
                assert response.status == 200
                return (await response.json())['response']
        except aiohttp.ClientConnectorError:
            await asyncio.sleep(0.1)
    raise AssertionError(f'the webhook server never listened on port {port}')


@pytest.fixture()
def webhook_port() -> int:
    return free_port()


def webhook_runner(memo: kopf.Memo, port: int) -> OperatorRunner:
    """The operator with the webhook registered; the startup handler installs the server, as in production."""
    memo.webhook_server = kopf.WebhookServer(addr='127.0.0.1', port=port, insecure=True)
    return OperatorRunner(memo, registry=register(kopf.OperatorRegistry(), webhook=True))


async def test_admission_rewrites_a_cpu_run(cluster, operator_memo, webhook_port):
    runner = webhook_runner(operator_memo, webhook_port)
    await runner.start()
    try:
        answer = await post_review(webhook_port, CPU_RUN)
    finally:
        await runner.stop()
    assert answer['allowed'] is True and answer['patchType'] == 'JSONPatch'
    patch = json.loads(base64.b64decode(answer['patch']))
    result = jsonpatch.apply_patch(CPU_RUN, patch)
    assert result['spec']['hyperparameters'] == {'batchSize': 4, 'numWorkers': 0, 'epochs': 2, 'learningRate': 0.01,
                                                 'resolution': 128, 'cropSize': 128}
    recorded = json.loads(result['metadata']['annotations']['trainguard.io/original-hyperparameters'])
    assert recorded == CPU_RUN['spec']['hyperparameters']
    assert '[CPU_OPTIMIZATION] Forcing num_workers=0 for CPU training (was 2)' in answer['warnings']


async def test_admission_leaves_a_gpu_run_alone(cluster, operator_memo, webhook_port):
    runner = webhook_runner(operator_memo, webhook_port)
    await runner.start()
    try:
        gpu = {**CPU_RUN, 'spec': {**CPU_RUN['spec'], 'device': 'gpu'}}
        answer = await post_review(webhook_port, gpu)
    finally:
        await runner.stop()
    assert answer['allowed'] is True and 'patch' not in answer
