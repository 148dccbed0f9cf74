from __future__ import annotations

import datetime

from tests.trainer.conftest import RecordingSender
from trainguard_trainer.heartbeat import Heartbeat

NOON = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.UTC)


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def beat(heartbeat: Heartbeat, step: int, force: bool = False) -> bool:
    return heartbeat.beat(epoch=1, epochs=2, step=step, steps=16, loss=0.5, samples_per_second=4.0, force=force)


def test_cadence_is_one_beat_per_interval_plus_forced_epoch_ends():
    clock, sender = ManualClock(), RecordingSender()
    heartbeat = Heartbeat(sender, 10.0, clock, lambda: NOON)
    sent = []
    for step in range(1, 31):          # 30 steps, 1 s apart
        sent.append(beat(heartbeat, step))
        clock.now += 1.0
    assert [step for step, ok in zip(range(1, 31), sent, strict=True) if ok] == [1, 11, 21]
    assert beat(heartbeat, 30, force=True) is True
    assert sender.payloads[0] == {'phase': 'Training', 'epoch': 1, 'epochs': 2, 'step': 1, 'steps': 16, 'loss': 0.5,
                                  'samplesPerSecond': 4.0, 'time': '2026-11-25T12:00:00Z', 'worldSize': 1}


def test_a_failed_beat_is_retried_at_the_next_interval_not_every_step():
    clock, sender = ManualClock(), RecordingSender(fail_first=1)
    heartbeat = Heartbeat(sender, 10.0, clock, lambda: NOON)
    assert beat(heartbeat, 1) is False and heartbeat.failed == 1
    clock.now = 5.0
    assert beat(heartbeat, 2) is False and heartbeat.failed == 1   # not attempted: inside the interval
    clock.now = 10.0
    assert beat(heartbeat, 3) is True and [p['step'] for p in sender.payloads] == [3]
