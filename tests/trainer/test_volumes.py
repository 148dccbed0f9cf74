"""3D volumes, several structures, the Decathlon layout: real training on CPU, tiny sizes."""

from __future__ import annotations

import json
import os
import time

import nibabel
import numpy as np
import pytest
import torch

from tests.trainer.conftest import RecordingSender, replace
from trainguard_trainer.config import TrainerConfig
from trainguard_trainer.data import DatasetError, decathlon_items, write_decathlon_dataset
from trainguard_trainer.train import build_model, structures, train


@pytest.fixture()
def decathlon(tmp_path, tiny3d) -> TrainerConfig:
    root = write_decathlon_dataset(tmp_path / 'Task99_Spheres', num_volumes=6, size=32, num_classes=3)
    return replace(tiny3d, dataset='directory', dataset_format='decathlon', data_dir=root, num_classes=0)


def test_synthetic_volumes_with_three_structures_train_and_score_each(tiny3d):
    result = train(tiny3d, sender=RecordingSender())
    last = result.history[-1]
    assert {'val_dice_1', 'val_dice_2', 'val_dice_3'} <= set(last) and 0.0 <= last['val_dice'] <= 1.0
    assert result.history[-1]['train_loss'] < result.history[0]['train_loss']
    # Background plus three structures out of a 3D UNet.
    assert build_model(tiny3d, 3)(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 4, 16, 16, 16)


def test_a_decathlon_dataset_trains_with_its_labels_as_the_classes(decathlon):
    assert structures(decathlon) == 3   # from dataset.json: background, structure-1, -2, -3
    sender = RecordingSender()
    result = train(decathlon, sender=sender)
    assert len(result.history) == 2 and 'val_dice_3' in result.history[-1]
    assert sender.payloads[-1]['bestDice'] == pytest.approx(max(row['val_dice'] for row in result.history),
                                                             abs=1e-6)
    assert (decathlon.output_dir / 'best.pt').exists()
    preparing = [p for p in sender.payloads if p['phase'] == 'PreparingData']
    # Every pair checked, beating as it goes, counted out of all six pairs.
    assert preparing[0]['detail'] == 'checking' and preparing[0]['total'] == 6


def _break_missing(root):
    os.remove(root / 'labelsTr' / 'case_002.nii.gz')
    return 'dataset.json training[2]: label ./labelsTr/case_002.nii.gz does not exist'


def _break_shape(root):
    nibabel.save(nibabel.Nifti1Image(np.zeros((16, 32, 32), np.uint8), np.eye(4)), str(root / 'labelsTr' /
                                                                                        'case_001.nii.gz'))
    return 'dataset.json training[1]: image ./imagesTr/case_001.nii.gz is 32x32x32 but label ' \
           './labelsTr/case_001.nii.gz is 16x32x32'


def _break_value(root):
    label = np.zeros((32, 32, 32), np.uint8)
    label[3, 3, 3] = 7
    nibabel.save(nibabel.Nifti1Image(label, np.eye(4)), str(root / 'labelsTr' / 'case_004.nii.gz'))
    return 'dataset.json training[4]: label ./labelsTr/case_004.nii.gz has value 7, which "labels" does not name'


def _break_json(root):
    (root / 'dataset.json').write_text('{"labels": {"0": "background", "1": "spleen"}}')
    return '"training" must list image and label pairs'


def _break_labels(root):
    described = json.loads((root / 'dataset.json').read_text())
    described['labels'] = {'1': 'spleen'}
    (root / 'dataset.json').write_text(json.dumps(described))
    return '"labels" must name the background "0" and at least one structure'


@pytest.mark.parametrize('break_it', [_break_missing, _break_shape, _break_value, _break_json, _break_labels],
                         ids=['missing-label', 'shape-mismatch', 'unknown-label-value', 'no-training', 'no-background'])
def test_a_bad_entry_is_named_before_any_training(decathlon, break_it):
    expected = break_it(decathlon.data_dir)
    started = time.monotonic()
    with pytest.raises(DatasetError) as refused:
        train(decathlon, sender=RecordingSender())
    assert expected in str(refused.value), refused.value
    assert time.monotonic() - started < 10
    assert not (decathlon.output_dir / 'checkpoint.pt').exists()   # nothing trained, nothing written


def test_the_run_and_the_dataset_must_agree_on_the_classes(decathlon):
    with pytest.raises(DatasetError, match='names 3 structures besides background, the run asks for 2'):
        train(replace(decathlon, num_classes=2), sender=RecordingSender())


def test_pairs_resolve_relative_to_dataset_json(decathlon):
    items, labels = decathlon_items(decathlon.data_dir)
    assert len(items) == 6 and labels == {0: 'background', 1: 'structure-1', 2: 'structure-2', 3: 'structure-3'}
    assert all(item['image'].startswith(str(decathlon.data_dir)) for item in items)


def test_volumes_are_resampled_to_the_median_spacing_and_windowed(decathlon, caplog):
    """Anisotropic voxels (as CT has): resampled to the median voxel size unless the run sets one;
    a CT window maps its range to [0, 1]."""
    from trainguard_trainer import data

    items, _ = decathlon_items(decathlon.data_dir)
    assert data.median_spacing(items) == (1.5, 1.5, 1.5)
    steps = data.transforms(32, 16, True, False, spatial_dims=3, num_classes=3, spacing=(3.0, 3.0, 3.0),
                            intensity_range=(0.2, 0.8))
    sample = steps(items[0])
    assert tuple(sample['image'].shape[1:]) <= (16, 16, 16)   # 32 voxels of 1.5 mm at 3 mm, then cropped
    assert float(sample['image'].min()) >= 0.0 and float(sample['image'].max()) <= 1.0
    assert sample['image'].shape == sample['label'].shape
    caplog.set_level('INFO', logger='trainguard_trainer')
    train(replace(decathlon, epochs=1), sender=RecordingSender())
    assert 'volumes resampled to the median voxel size 1.5x1.5x1.5 mm' in caplog.text


def test_a_3d_run_resumes_from_its_checkpoint(tiny3d):
    first = train(replace(tiny3d, epochs=1), sender=RecordingSender())
    resumed = train(replace(tiny3d, epochs=2), sender=RecordingSender())
    assert resumed.start_epoch == 2 and resumed.epochs_run == 1
    assert resumed.history[0] == first.history[0]
