"""The pods the operator builds are accepted by the trainer's CLI, with the same settings."""

from __future__ import annotations

import pytest

from trainguard.domain import builders
from trainguard.domain.policy import CpuLimits, apply_cpu_safety
from trainguard.domain.spec import parse_spec
from trainguard_trainer.cli import parse_config

RUN = builders.RunRef('unet', 'ml', 'uid-1')


@pytest.mark.parametrize('spec', [
    {'hyperparameters': {'batchSize': 32, 'numWorkers': 2}},
    {'device': 'gpu', 'model': {'channels': [8, 16, 32], 'strides': [2, 2], 'numResUnits': 1}},
    {'dataset': {'source': 'directory', 'claimName': 'scans', 'path': '/scans'}},
], ids=['cpu', 'gpu-small-model', 'directory'])
def test_pod_args_and_env_parse_into_the_effective_settings(spec):
    parsed = parse_spec(spec)
    effective, _ = apply_cpu_safety(parsed.hyperparameters, CpuLimits()) if parsed.device != 'gpu' else (
        parsed.hyperparameters, [])
    pod = builders.build_pod(RUN, parsed, effective, 2, builders.PodSettings(image='img', heartbeat_seconds=7),
                             simulate_hang_after_steps=3)
    container = pod['spec']['containers'][0]
    env = {item['name']: item['value'] for item in container['env']}
    config = parse_config(container['args'], env)
    assert (config.batch_size, config.num_workers, config.resolution, config.crop_size) == (
        effective.batch_size, effective.num_workers, effective.resolution, effective.crop_size)
    assert config.channels == parsed.model.channels and config.strides == parsed.model.strides
    assert (config.run_name, config.run_namespace, config.heartbeat_seconds) == ('unet', 'ml', 7.0)
    assert config.simulate_hang_after_steps == 3 and str(config.output_dir) == '/output'
    if parsed.dataset.source == 'directory':
        assert str(config.data_dir) == '/scans'


def test_the_gpu_unavailable_exit_code_is_the_one_the_operator_maps():
    from trainguard.domain.pods import EXIT_GPU_UNAVAILABLE, observe_pod
    from trainguard_trainer.cli import EXIT_GPU_UNAVAILABLE as TRAINER_EXIT

    assert TRAINER_EXIT == EXIT_GPU_UNAVAILABLE
    pod = {'status': {'phase': 'Failed', 'containerStatuses': [{'name': 'trainer', 'state': {'terminated': {
        'exitCode': TRAINER_EXIT, 'message': 'INFO ...\nERROR GPU unavailable: this torch build is CPU-only'}}}]}}
    state = observe_pod(pod)
    assert (state.phase, state.reason, state.message) == ('Failed', 'GPUUnavailable',
                                                         'ERROR GPU unavailable: this torch build is CPU-only')


def test_the_gpu_out_of_memory_exit_code_is_the_one_the_operator_retries():
    from trainguard.domain.pods import EXIT_GPU_OUT_OF_MEMORY, observe_pod
    from trainguard_trainer.cli import EXIT_GPU_OUT_OF_MEMORY as TRAINER_EXIT

    assert TRAINER_EXIT == EXIT_GPU_OUT_OF_MEMORY
    pod = {'status': {'phase': 'Failed', 'containerStatuses': [{'name': 'trainer', 'state': {'terminated': {
        'exitCode': TRAINER_EXIT, 'message': 'ERROR GPU out of memory at batch size 32: CUDA out of memory.'}}}]}}
    assert observe_pod(pod).reason == 'GPUOutOfMemory'
