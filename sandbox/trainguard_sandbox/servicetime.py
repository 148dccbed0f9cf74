"""What a write costs a real API server, by kind, for the emulator's benchmarks.

An in-memory write costs the emulator microseconds; kube-apiserver takes milliseconds, and
not the same for every kind. Measured on kube-apiserver 1.36.2 + etcd 3.6 on a 2-core
machine (issue 32; the server's own ``apiserver_request_duration_seconds``):

- a Pod ~13 ms, a ServiceAccount ~11 ms, any other write (status patches, Events) ~3.6 ms,
  and at most ~620 writes/s from all clients together;
- a Role or RoleBinding ~3 ms when written one at a time (1,000 pairs in a row, flat), but
  ~100 ms each (Role ~108, RoleBinding ~101) in a burst from an operator with 8 workers,
  i.e. with up to 8 RBAC writes in flight: every RBAC write the server is busy with slows the
  others (each one invalidates what the RBAC authorizer has cached).

The model charges each write its kind's time, plus, for an RBAC write, ``rbac_contention``
seconds for every other RBAC write in flight when it arrives (linear, calibrated so that 8 in
flight cost ~100 ms each), after waiting for its turn under the throughput cap. It is a model,
fitted to those figures, not a server: the benchmark reports ratios to a minimal operator
measured against the same model in the same run.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping

RBAC_PLURALS = frozenset({'roles', 'rolebindings', 'clusterroles', 'clusterrolebindings'})


@dataclasses.dataclass(frozen=True)
class ServiceTimes:
    default_seconds: float = 0.0036
    seconds: Mapping[str, float] = dataclasses.field(default_factory=dict)   # plural -> seconds alone
    rbac_contention: float = 0.0       # added per other RBAC write in flight
    max_writes_per_second: float = 0.0  # 0: no cap


# kube-apiserver 1.36.2 + etcd 3.6, 2 cores (see the module docstring).
KUBE_APISERVER_1_36 = ServiceTimes(
    default_seconds=0.0036,
    seconds={'pods': 0.013, 'serviceaccounts': 0.011, 'roles': 0.003, 'rolebindings': 0.003},
    rbac_contention=(0.100 - 0.003) / 7,
    max_writes_per_second=620.0,
)
# The model before issue 32: every write alike.
UNIFORM = ServiceTimes(default_seconds=0.0036, max_writes_per_second=620.0)


class ServiceClock:
    """Charges writes their cost under a ServiceTimes (one per emulator; the event loop's time)."""

    def __init__(self, times: ServiceTimes) -> None:
        self.times = times
        self._next_slot = 0.0
        self._rbac_in_flight = 0

    def cost(self, plural: str, rbac_in_flight: int) -> float:
        """Seconds a write of this kind takes with this many other RBAC writes in flight."""
        alone = self.times.seconds.get(plural, self.times.default_seconds)
        return alone + (self.times.rbac_contention * rbac_in_flight if plural in RBAC_PLURALS else 0.0)

    async def charge(self, plural: str) -> None:
        loop = asyncio.get_running_loop()
        queued = 0.0
        if self.times.max_writes_per_second:
            now = loop.time()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 1 / self.times.max_writes_per_second
            queued = slot - now
        if queued:
            await asyncio.sleep(queued)
        rbac = plural in RBAC_PLURALS
        seconds = self.cost(plural, self._rbac_in_flight)
        if rbac:
            self._rbac_in_flight += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            if rbac:
                self._rbac_in_flight -= 1
