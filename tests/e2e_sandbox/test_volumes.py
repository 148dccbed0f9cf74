"""3D medical data end to end: a synthetic Decathlon dataset on a claim, the real operator and trainer.

The dataset (three structures, NIfTI volumes, dataset.json) is written into the claim's folder,
as a team would copy an MSD task onto a PVC; the run trains on it to Succeeded with its Dice in
the status. The same dataset with a label file missing ends Failed/InvalidDataset naming the
entry, before any training, in well under ten seconds of the trainer's start.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from tests.e2e_sandbox.test_sandbox import wait_for
from trainguard_trainer.data import write_decathlon_dataset

pytestmark = pytest.mark.timeout(300)


def volume_run(name: str, claim: str) -> dict[str, Any]:
    return {'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': name}, 'spec': {
        'device': 'cpu',
        'model': {'spatialDims': 3, 'channels': [8, 16, 32], 'strides': [2, 2], 'numResUnits': 0},
        'dataset': {'source': 'directory', 'format': 'decathlon', 'claimName': claim, 'path': '/data'},
        # Written as for a GPU (96^3 patches, batch 8, 4 workers): the operator rewrites it to its
        # 3D CPU limits (batch 2, no workers, a 64^3 patch at most).
        'hyperparameters': {'batchSize': 8, 'numWorkers': 4, 'epochs': 2, 'resolution': 128, 'cropSize': 96},
        'progressTimeoutSeconds': 60, 'startupTimeoutSeconds': 120}}


def claim_folder(sandbox, claim: str):
    return sandbox.workdir / 'volumes' / 'default' / 'claims' / claim


async def test_a_decathlon_dataset_on_a_volume_trains_with_dice_in_the_status(sandbox):
    write_decathlon_dataset(claim_folder(sandbox, 'task99'), num_volumes=6, size=32, num_classes=3)
    await sandbox.apply(volume_run('spheres', 'task99'))
    done = await wait_for(sandbox, 'spheres', ('Succeeded', 'Failed'), timeout=240)
    status = done['status']
    assert status['phase'] == 'Succeeded', status
    progress = status['progress']
    assert 0.0 <= progress['dice'] <= 1.0 and progress['bestDice'] >= progress['dice'] - 1e-9
    assert progress['bestEpoch'] in (1, 2)
    assert {(item['field'], item['to']) for item in status['adjustments']} == {
        ('batchSize', 2), ('numWorkers', 0), ('resolution', 96), ('cropSize', 64)}


async def test_a_missing_label_file_ends_invalid_dataset_naming_it(sandbox):
    root = write_decathlon_dataset(claim_folder(sandbox, 'task98'), num_volumes=4, size=32, num_classes=3)
    os.remove(root / 'labelsTr' / 'case_002.nii.gz')
    started = time.monotonic()
    await sandbox.apply(volume_run('broken', 'task98'))
    done = await wait_for(sandbox, 'broken', ('Succeeded', 'Failed'), timeout=120)
    status = done['status']
    assert (status['phase'], status['reason']) == ('Failed', 'InvalidDataset'), status
    assert 'training[2]: label ./labelsTr/case_002.nii.gz does not exist' in status['message'], status
    assert status['attempts'] == 1   # the same data fails the same way: no retry
    print(f'InvalidDataset {time.monotonic() - started:.1f}s after the run was applied')
