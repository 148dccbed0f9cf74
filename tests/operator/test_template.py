"""spec.template reaches every pod of every attempt; a change applies from the next attempt.

Through the real operator and the emulator (which validates the template with the CRD's real
Kubernetes types and CEL rules): a run with a priority class, a pull secret, an affinity, a
label and env from a Secret gets them on both ranks of its gang and again on its retry; a
template edited while an attempt runs leaves that attempt's pods alone.
"""

from __future__ import annotations

import pytest

from tests.operator.conftest import PODS
from tests.operator.test_lifecycle import beat, phase, run_body, set_pod_phase

pytestmark = pytest.mark.looptime(noop_cycles=2000)

TEMPLATE = {
    'metadata': {'labels': {'cost-center': 'radiology'}, 'annotations': {'sidecar.istio.io/inject': 'false'}},
    'spec': {
        'priorityClassName': 'training-high',
        'imagePullSecrets': [{'name': 'registry-credentials'}],
        'affinity': {'nodeAffinity': {'requiredDuringSchedulingIgnoredDuringExecution': {'nodeSelectorTerms': [
            {'matchExpressions': [{'key': 'topology.kubernetes.io/zone', 'operator': 'In', 'values': ['a']}]}]}}},
        'containers': [{'name': 'trainer', 'envFrom': [{'secretRef': {'name': 'mlflow-token'}}]}],
    },
}


def carries_the_template(pod: dict) -> bool:
    spec, container = pod['spec'], pod['spec']['containers'][0]
    return (pod['metadata']['labels'].get('cost-center') == 'radiology'
            and pod['metadata']['annotations'].get('sidecar.istio.io/inject') == 'false'
            and spec.get('priorityClassName') == 'training-high'
            and spec.get('imagePullSecrets') == [{'name': 'registry-credentials'}]
            and spec['affinity']['nodeAffinity']['requiredDuringSchedulingIgnoredDuringExecution'] is not None
            and container.get('envFrom') == [{'secretRef': {'name': 'mlflow-token'}}])


async def test_every_rank_of_every_attempt_carries_the_template(api, operator):
    await operator.start()
    await api.create(run_body('gang', device='cpu', numNodes=2, backoffLimit=1, template=TEMPLATE))
    await api.wait_for_run('gang', phase('Pending'))
    first = [await api.get(name, resource=PODS) for name in ('gang-1-0', 'gang-1-1')]
    assert all(carries_the_template(pod) for pod in first)
    for name in ('gang-1-0', 'gang-1-1'):
        await set_pod_phase(api, name, 'Running')
    await set_pod_phase(api, 'gang-1-1', 'Failed', terminated={'exitCode': 1, 'reason': 'Error'})
    await api.wait_for_run('gang', lambda run: run['status'].get('attempts') == 2, timeout=120)
    second = [await api.get(name, resource=PODS) for name in ('gang-2-0', 'gang-2-1')]
    assert all(carries_the_template(pod) for pod in second)


async def test_a_template_change_leaves_the_running_attempt_and_applies_to_the_next(api, operator):
    await operator.start()
    await api.create(run_body('edited', device='cpu', backoffLimit=1, template=TEMPLATE))
    await api.wait_for_run('edited', phase('Pending'))
    await set_pod_phase(api, 'edited-1', 'Running')
    await beat(api, 'edited', step=1)
    await api.wait_for_run('edited', phase('Running'))
    await api.patch('edited', {'spec': {'template': {'metadata': {'labels': {'cost-center': 'oncology'}}}}})
    await api.wait_for_run('edited', lambda run: run['status'].get('observedGeneration') == run['metadata'][
        'generation'])
    running = await api.get('edited-1', resource=PODS)
    assert running['metadata']['labels']['cost-center'] == 'radiology'   # untouched: pods are not patched
    await set_pod_phase(api, 'edited-1', 'Failed', terminated={'exitCode': 1, 'reason': 'Error'})
    await api.wait_for_run('edited', lambda run: run['status'].get('attempts') == 2, timeout=120)
    retried = await api.get('edited-2', resource=PODS)
    assert retried['metadata']['labels']['cost-center'] == 'oncology'
    assert retried['spec']['priorityClassName'] == 'training-high'


async def test_a_template_the_schema_refuses_never_reaches_the_operator(api, operator):
    await operator.start()
    body = run_body('bad', device='cpu', template={'spec': {'containers': [{'name': 'trainer', 'volumeMounts': [
        {'name': 'cache', 'mountPath': '/dev/shm'}]}]}})
    async with api.emulator.post('/apis/trainguard.io/v1alpha1/namespaces/default/trainingruns',
                                 json=body) as answer:
        refusal = await answer.json()
    assert answer.status == 422 and 'spec.template.spec.containers[0].volumeMounts' in refusal['message'], refusal
    assert await api.find('bad') is None


@pytest.mark.parametrize(('container', 'field'), [
    ({'name': 'trainer', 'command': ['sh', '-c', 'sleep 1d']}, 'spec.template.spec.containers[0].command'),
    ({'name': 'trainer', 'securityContext': {'privileged': True}}, 'spec.template.spec.containers[0].securityContext'),
    ({'name': 'trainer', 'resources': {'limits': {'cpu': '64'}}}, 'spec.template.spec.containers[0].resources'),
], ids=['command', 'privileged', 'resources'])
async def test_the_trainers_own_fields_are_unknown_fields_to_kubectl(api, container, field):
    """kubectl's default (fieldValidation=Strict) refuses them, as kube-apiserver does; without
    it the server drops them, and the trainer runs as the operator built it either way."""
    body = run_body('r', template={'spec': {'containers': [container]}})
    url = '/apis/trainguard.io/v1alpha1/namespaces/default/trainingruns'
    async with api.emulator.post(url, json=body, params={'fieldValidation': 'Strict'}) as answer:
        refusal = await answer.json()
    assert answer.status == 400 and refusal['message'] == (
        f'TrainingRun in version "v1alpha1" cannot be handled as a TrainingRun: strict decoding error: '
        f'unknown field "{field}"'), refusal
    async with api.emulator.post(url, json=body) as answer:
        assert answer.status < 300
    stored = await api.get('r')
    assert stored['spec']['template']['spec']['containers'] == [{'name': 'trainer'}]
