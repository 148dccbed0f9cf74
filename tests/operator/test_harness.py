import pytest

pytestmark = pytest.mark.looptime


async def test_new_run_gets_pending(api, operator):
    await operator.start()
    await api.create({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun',
                      'metadata': {'name': 'r1'}, 'spec': {}})
    run = await api.wait_for_run('r1', lambda r: r.get('status', {}).get('phase'), what='a phase')
    assert run['status']['phase'] == 'Pending'
