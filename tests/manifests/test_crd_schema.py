"""The CRD refuses malformed runs with a message naming the field; every sample is accepted."""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import pytest
import yaml

from tests.crd_schema import ROOT, load_crd, validate_run

SAMPLES = sorted((ROOT / 'manifests' / 'samples').glob('*.yaml'))
SAMPLES = [path for path in SAMPLES if path.name != 'kustomization.yaml']


def run(**spec: Any) -> dict[str, Any]:
    return {'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'r'}, 'spec': spec}


@pytest.mark.parametrize('path', SAMPLES, ids=[path.stem for path in SAMPLES])
def test_every_sample_is_accepted(path: pathlib.Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert validate_run(doc) == []


def test_an_empty_spec_is_accepted_with_defaults() -> None:
    assert validate_run(run()) == []


MALFORMED = [
    ('device-unknown', run(device='tpu'), 'spec.device'),
    ('device-number', run(device=1), 'spec.device'),
    ('gpus-negative', run(gpus=-1), 'spec.gpus'),
    ('gpus-too-many', run(gpus=17), 'spec.gpus'),
    ('gpus-string', run(gpus='1'), 'spec.gpus'),
    ('gpus-with-cpu-device', run(device='cpu', gpus=1), 'spec.gpus'),
    ('cpu-safety-unknown', run(cpuSafety='maybe'), 'spec.cpuSafety'),
    ('batch-zero', run(hyperparameters={'batchSize': 0}), 'spec.hyperparameters.batchSize'),
    ('batch-negative', run(hyperparameters={'batchSize': -4}), 'spec.hyperparameters.batchSize'),
    ('batch-string', run(hyperparameters={'batchSize': '32'}), 'spec.hyperparameters.batchSize'),
    ('batch-float', run(hyperparameters={'batchSize': 3.5}), 'spec.hyperparameters.batchSize'),
    ('workers-negative', run(hyperparameters={'numWorkers': -1}), 'spec.hyperparameters.numWorkers'),
    ('workers-too-many', run(hyperparameters={'numWorkers': 65}), 'spec.hyperparameters.numWorkers'),
    ('epochs-zero', run(hyperparameters={'epochs': 0}), 'spec.hyperparameters.epochs'),
    ('lr-zero', run(hyperparameters={'learningRate': 0}), 'spec.hyperparameters.learningRate'),
    ('lr-negative', run(hyperparameters={'learningRate': -0.1}), 'spec.hyperparameters.learningRate'),
    ('lr-string', run(hyperparameters={'learningRate': 'fast'}), 'spec.hyperparameters.learningRate'),
    ('resolution-tiny', run(hyperparameters={'resolution': 8, 'cropSize': 8}), 'spec.hyperparameters.resolution'),
    ('crop-over-resolution', run(hyperparameters={'resolution': 128, 'cropSize': 256}),
     'spec.hyperparameters.cropSize'),
    ('crop-over-default-resolution', run(hyperparameters={'cropSize': 512}), 'spec.hyperparameters.cropSize'),
    ('hyperparameters-list', run(hyperparameters=[32]), 'spec.hyperparameters'),
    ('channels-one', run(model={'channels': [16], 'strides': []}), 'spec.model.channels'),
    ('channels-zero', run(model={'channels': [0, 32], 'strides': [2]}), 'spec.model.channels[0]'),
    ('strides-mismatch', run(model={'channels': [16, 32, 64], 'strides': [2]}), 'spec.model.strides'),
    ('strides-too-big', run(model={'channels': [16, 32], 'strides': [5]}), 'spec.model.strides[0]'),
    ('res-units-negative', run(model={'numResUnits': -1}), 'spec.model.numResUnits'),
    ('dataset-source-unknown', run(dataset={'source': 's3'}), 'spec.dataset.source'),
    ('dataset-samples-one', run(dataset={'numSamples': 1}), 'spec.dataset.numSamples'),
    ('num-nodes-zero', run(numNodes=0), 'spec.numNodes'),
    ('num-nodes-too-many', run(numNodes=65), 'spec.numNodes'),
    ('num-nodes-text', run(numNodes='2'), 'spec.numNodes'),
    ('directory-without-claim', run(dataset={'source': 'directory'}), 'spec.dataset.claimName'),
    ('dataset-path-relative', run(dataset={'path': 'data'}), 'spec.dataset.path'),
    ('claim-name-uppercase', run(output={'claimName': 'My_Claim'}), 'spec.output.claimName'),
    ('resources-bad-quantity', run(resources={'limits': {'cpu': 'lots'}}), 'spec.resources.limits.cpu'),
    ('resources-list', run(resources={'limits': ['cpu']}), 'spec.resources.limits'),
    ('node-selector-number', run(nodeSelector={'gpu': 1}), 'spec.nodeSelector.gpu'),
    ('tolerations-object', run(tolerations={'key': 'gpu'}), 'spec.tolerations'),
    ('toleration-string', run(tolerations=['gpu']), 'spec.tolerations[0]'),
    ('toleration-bad-operator', run(tolerations=[{'key': 'gpu', 'operator': 'Maybe'}]), 'spec.tolerations[0].operator'),
    ('toleration-bad-effect', run(tolerations=[{'key': 'gpu', 'effect': 'Sometimes'}]), 'spec.tolerations[0].effect'),
    ('progress-timeout-short', run(progressTimeoutSeconds=1), 'spec.progressTimeoutSeconds'),
    ('progress-timeout-huge', run(progressTimeoutSeconds=10**7), 'spec.progressTimeoutSeconds'),
    ('startup-timeout-zero', run(startupTimeoutSeconds=0), 'spec.startupTimeoutSeconds'),
    ('backoff-negative', run(backoffLimit=-1), 'spec.backoffLimit'),
    ('backoff-huge', run(backoffLimit=11), 'spec.backoffLimit'),
    ('image-too-long', run(image='x' * 600), 'spec.image'),
    ('max-disruptions-negative', run(maxDisruptions=-1), 'spec.maxDisruptions'),
    ('grace-zero', run(terminationGracePeriodSeconds=0), 'spec.terminationGracePeriodSeconds'),
    ('checkpoint-interval-negative', run(checkpointIntervalSeconds=-5), 'spec.checkpointIntervalSeconds'),
    ('suspend-string', run(suspend='yes'), 'spec.suspend'),
    ('deadline-zero', run(activeDeadlineSeconds=0), 'spec.activeDeadlineSeconds'),
    ('queue-name-spaces', run(queueName='team a'), 'spec.queueName'),
    ('queue-name-too-long', run(queueName='q' * 64), 'spec.queueName'),
    ('spacing-negative', run(dataset={'spacing': [1.5, -1, 2]}), 'spec.dataset.spacing[1]'),
    ('spacing-two-axes', run(dataset={'spacing': [1.5, 1.5]}), 'spec.dataset.spacing'),
    ('intensity-range-reversed', run(dataset={'intensityRange': [164, -57]}), 'spec.dataset.intensityRange'),
    ('spatial-dims-four', run(model={'spatialDims': 4}), 'spec.model.spatialDims'),
    ('dataset-format-unknown', run(dataset={'format': 'nnunet'}), 'spec.dataset.format'),
    # spec.template: what the operator owns (scripts/crd_template_schema.py), and Kubernetes' own types.
    ('template-operator-label', run(template={'metadata': {'labels': {'trainguard.io/run': 'other'}}}),
     'spec.template.metadata.labels'),
    ('template-queue-label', run(template={'metadata': {'labels': {'kueue.x-k8s.io/queue-name': 'q'}}}),
     'spec.template.metadata.labels'),
    ('template-operator-annotation', run(template={'metadata': {'annotations': {'trainguard.io/progress': '{}'}}}),
     'spec.template.metadata.annotations'),
    ('template-dev-shm', run(template={'spec': {'containers': [{'name': 'trainer', 'volumeMounts': [
        {'name': 'cache', 'mountPath': '/dev/shm'}]}]}}), 'spec.template.spec.containers[0].volumeMounts'),
    ('template-under-output', run(template={'spec': {'containers': [{'name': 'trainer', 'volumeMounts': [
        {'name': 'cache', 'mountPath': '/output/cache'}]}]}}), 'spec.template.spec.containers[0].volumeMounts'),
    ('template-operator-volume', run(template={'spec': {'volumes': [{'name': 'tmp', 'emptyDir': {}}]}}),
     'spec.template.spec.volumes'),
    ('template-operator-env', run(template={'spec': {'containers': [{'name': 'trainer', 'env': [
        {'name': 'TRAINGUARD_RUN_NAME', 'value': 'other'}]}]}}), 'spec.template.spec.containers[0].env'),
    ('template-root', run(template={'spec': {'securityContext': {'runAsUser': 0}}}),
     'spec.template.spec.securityContext.runAsUser'),
    ('template-unconfined', run(template={'spec': {'securityContext': {'seccompProfile': {'type': 'Unconfined'}}}}),
     'spec.template.spec.securityContext.seccompProfile.type'),
    ('template-other-container', run(template={'spec': {'containers': [{'name': 'sidecar'}]}}),
     'spec.template.spec.containers[0].name'),
    ('template-bad-affinity-operator', run(template={'spec': {'affinity': {'nodeAffinity': {
        'requiredDuringSchedulingIgnoredDuringExecution': {'nodeSelectorTerms': [{'matchExpressions': [
            {'key': 'zone', 'operator': 'Near', 'values': ['a']}]}]}}}}}),
     'spec.template.spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0]'
     '.matchExpressions[0].operator'),
    ('template-spread-typo', run(template={'spec': {'topologySpreadConstraints': [
        {'maxSkew': 1, 'topologyKey': 'zone', 'whenUnsatisfiable': 'DoNotScedule'}]}}),
     'spec.template.spec.topologySpreadConstraints[0].whenUnsatisfiable'),
    ('template-pull-secret-without-name', run(template={'spec': {'imagePullSecrets': [{}]}}),
     'spec.template.spec.imagePullSecrets[0].name'),
]


@pytest.mark.parametrize(('body', 'field'), [(body, field) for _, body, field in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_run_is_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    errors = validate_run(body)
    assert errors, 'the run was accepted'
    assert any(error.startswith(field + ':') or error.startswith(field + ' ') for error in errors), errors


def test_a_run_without_spec_is_refused() -> None:
    body = run()
    del body['spec']
    assert 'spec: Required value' in validate_run(body)


def test_every_cel_rule_has_a_message_naming_its_field() -> None:
    rules = []

    def walk(schema: dict[str, Any]) -> None:
        rules.extend((rule, schema.get('type'), 'properties' in schema)
                     for rule in schema.get('x-kubernetes-validations') or [])
        for sub in (schema.get('properties') or {}).values():
            walk(sub)
        if 'items' in schema:
            walk(schema['items'])

    walk(load_crd()['spec']['versions'][0]['schema']['openAPIV3Schema'])
    assert len(rules) == 14   # 6 hand-written, 8 on spec.template (scripts/crd_template_schema.py)
    assert all(rule['message'].startswith('spec.') for rule, _, _ in rules)
    # A rule on an object names the field it is about; a rule on a scalar, a list or a map is
    # reported where it sits (and its message names that field).
    assert all(rule.get('fieldPath') for rule, kind, structured in rules if kind == 'object' and structured)


def test_every_field_has_a_description() -> None:
    missing = []

    def walk(schema: dict[str, Any], path: str) -> None:
        for name, sub in (schema.get('properties') or {}).items():
            if name != 'metadata' and not sub.get('description'):
                missing.append(f'{path}.{name}')
            walk(sub, f'{path}.{name}')
        if 'items' in schema:
            walk(schema['items'], f'{path}[]')

    walk(load_crd()['spec']['versions'][0]['schema']['openAPIV3Schema'], '')
    assert missing == []


def test_printer_columns_and_names() -> None:
    crd = load_crd()
    version = crd['spec']['versions'][0]
    assert [column['name'] for column in version['additionalPrinterColumns']] == [
        'Phase', 'Device', 'Nodes', 'Epoch', 'Activity', 'Progress', 'Loss', 'Dice', 'Reason', 'Disruptions', 'Age']
    assert version['subresources'] == {'status': {}}
    assert crd['spec']['names']['shortNames'] == ['tr']
    assert crd['spec']['names']['categories'] == ['training']


def test_schema_copy_is_not_mutated_by_validation() -> None:
    body = run(hyperparameters={'batchSize': 8})
    before = copy.deepcopy(body)
    validate_run(body)
    assert body == before
