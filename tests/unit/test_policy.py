"""The CPU-safety policy, row by row of the design's table."""

from __future__ import annotations

import json

import pytest

from trainguard.domain.policy import (
    ORIGINAL_ANNOTATION,
    CpuLimits,
    apply_cpu_safety,
    effective_device,
    effective_gpus,
    gpu_requested,
    plan_admission,
    plan_rewrite,
)
from trainguard.domain.spec import parse_hyperparameters, parse_spec

LIMITS = CpuLimits()


def hp(**values):
    return parse_hyperparameters({'batchSize': 32, 'numWorkers': 2, 'epochs': 2, 'learningRate': 0.01,
                                  'resolution': 256, 'cropSize': 256, **values})


@pytest.mark.parametrize(('given', 'field', 'old', 'new', 'line'), [
    (hp(), 'numWorkers', 2, 0, '[CPU_OPTIMIZATION] Forcing num_workers=0 for CPU training (was 2)'),
    (hp(), 'batchSize', 32, 4, '[CPU_OPTIMIZATION] Capping batch_size=4 for CPU training (was 32)'),
    (hp(), 'resolution', 256, 128, '[CPU_OPTIMIZATION] Capping resolution=128 for CPU training (was 256)'),
    (hp(), 'cropSize', 256, 128, '[CPU_OPTIMIZATION] Capping crop_size=128 for CPU training (was 256)'),
    (hp(resolution=96, cropSize=96, batchSize=2, numWorkers=0), None, None, None, None),
    (hp(resolution=200, cropSize=100), 'cropSize', None, None, None),
], ids=['workers', 'batch', 'resolution', 'crop', 'inside-limits', 'crop-inside-effective-resolution'])
def test_design_table_rows(given, field, old, new, line):
    effective, adjustments = apply_cpu_safety(given, LIMITS)
    by_field = {adjustment.field: adjustment for adjustment in adjustments}
    if old is None:
        assert field not in by_field
    else:
        assert (by_field[field].old, by_field[field].new) == (old, new)
        assert by_field[field].log_line() == line
    assert effective.epochs == given.epochs and effective.learning_rate == given.learning_rate


def test_policy_is_idempotent():
    once, _ = apply_cpu_safety(hp(), LIMITS)
    twice, adjustments = apply_cpu_safety(once, LIMITS)
    assert once == twice and adjustments == []


def test_limits_are_configuration():
    effective, _ = apply_cpu_safety(hp(), CpuLimits(num_workers=1, max_batch_size=8, max_resolution=192))
    assert (effective.num_workers, effective.batch_size, effective.resolution, effective.crop_size) == (1, 8, 192, 192)


@pytest.mark.parametrize(('spec', 'requested', 'device', 'gpus'), [
    ({}, False, 'cpu', 0),
    ({'device': 'gpu'}, True, 'gpu', 1),
    ({'gpus': 2}, True, 'gpu', 2),
    ({'resources': {'limits': {'nvidia.com/gpu': 1}}}, True, 'gpu', 0),
    ({'resources': {'requests': {'amd.com/gpu': '1'}}}, True, 'gpu', 0),
    ({'device': 'cpu'}, False, 'cpu', 0),
    ({'device': 'cpu', 'resources': {'limits': {'nvidia.com/gpu': 1}}}, True, 'cpu', 0),
], ids=['default', 'device-gpu', 'gpus', 'nvidia-resource', 'amd-resource', 'device-cpu', 'cpu-wins'])
def test_gpu_requested(spec, requested, device, gpus):
    parsed = parse_spec(spec)
    assert gpu_requested(parsed) is requested
    assert effective_device(parsed) == device
    assert effective_gpus(parsed) == gpus


def test_plan_rewrite_records_original_once():
    raw = {'batchSize': 32, 'numWorkers': 2}
    spec = parse_spec({'hyperparameters': raw})
    first = plan_rewrite(spec, raw, {}, LIMITS)
    assert first.spec_patch['spec']['hyperparameters']['batchSize'] == 4
    recorded = first.spec_patch['metadata']['annotations'][ORIGINAL_ANNOTATION]
    assert json.loads(recorded)['batchSize'] == 32
    rewritten = parse_spec({'hyperparameters': first.spec_patch['spec']['hyperparameters']})
    second = plan_rewrite(rewritten, first.spec_patch['spec']['hyperparameters'], {ORIGINAL_ANNOTATION: recorded},
                          LIMITS)
    assert second.spec_patch is None
    assert [a.field for a in second.adjustments] == ['numWorkers', 'batchSize', 'resolution', 'cropSize']


@pytest.mark.parametrize('spec', [{'device': 'gpu'}, {'cpuSafety': 'off'}], ids=['gpu', 'opt-out'])
def test_plan_rewrite_leaves_gpu_and_opt_out_alone(spec):
    parsed = parse_spec({**spec, 'hyperparameters': {'batchSize': 32}})
    rewrite = plan_rewrite(parsed, {'batchSize': 32}, {}, LIMITS)
    assert rewrite.spec_patch is None and rewrite.adjustments == []


AS_WRITTEN = {'batchSize': 32, 'numWorkers': 2, 'epochs': 2, 'learningRate': 0.01, 'resolution': 256, 'cropSize': 256}
SAFE = {'batchSize': 4, 'numWorkers': 0, 'epochs': 2, 'learningRate': 0.01, 'resolution': 128, 'cropSize': 128}
RECORD = json.dumps(AS_WRITTEN, sort_keys=True)


@pytest.mark.parametrize(('hyperparameters', 'annotations', 'old_annotations', 'patch'), [
    (AS_WRITTEN, {}, {},
     {'spec': {'hyperparameters': SAFE}, 'metadata': {'annotations': {ORIGINAL_ANNOTATION: RECORD}}}),
    (SAFE, {ORIGINAL_ANNOTATION: RECORD}, {ORIGINAL_ANNOTATION: RECORD}, None),
    (AS_WRITTEN, {}, {ORIGINAL_ANNOTATION: RECORD},
     {'spec': {'hyperparameters': SAFE}, 'metadata': {'annotations': {ORIGINAL_ANNOTATION: RECORD}}}),
    (SAFE, {}, {ORIGINAL_ANNOTATION: RECORD}, {'metadata': {'annotations': {ORIGINAL_ANNOTATION: RECORD}}}),
    (AS_WRITTEN, {ORIGINAL_ANNOTATION: '{"batchSize": 8}'}, {ORIGINAL_ANNOTATION: RECORD},
     {'spec': {'hyperparameters': SAFE}}),
], ids=['create', 'rewritten-again-no-patch', 'update-as-in-git', 'update-drops-record', 'update-keeps-own-record'])
def test_plan_admission_on_create_and_update(hyperparameters, annotations, old_annotations, patch):
    spec = parse_spec({'device': 'cpu', 'hyperparameters': hyperparameters})
    rewrite = plan_admission(spec, hyperparameters, annotations, old_annotations, LIMITS)
    assert rewrite.spec_patch == patch
    assert rewrite.effective.to_api() == SAFE


@pytest.mark.parametrize(('written', 'effective'), [
    ({'batchSize': 8, 'numWorkers': 4, 'resolution': 128, 'cropSize': 96},
     {'batchSize': 2, 'numWorkers': 0, 'resolution': 96, 'cropSize': 64}),       # GPU-sized patches on CPU
    ({'batchSize': 2, 'numWorkers': 0, 'resolution': 64, 'cropSize': 48},
     {'batchSize': 2, 'numWorkers': 0, 'resolution': 64, 'cropSize': 48}),       # already CPU-sized
    ({'batchSize': 1, 'numWorkers': 0, 'resolution': 96, 'cropSize': 80},
     {'batchSize': 1, 'numWorkers': 0, 'resolution': 96, 'cropSize': 64}),       # the patch alone
], ids=['gpu-sized', 'cpu-sized', 'patch-only'])
def test_3d_runs_on_cpu_get_limits_of_their_own(written, effective):
    spec = parse_spec({'device': 'cpu', 'model': {'spatialDims': 3}, 'hyperparameters': written})
    rewrite = plan_rewrite(spec, written, {}, CpuLimits())
    assert {key: rewrite.effective.to_api()[key] for key in effective} == effective
    assert [adjustment.field for adjustment in rewrite.adjustments] == [
        field for field in ('numWorkers', 'batchSize', 'resolution', 'cropSize') if written[field] != effective[field]]
    # Idempotent: the rewritten run needs no second rewrite; a 2D run with the same values keeps its own limits.
    again = parse_spec({'device': 'cpu', 'model': {'spatialDims': 3}, 'hyperparameters': rewrite.effective.to_api()})
    assert not plan_rewrite(again, rewrite.effective.to_api(), {}, CpuLimits()).adjustments
    flat = plan_rewrite(parse_spec({'device': 'cpu', 'hyperparameters': written}), written, {}, CpuLimits())
    assert flat.effective.batch_size == min(written['batchSize'], 4)
