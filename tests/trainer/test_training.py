"""Real training on CPU with tiny sizes: outputs, resume, heartbeats, directory data."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from tests.trainer.conftest import RecordingSender, replace
from trainguard_trainer.data import DatasetError, directory_items
from trainguard_trainer.train import build_model, train


def test_default_model_has_the_documented_size():
    from trainguard_trainer.config import TrainerConfig

    assert sum(p.numel() for p in build_model(TrainerConfig()).parameters()) == 1_624_844


def test_two_epochs_learn_and_write_outputs(tiny, sender):
    result = train(replace(tiny, epochs=3, learning_rate=0.02), sender=sender)
    losses = [row['train_loss'] for row in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    out = tiny.output_dir
    assert (out / 'checkpoint.pt').stat().st_size > 0
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with (out / 'metrics.csv').open() as file:
        rows = list(csv.DictReader(file))
    assert [int(row['epoch']) for row in rows] == [1, 2, 3]
    assert all(0.0 <= float(row['val_dice']) <= 1.0 for row in rows)


def test_every_beat_after_a_validation_says_how_good_the_model_is(tiny, sender):
    """The last and best validation Dice ride on every beat after the first validation (so the
    status keeps them between validations), and best.pt holds the best epoch's weights."""
    import torch

    result = train(replace(tiny, epochs=3, learning_rate=0.02), sender=sender)
    dice = [row['val_dice'] for row in result.history]
    best_epoch = 1 + dice.index(max(dice))
    first_validation = next(i for i, p in enumerate(sender.payloads) if p['phase'] == 'Validating')
    assert all('dice' not in p for p in sender.payloads[:first_validation + 1])
    last = sender.payloads[-1]
    assert last['dice'] == pytest.approx(dice[-1], abs=1e-6)
    assert last['bestDice'] == pytest.approx(max(dice), abs=1e-6) and last['bestEpoch'] == best_epoch
    saved = torch.load(tiny.output_dir / 'best.pt', weights_only=False)
    assert saved['epoch'] == best_epoch and saved['dice'] == pytest.approx(max(dice))
    assert set(saved['model']) == set(build_model(tiny).state_dict())


def test_a_resumed_run_reports_its_best_dice_from_its_first_beat_on(tiny, sender):
    first = train(replace(tiny, epochs=1), sender=sender)
    resumed = RecordingSender()
    train(replace(tiny, epochs=2), sender=resumed)
    training = next(p for p in resumed.payloads if p['phase'] == 'Training')
    assert training['bestDice'] == pytest.approx(first.history[0]['val_dice'], abs=1e-6)
    assert training['bestEpoch'] == 1


def test_resume_continues_from_the_checkpoint(tiny, sender):
    first = train(replace(tiny, epochs=1), sender=sender)
    assert first.start_epoch == 1
    second = train(replace(tiny, epochs=2), sender=RecordingSender())
    assert second.start_epoch == 2 and second.epochs_run == 1
    assert [row['epoch'] for row in second.history] == [1, 2]
    assert second.history[0] == first.history[0]


def test_heartbeats_follow_steps_and_epochs(tiny, sender):
    result = train(tiny, sender=sender, clock=lambda: 0.0)
    # 16 training samples / batch 4 = 4 steps per epoch; the stopped clock never reaches the
    # 10 s interval, so only entering a long phase, the first step and each epoch end beat.
    # Data preparation beats as it begins (generating 20 items; tiny streams them: no cache).
    assert [(p['phase'], p.get('detail'), p['epoch'], p['step'], p.get('done')) for p in sender.payloads] == [
        ('Starting', 'building the model', 0, 0, None), ('PreparingData', 'generating', 0, 0, 0),
        ('Training', None, 1, 1, None), ('Validating', None, 1, 4, 1),
        ('Training', None, 1, 4, None), ('Validating', None, 2, 4, 1), ('Training', None, 2, 4, None)]
    assert [p.get('total') for p in sender.payloads if p['phase'] == 'PreparingData'] == [20]
    assert result.heartbeats == 7
    first = next(p for p in sender.payloads if p['phase'] == 'Training')
    assert set(first) == {'phase', 'epoch', 'epochs', 'step', 'steps', 'loss', 'samplesPerSecond', 'time', 'worldSize'}
    assert first['worldSize'] == 1
    assert first['epochs'] == 2 and first['steps'] == 4


def test_heartbeat_failures_never_stop_training(tiny):
    flaky = RecordingSender(fail_first=2)   # Starting and PreparingData are lost
    result = train(tiny, sender=flaky)
    assert len(result.history) == 2 and len(flaky.payloads) == result.heartbeats
    assert flaky.payloads[0]['phase'] == 'Training' and flaky.payloads[-1]['step'] == 4


def write_pairs(root, names, size=40):
    (root / 'images').mkdir(parents=True)
    (root / 'labels').mkdir(parents=True)
    random = np.random.RandomState(0)
    for name in names:
        image = (random.rand(size, size) * 255).astype(np.uint8)
        label = np.zeros((size, size), dtype=np.uint8)
        label[10:25, 12:30] = 255
        Image.fromarray(image).save(root / 'images' / f'{name}.png')
        Image.fromarray(label).save(root / 'labels' / f'{name}.png')


def test_directory_dataset_trains(tiny, tmp_path, sender):
    write_pairs(tmp_path / 'data', [f'case{i}' for i in range(6)])
    result = train(replace(tiny, dataset='directory', data_dir=tmp_path / 'data', epochs=1), sender=sender)
    assert len(result.history) == 1


@pytest.mark.parametrize(('layout', 'message'), [
    ('missing', 'does not exist'),
    ('empty', 'holds no PNG or NIfTI images'),
    ('unmatched', 'do not match by name: a, b'),
], ids=['missing', 'empty', 'unmatched'])
def test_directory_dataset_errors(tmp_path, layout, message):
    root = tmp_path / 'data'
    if layout == 'empty':
        (root / 'images').mkdir(parents=True)
        (root / 'labels').mkdir()
    elif layout == 'unmatched':
        write_pairs(root, ['c'])
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'images' / 'a.png')
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'labels' / 'b.png')
    with pytest.raises(DatasetError, match=message):
        directory_items(root)


def test_the_cached_data_path_trains_like_the_streaming_one(tiny, tmp_path, caplog):
    """CacheDataset + ThreadDataLoader (the CUDA default; in RAM here) sees the same data as streaming:
    with crop == resolution nothing is random after the cache, so the losses match exactly."""
    caplog.set_level('INFO', logger='trainguard_trainer')
    streamed = train(replace(tiny, crop_size=64, data_path='stream', output_dir=tmp_path / 's'),
                     sender=RecordingSender())
    cached = train(replace(tiny, crop_size=64, data_path='cache', output_dir=tmp_path / 'c'),
                   sender=RecordingSender())
    assert [row['train_loss'] for row in cached.history] == [row['train_loss'] for row in streamed.history]
    assert 'data path: CacheDataset in RAM' in caplog.text and 'data path: streaming transforms' in caplog.text


def test_a_cache_fill_beats_per_item_cached(tiny, sender):
    """With the cache (the CUDA default), every item cached is progress and beats (no interval
    here): the training and validation items of the one stage, counted together."""
    result = train(replace(tiny, data_path='cache', heartbeat_seconds=0.0), sender=sender)
    caching = [(p['done'], p['total']) for p in sender.payloads
               if p['phase'] == 'PreparingData' and p.get('detail') == 'caching']
    assert caching == [(done, 20) for done in range(21)]   # 0 as the stage begins, then 16 train + 4 validation
    assert len(result.history) == 2
