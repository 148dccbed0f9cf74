"""The emulator's model of what a write costs kube-apiserver 1.36 (trainguard_sandbox.servicetime)."""

from __future__ import annotations

import asyncio

import pytest

from trainguard_sandbox.servicetime import KUBE_APISERVER_1_36, ServiceClock


@pytest.mark.parametrize(('plural', 'rbac_in_flight', 'seconds'), [
    ('pods', 0, 0.013), ('pods', 7, 0.013),                  # RBAC contention slows only RBAC
    ('serviceaccounts', 0, 0.011),
    ('roles', 0, 0.003), ('rolebindings', 0, 0.003),          # alone: as cheap as measured one at a time
    ('roles', 7, 0.100), ('rolebindings', 7, 0.100),          # 8 in flight: ~100 ms each, as in a burst
    ('trainingruns', 3, 0.0036), ('events', 0, 0.0036),
], ids=['pod', 'pod-in-a-burst', 'serviceaccount', 'role-alone', 'binding-alone', 'role-in-a-burst',
        'binding-in-a-burst', 'status-patch', 'event'])
def test_each_kind_costs_what_the_real_server_took(plural, rbac_in_flight, seconds):
    assert ServiceClock(KUBE_APISERVER_1_36).cost(plural, rbac_in_flight) == pytest.approx(seconds, abs=1e-4)


@pytest.mark.looptime
async def test_rbac_writes_in_flight_together_slow_each_other_and_nothing_else():
    clock = ServiceClock(KUBE_APISERVER_1_36)
    loop = asyncio.get_running_loop()

    async def timed(plural: str) -> float:
        start = loop.time()
        await clock.charge(plural)
        return loop.time() - start

    alone = await timed('roles')
    together = await asyncio.gather(*(timed('roles') for _ in range(8)), timed('pods'))
    assert alone == pytest.approx(0.003, abs=0.002)
    # The last of 8 arrives (after its turn under the write cap) with 6 still in flight: ~30x alone.
    assert 0.08 < max(together[:8]) < 0.115 and max(together[:8]) > 25 * alone
    assert together[8] < 0.03                                                 # the pod: its own cost and its turn
