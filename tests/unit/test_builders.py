"""Builders tested by whole-object equality against golden files (regenerate: UPDATE_GOLDEN=1)."""

from __future__ import annotations

import os
import pathlib

import pytest
import yaml

from trainguard.domain import builders
from trainguard.domain.policy import CpuLimits, apply_cpu_safety
from trainguard.domain.spec import parse_spec

GOLDEN = pathlib.Path(__file__).parent / 'golden'
RUN = builders.RunRef(name='unet-cpu', namespace='ml', uid='0f6c1c1e-0000-4000-8000-000000000001')
SETTINGS = builders.PodSettings(image='ghcr.io/trainguard/trainer:0.1.0', heartbeat_seconds=10)


def cpu_pod():
    spec = parse_spec({'hyperparameters': {'batchSize': 32, 'numWorkers': 2},
                       'resources': {'limits': {'cpu': 2, 'memory': '4Gi'}}})
    effective, _ = apply_cpu_safety(spec.hyperparameters, CpuLimits())
    return builders.build_pod(RUN, spec, effective, 1, SETTINGS)


def gpu_pod():
    spec = parse_spec({'device': 'gpu', 'hyperparameters': {'numWorkers': 4}, 'nodeSelector': {'gpu': 'true'},
                       'output': {'claimName': 'out'},
                       'dataset': {'source': 'directory', 'claimName': 'scans', 'path': '/data'}})
    return builders.build_pod(RUN, spec, spec.hyperparameters, 2, SETTINGS, simulate_hang_after_steps=None)


CASES = {
    'pod-cpu': cpu_pod,
    'pod-gpu': gpu_pod,
    'serviceaccount': lambda: builders.build_service_account(RUN),
    'role': lambda: builders.build_role(RUN),
    'rolebinding': lambda: builders.build_role_binding(RUN),
}


@pytest.mark.parametrize('name', list(CASES))
def test_builder_matches_golden(name):
    built = CASES[name]()
    path = GOLDEN / f'{name}.yaml'
    if os.environ.get('UPDATE_GOLDEN'):
        path.write_text(yaml.safe_dump(built, sort_keys=False))
    assert built == yaml.safe_load(path.read_text())


def test_role_allows_only_get_and_patch_on_its_own_run():
    assert builders.build_role(RUN)['rules'] == [{'apiGroups': ['trainguard.io'], 'resources': ['trainingruns'],
                                                  'resourceNames': ['unet-cpu'], 'verbs': ['get', 'patch']}]


@pytest.mark.parametrize(('workers', 'batch', 'resolution', 'expected'), [
    (1, 4, 128, 64), (2, 32, 256, 128), (4, 32, 512, 1024)])
def test_shm_is_sized_for_the_loader(workers, batch, resolution, expected):
    hp = parse_spec({'hyperparameters': {'numWorkers': workers, 'batchSize': batch, 'resolution': resolution,
                                         'cropSize': resolution}}).hyperparameters
    assert builders.shm_size_mebibytes(hp) == expected


def test_long_names_stay_valid_label_values():
    value = builders.label_value('x' * 100)
    assert len(value) == 63 and value.startswith('x' * 54)


@pytest.mark.parametrize(('spec', 'image'), [
    ({}, 'cpu-image'),
    ({'device': 'gpu'}, 'cuda-image'),
    ({'gpus': 2}, 'cuda-image'),
    ({'resources': {'limits': {'nvidia.com/gpu': '1'}}}, 'cuda-image'),
    ({'device': 'gpu', 'image': 'mine'}, 'mine'),
    ({'device': 'cpu', 'image': 'mine'}, 'mine'),
], ids=['cpu', 'device-gpu', 'gpus', 'gpu-resource', 'own-image-gpu', 'own-image-cpu'])
def test_gpu_runs_get_the_cuda_image_unless_they_name_one(spec, image):
    settings = builders.PodSettings(image='cpu-image', gpu_image='cuda-image')
    assert builders.trainer_image(parse_spec(spec), settings) == image
