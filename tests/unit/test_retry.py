"""Retries that learn: the policy table, and the state machine applying it to a stalled attempt."""

from __future__ import annotations

import datetime
import json

import pytest

from trainguard.domain import reconcile as machine
from trainguard.domain.pods import PodState
from trainguard.domain.retry import adapt_for_retry
from trainguard.domain.spec import parse_hyperparameters

NOW = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)


def hp(**values):
    return parse_hyperparameters({'batchSize': 32, 'numWorkers': 2, 'epochs': 2, 'learningRate': 0.01,
                                  'resolution': 256, 'cropSize': 256, **values})


@pytest.mark.parametrize(('given', 'failure', 'policy', 'workers', 'batch', 'fields'), [
    (hp(), 'ProgressTimeout', 'adapt', 0, 32, ['numWorkers']),
    (hp(), 'StartupTimeout', 'adapt', 0, 32, ['numWorkers']),
    (hp(numWorkers=0), 'ProgressTimeout', 'adapt', 0, 32, []),
    (hp(), 'OOMKilled', 'adapt', 2, 16, ['batchSize']),
    (hp(), 'GPUOutOfMemory', 'adapt', 2, 16, ['batchSize']),
    (hp(batchSize=3), 'OOMKilled', 'adapt', 2, 1, ['batchSize']),
    (hp(batchSize=1), 'OOMKilled', 'adapt', 2, 1, ['cropSize']),      # a batch of one: half the patch
    (hp(batchSize=1, cropSize=16, resolution=16), 'OOMKilled', 'adapt', 2, 1, []),   # nothing left to halve
    (hp(), 'PodFailed', 'adapt', 2, 32, []),
    (hp(), 'Evicted', 'adapt', 2, 32, []),
    (hp(), 'ProgressTimeout', 'same', 2, 32, []),
    (hp(), 'OOMKilled', 'same', 2, 32, []),
], ids=['hang-workers', 'startup-workers', 'hang-no-workers', 'oom', 'cuda-oom', 'oom-odd', 'oom-at-one',
        'oom-at-the-smallest', 'other-failure', 'evicted', 'same-hang', 'same-oom'])
def test_policy(given, failure, policy, workers, batch, fields):
    adapted, changes = adapt_for_retry(given, failure, 2, policy)
    assert (adapted.num_workers, adapted.batch_size) == (workers, batch)
    assert [change.field for change in changes] == fields
    assert all(change.attempt == 2 and change.reason == failure for change in changes)


def test_out_of_memory_at_a_batch_of_one_halves_the_patch():
    adapted, (change,) = adapt_for_retry(hp(batchSize=1, cropSize=96, resolution=96), 'GPUOutOfMemory', 3, 'adapt')
    assert adapted.crop_size == 48 and adapted.batch_size == 1
    assert change.log_line() == ('[RETRY_ADJUSTMENT] Halving crop_size=48 for attempt 3 after GPUOutOfMemory '
                                 '(was 96)')
    assert change.to_api()['reason'] == 'GPUOutOfMemory: the attempt ran out of memory with a batch of one'


def test_changes_accumulate_and_never_loosen():
    first, _ = adapt_for_retry(hp(), 'ProgressTimeout', 2, 'adapt')
    second, changes = adapt_for_retry(first, 'OOMKilled', 3, 'adapt')
    third, _ = adapt_for_retry(second, 'PodFailed', 4, 'adapt')
    assert (third.num_workers, third.batch_size) == (0, 16)
    assert changes[0].log_line() == '[RETRY_ADJUSTMENT] Halving batch_size=16 for attempt 3 after OOMKilled (was 32)'


def stalled_run(**status):
    return {'metadata': {'name': 'unet', 'namespace': 'ml', 'uid': 'u1', 'generation': 1},
            'spec': {'device': 'cpu', 'cpuSafety': 'off', 'backoffLimit': 2, 'progressTimeoutSeconds': 60,
                     'hyperparameters': {'batchSize': 32, 'numWorkers': 2}},
            'status': {'phase': 'Running', 'attempts': 1, 'podName': 'unet-1', 'observedGeneration': 1,
                       'attemptStartTime': '2026-11-27T11:50:00Z',
                       'progress': {'lastProgressTime': '2026-11-27T11:55:00Z', 'epoch': 1, 'epochs': 2,
                                    'step': 1, 'steps': 16}, **status}}


def test_a_hung_attempt_with_workers_is_retried_with_none_in_the_pod_and_status_not_the_spec():
    plan = machine.reconcile(stalled_run(), PodState('Running'), NOW, machine.Settings())
    assert plan.delete_pods == ['unet-1'] and plan.spec_patch is None
    pod = next(child for child in plan.children if child['kind'] == 'Pod')
    args = pod['spec']['containers'][0]['args']
    assert pod['metadata']['name'] == 'unet-2' and args[args.index('--num-workers') + 1] == '0'
    assert args[args.index('--batch-size') + 1] == '32'
    status = plan.status_patch
    assert status['attemptHyperparameters']['numWorkers'] == 0 and status['attempts'] == 2
    assert status['adjustments'] == [{'field': 'numWorkers', 'from': 2, 'to': 0, 'attempt': 2,
                                      'reason': 'ProgressTimeout: DataLoader workers may have hung the attempt'}]
    assert [event.reason for event in plan.events] == ['ProgressTimeout', 'RetryAdjusted', 'Pending']
    assert '[RETRY_ADJUSTMENT] Forcing num_workers=0 for attempt 2 after ProgressTimeout (was 2)' in plan.logs


def test_the_next_failure_builds_on_the_adapted_settings():
    earlier = {'attemptHyperparameters': {'batchSize': 32, 'numWorkers': 0, 'epochs': 2, 'learningRate': 0.01,
                                          'resolution': 256, 'cropSize': 256},
               'adjustments': [{'field': 'numWorkers', 'from': 2, 'to': 0, 'attempt': 2, 'reason': 'x'}],
               'attempts': 2, 'podName': 'unet-2', 'phase': 'Pending'}
    run = stalled_run(**earlier)
    plan = machine.reconcile(run, PodState('Failed', 'OOMKilled', 'killed'), NOW, machine.Settings())
    pod = next(child for child in plan.children if child['kind'] == 'Pod')
    args = pod['spec']['containers'][0]['args']
    assert (args[args.index('--num-workers') + 1], args[args.index('--batch-size') + 1]) == ('0', '16')
    assert [entry['attempt'] for entry in plan.status_patch['adjustments']] == [2, 3]


def test_reconciling_again_after_the_retry_changes_nothing():
    run = stalled_run()
    plan = machine.reconcile(run, PodState('Running'), NOW, machine.Settings())
    run['status'] = {**run['status'], **json.loads(json.dumps(plan.status_patch))}
    again = machine.reconcile(run, PodState('Pending'), NOW, machine.Settings())
    assert again.children == [] and 'adjustments' not in (again.status_patch or {})
    assert 'attemptHyperparameters' not in (again.status_patch or {})
