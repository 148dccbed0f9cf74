from __future__ import annotations

import pytest

from tests.crd_schema import load_crd
from trainguard.domain.spec import (
    DEFAULT_DATASET,
    DEFAULT_HYPERPARAMETERS,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUTS,
    SpecError,
    parse_spec,
)


def test_defaults_match_the_crd():
    spec = load_crd()['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']['spec']['properties']
    assert {k: v['default'] for k, v in spec['hyperparameters']['properties'].items()} == DEFAULT_HYPERPARAMETERS
    assert {k: v['default'] for k, v in spec['model']['properties'].items()} == DEFAULT_MODEL
    assert {k: v['default'] for k, v in spec['dataset']['properties'].items() if 'default' in v} == DEFAULT_DATASET
    assert {k: spec[k]['default'] for k in DEFAULT_TIMEOUTS} == DEFAULT_TIMEOUTS


@pytest.mark.parametrize(('spec', 'field'), [
    ({'device': 'tpu'}, 'spec.device'),
    ({'gpus': -1}, 'spec.gpus'),
    ({'device': 'cpu', 'gpus': 1}, 'spec.gpus'),
    ({'hyperparameters': {'batchSize': 0}}, 'spec.hyperparameters.batchSize'),
    ({'hyperparameters': {'batchSize': True}}, 'spec.hyperparameters.batchSize'),
    ({'hyperparameters': {'learningRate': 0}}, 'spec.hyperparameters.learningRate'),
    ({'hyperparameters': {'resolution': 64, 'cropSize': 128}}, 'spec.hyperparameters.cropSize'),
    ({'hyperparameters': [1]}, 'spec.hyperparameters'),
    ({'model': {'channels': [16, 32], 'strides': [2, 2]}}, 'spec.model.strides'),
    ({'model': {'channels': [16, 'x']}}, 'spec.model.channels[1]'),
    ({'dataset': {'source': 'directory'}}, 'spec.dataset.claimName'),
    ({'dataset': {'path': 'relative'}}, 'spec.dataset.path'),
    ({'resources': {'limits': {'cpu': ''}}}, 'spec.resources.limits.cpu'),
    ({'nodeSelector': {'a': 1}}, 'spec.nodeSelector.a'),
    ({'tolerations': 'all'}, 'spec.tolerations'),
    ({'progressTimeoutSeconds': 1}, 'spec.progressTimeoutSeconds'),
    ({'backoffLimit': 99}, 'spec.backoffLimit'),
    ({'maxDisruptions': -1}, 'spec.maxDisruptions'),
    ({'terminationGracePeriodSeconds': 0}, 'spec.terminationGracePeriodSeconds'),
    ({'suspend': 'yes'}, 'spec.suspend'),
    ({'activeDeadlineSeconds': 0}, 'spec.activeDeadlineSeconds'),
    ({'queueName': 'team a'}, 'spec.queueName'),
    ({'queueName': '-team'}, 'spec.queueName'),
], ids=lambda value: str(value)[:40])
def test_invalid_specs_name_the_field(spec, field):
    with pytest.raises(SpecError) as error:
        parse_spec(spec)
    assert error.value.field == field
    assert str(error.value).startswith(field + ':')


def test_quantities_become_strings():
    parsed = parse_spec({'resources': {'limits': {'cpu': 2, 'memory': '4Gi'}}})
    assert parsed.resources == {'limits': {'cpu': '2', 'memory': '4Gi'}}
