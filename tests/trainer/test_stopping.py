"""A drain, a preemption, a suspend: SIGTERM ends a step, saves epoch *and* step, and exits; the
resumed attempt goes on from the next step exactly as if nothing had happened."""

from __future__ import annotations

import itertools
import os
import signal
import sys

import pytest
import torch

from tests.trainer.conftest import RecordingSender, replace
from tests.trainer.processes import stop_group
from tests.trainer.test_cli import _wait_for_log
from tests.trainer.test_distributed import free_port, launch
from trainguard_trainer.cli import EXIT_STOPPED, main
from trainguard_trainer.stopping import Stopped
from trainguard_trainer.train import CHECKPOINT, train


class SigtermAt(RecordingSender):
    """Records beats, and sends this process SIGTERM from inside the beat of one step."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__()
        self.at = (epoch, step)

    def __call__(self, payload: dict) -> None:
        super().__call__(payload)
        if payload['phase'] == 'Training' and (payload['epoch'], payload['step']) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def per_step(sender: RecordingSender) -> dict[tuple[int, int], float]:
    return {(beat['epoch'], beat['step']): beat['loss'] for beat in sender.payloads if beat['phase'] == 'Training'}


@pytest.mark.parametrize('shape', ['tiny', 'tiny3d'], ids=['2d', '3d'])
def test_sigterm_mid_epoch_saves_that_step_and_the_resume_matches_an_uninterrupted_run(shape, request, tmp_path):
    """In 3D too: the random patches of the resumed epoch are the ones the uninterrupted run drew,
    so the losses match step for step."""
    config = replace(request.getfixturevalue(shape), heartbeat_seconds=0.0)   # a beat (with its loss) at every step
    whole = RecordingSender()
    uninterrupted = train(replace(config, output_dir=tmp_path / 'whole'), sender=whole)

    stopped_at = SigtermAt(epoch=1, step=2)
    with pytest.raises(Stopped) as stop:
        train(replace(config, output_dir=tmp_path / 'drained'), sender=stopped_at)
    assert (stop.value.epoch, stop.value.step) == (1, 2)
    state = torch.load(tmp_path / 'drained' / CHECKPOINT, weights_only=False)
    assert (state['epoch'], state['step']) == (1, 2) and state['history'] == []
    assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler or \
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # the handler is removed again

    resumed_beats = RecordingSender()
    resumed = train(replace(config, output_dir=tmp_path / 'drained'), sender=resumed_beats)
    steps = [(beat['epoch'], beat['step']) for beat in resumed_beats.payloads if beat['phase'] == 'Training']
    assert steps[0] == (1, 3)                 # no finished step is trained again
    expected = per_step(whole)
    for key, loss in per_step(resumed_beats).items():
        assert loss == pytest.approx(expected[key], abs=1e-5), key
    assert [row['train_loss'] for row in resumed.history] == pytest.approx(
        [row['train_loss'] for row in uninterrupted.history], abs=1e-5)
    assert [row['val_dice'] for row in resumed.history] == pytest.approx(
        [row['val_dice'] for row in uninterrupted.history], abs=1e-5)


@pytest.mark.parametrize(('interval', 'saved_steps'), [(15.0, [1, 2, 3]), (0.0, [])], ids=['every-step', 'off'])
def test_periodic_checkpoints_bound_what_a_sigkill_costs(tiny, tmp_path, interval, saved_steps):
    """A fake clock that advances 10 s per reading: with a 15 s interval every step is saved."""
    seen: list[int] = []

    class Peek(RecordingSender):
        def __call__(self, payload: dict) -> None:
            super().__call__(payload)
            path = tmp_path / 'out' / CHECKPOINT
            if payload['phase'] == 'Training' and payload['epoch'] == 1 and payload['step'] < 4 and path.exists():
                seen.append(torch.load(path, weights_only=False)['step'])

    ticks = itertools.count()
    train(replace(tiny, epochs=1, heartbeat_seconds=0.0, checkpoint_interval_seconds=interval,
                  output_dir=tmp_path / 'out'), sender=Peek(), clock=lambda: next(ticks) * 10.0)
    # What was on disk at the beat of steps 1-3 (each beat comes before that step's checkpoint).
    assert seen == saved_steps[:-1] if saved_steps else seen == []


def test_the_cli_exits_with_its_own_code_after_a_stop(tmp_path, monkeypatch):
    def stop(*_, **__):
        raise Stopped(1, 3)
    monkeypatch.setattr('trainguard_trainer.train.train', stop)
    assert main(['--device', 'cpu', '--output-dir', str(tmp_path)]) == EXIT_STOPPED == 6


@pytest.mark.timeout(180)
def test_a_gang_stops_at_the_same_step_when_one_rank_is_told(tmp_path):
    """SIGTERM reaches one pod's torchrun only: the ranks agree through the process group."""
    port = free_port()
    ranks = [launch(rank, port, tmp_path, '--epochs', '50') for rank in (0, 1)]
    try:
        _wait_for_log(tmp_path / 'rank1.log', ranks[1], lambda text: 'epoch 1/50 step 2/4' in text,
                      'rank 1 training', timeout=120)
        os.kill(ranks[1].pid, signal.SIGTERM)   # torchrun forwards it to its worker
        for process in ranks:
            process.wait(90)
    finally:
        for process in ranks:
            stop_group(process)
    logs = [(tmp_path / f'rank{rank}.log').read_text() for rank in (0, 1)]
    stops = [[line.split('stopped on SIGTERM after a checkpoint at ', 1)[1] for line in log.splitlines()
              if 'stopped on SIGTERM after a checkpoint at ' in line] for log in logs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], logs   # one stop, at the same epoch and step
    epoch, step = (int(part.split()[-1]) for part in stops[0][0].split(' step '))
    state = torch.load(tmp_path / 'out0' / CHECKPOINT, weights_only=False)
    assert (state['epoch'], state['step'] or 4) == (epoch, step)
    print(f'stopped together at epoch {epoch} step {step}', file=sys.stderr)
