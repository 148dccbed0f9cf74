"""The emulator adds on create what kube-apiserver adds, for every kind the operator creates
(tests/server_set.py; the golden file is recorded from, and checked against, a real
kube-apiserver in the apiserver tier)."""

from __future__ import annotations

import pytest

from tests.server_set import children, compared, load_golden, server_set
from trainguard.kube import _PATHS
from trainguard_sandbox.emulator import _qos_class


async def test_the_emulator_sets_what_kube_apiserver_sets_on_create(cluster):
    golden = load_golden()
    documents = children('default')
    assert sorted(golden) == sorted(document['kind'] for document in documents)
    for document in documents:
        async with cluster.post(_PATHS[document['kind']].format(namespace='default'), json=document) as response:
            assert response.status in (200, 201), await response.text()
            answered = await response.json()
        expected = compared(set(golden[document['kind']]))
        assert expected <= server_set(document, answered), (document['kind'], expected - server_set(document, answered))
    assert answered['status'] == {'phase': 'Pending', 'qosClass': 'BestEffort'}   # the default pod asks for nothing


def pod(*resources: dict) -> dict:
    return {'spec': {'containers': [{'name': f'c{index}', 'resources': value} for index, value in
                                    enumerate(resources)]}}


@pytest.mark.parametrize(('resources', 'qos'), [
    ([{}], 'BestEffort'),
    ([{'limits': {'cpu': '1', 'memory': '1Gi'}}], 'Guaranteed'),
    ([{'requests': {'cpu': '1000m', 'memory': '1Gi'}, 'limits': {'cpu': '1', 'memory': '1024Mi'}}], 'Guaranteed'),
    ([{'requests': {'cpu': '500m'}, 'limits': {'cpu': '1', 'memory': '1Gi'}}], 'Burstable'),
    ([{'limits': {'cpu': '1', 'memory': '1Gi'}}, {}], 'Burstable'),
    ([{'requests': {'cpu': '1'}}], 'Burstable'),
], ids=['none', 'limits-only', 'equal-in-other-units', 'request-below-limit', 'one-container-without', 'requests-only'])
def test_the_qos_class_is_kube_apiservers(resources, qos):
    assert _qos_class(pod(*resources)) == qos
