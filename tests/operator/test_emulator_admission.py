"""The emulator refuses what kube-apiserver refuses: schema, CEL rules, pruning, defaulting, dry run."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.manifests.test_crd_schema import MALFORMED
from tests.operator.conftest import NAMESPACE, RUNS

pytestmark = pytest.mark.timeout(60)


async def post(api, body: dict[str, Any], **params: str) -> tuple[int, dict[str, Any]]:
    async with api.emulator.post(api._url(RUNS, NAMESPACE), json=body, params=params) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(('body', 'field'), [(body, field) for _, body, field in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
async def test_a_malformed_run_is_refused_with_422_naming_the_field(api, body, field):
    status, answer = await post(api, copy.deepcopy(body))
    assert status == 422 and answer['reason'] == 'Invalid'
    assert answer['message'].startswith('TrainingRun.trainguard.io "r" is invalid: ')
    assert f'{field}:' in answer['message'] or f'{field} ' in answer['message'], answer['message']
    assert await api.find('r') is None


async def test_a_run_is_stored_defaulted_and_pruned(api):
    status, stored = await post(api, {'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun',
                                      'metadata': {'name': 'd'}, 'spec': {'gpu': 1, 'model': {'numResUnits': 1}}})
    assert status < 300
    assert 'gpu' not in stored['spec']            # an unknown field is pruned, as the server does
    assert stored['spec']['model'] == {'channels': [16, 32, 64, 128, 256], 'strides': [2, 2, 2, 2],
                                       'numResUnits': 1, 'spatialDims': 2, 'numClasses': 0}
    assert stored['spec']['hyperparameters']['batchSize'] == 32 and stored['spec']['device'] == 'auto'


async def test_a_dry_run_is_admitted_but_not_stored(api):
    status, answer = await post(api, {'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun',
                                      'metadata': {'name': 'dry'}, 'spec': {}}, dryRun='All')
    assert status == 200 and answer['spec']['progressTimeoutSeconds'] == 300
    assert await api.find('dry') is None


async def test_an_update_is_validated_but_an_unchanged_invalid_field_ratchets(api):
    """Validation ratcheting (Kubernetes 1.30+): an object stored before a rule can still be written."""
    schemas = dict(api.emulator.crd_schemas)
    api.emulator.crd_schemas.clear()
    try:
        await api.create({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'old'},
                          'spec': {'hyperparameters': {'resolution': 64, 'cropSize': 128}}})
    finally:
        api.emulator.crd_schemas.update(schemas)
    await api.patch('old', {'status': {'phase': 'Failed'}}, subresource='status')    # unchanged spec: allowed
    with pytest.raises(AssertionError, match=r'422.*spec\.gpus'):
        await api.patch('old', {'spec': {'device': 'cpu', 'gpus': 2}})               # a new violation: refused
