import pytest

# Generous no-op cycles: kopf handler threads call the emulator over real sockets, and loop
# time must not jump ahead while such a request is still in flight on a loaded machine.
pytestmark = pytest.mark.looptime(noop_cycles=2000)


async def test_new_run_gets_pending(api, operator):
    await operator.start()
    await api.create({'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun',
                      'metadata': {'name': 'r1'}, 'spec': {}})
    run = await api.wait_for_run('r1', lambda r: r.get('status', {}).get('phase'), what='a phase')
    assert run['status']['phase'] == 'Pending'
