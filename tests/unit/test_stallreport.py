"""The trainer's stall report as the operator reads it: classified, bounded, never trusted."""

from __future__ import annotations

import datetime
import json

import pytest

from trainguard.domain import reconcile as machine
from trainguard.domain.pods import PodState
from trainguard.domain.stallreport import MAX_LINE, MAX_TOTAL, STALL_ANNOTATION, classify, parse_stall_report

LOADER = ['torch/utils/data/dataloader.py:1291 _try_get_data', 'python3.11/multiprocessing/queues.py:113 get']


DDP = 'hung in torch/autograd/graph.py:_engine_run_backward; rank 0 of 2, DistributedDataParallel: every step waits'


@pytest.mark.parametrize(('frames', 'workers', 'summary', 'kind'), [
    (LOADER, ['DataLoader worker 0 (pid 42) is alive'], '', 'DataLoaderWorkers'),
    (['trainguard_trainer/train.py:220 train'], ['DataLoader worker 1 (pid 42) exited with -9'], '',
     'DataLoaderWorkers'),
    (['torch/distributed/distributed_c10d.py:2501 all_reduce'], [], '', 'Collective'),
    (['torch/autograd/graph.py:829 _engine_run_backward'], [], DDP, 'Collective'),
    (['torch/autograd/graph.py:829 _engine_run_backward'], [], 'hung in torch/autograd/graph.py', 'Unknown'),
    (['monai/transforms/io/array.py:280 LoadImage.__call__', 'nibabel/loadsave.py:100 load'], [], '', 'DataRead'),
    (['trainguard_trainer/train.py:132 _hang_forever', 'threading.py:327 wait'], [], '', 'Unknown'),
    # A frozen worker process, as an older trainer reported it (issue 23): only multiprocessing
    # plumbing in the innermost frames, the summary naming it, a worker alive.
    (['python3.11/multiprocessing/resource_sharer.py:86 get_connection',
      'python3.11/multiprocessing/connection.py:518 Client', 'python3.11/multiprocessing/connection.py:768 answer',
      'python3.11/multiprocessing/connection.py:395 _recv'], ['DataLoader worker 0 (pid 42) is alive'],
     'hung in python3.11/multiprocessing/resource_sharer.py:get_connection', 'DataLoaderWorkers'),
    (['python3.11/multiprocessing/connection.py:395 _recv'], [], 'hung in multiprocessing/connection.py:_recv',
     'Unknown'),   # plumbing without DataLoader workers: some other child process
], ids=['loader-wait', 'worker-died', 'collective', 'ddp-backward', 'single-process-backward', 'data-read', 'unknown',
        'frozen-worker-plumbing', 'plumbing-without-workers'])
def test_classify(frames, workers, summary, kind):
    assert classify(frames, workers, summary) == kind


@pytest.mark.parametrize(('text', 'attempt'), [
    (None, 1), ('', 1), ('not json', 1), ('[1, 2]', 1), ('{"summary": ""}', 1),
    ('{"summary": "hung in x", "attempt": 1}', 2),
], ids=['absent', 'empty', 'not-json', 'not-object', 'no-summary', 'other-attempt'])
def test_unusable_reports_are_ignored(text, attempt):
    assert parse_stall_report(text, attempt) is None


def test_a_report_is_sanitised_and_bounded():
    hostile = {'summary': 'hung in x\x1b[31m\nrm -rf /' + 'A' * 5000, 'attempt': 3,
               'frames': ['f' * 1000] * 50, 'workers': [{'nested': 'object'}, 7, 'DataLoader worker 0 exited with -9']}
    report = parse_stall_report(json.dumps(hostile), 3)
    assert report is not None and '\x1b' not in report.summary and '\n' not in report.summary
    assert len(report.summary) <= MAX_LINE and all(len(line) <= MAX_LINE for line in report.frames + report.workers)
    assert len(report.summary) + sum(map(len, report.frames + report.workers)) <= MAX_TOTAL
    assert report.kind == 'DataLoaderWorkers'


def test_a_stopped_run_carries_the_report_in_its_message_status_and_event():
    now = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC)
    summary = 'hung in torch/utils/data/dataloader.py:_try_get_data; DataLoader worker 1 (pid 42) exited with -9'
    run = {'metadata': {'name': 'unet', 'namespace': 'ml', 'uid': 'u', 'generation': 1, 'annotations': {
               STALL_ANNOTATION: json.dumps({'summary': summary, 'attempt': 1, 'frames': LOADER,
                                             'workers': ['DataLoader worker 1 (pid 42) exited with -9']})}},
           'spec': {'device': 'cpu', 'progressTimeoutSeconds': 60},
           'status': {'phase': 'Running', 'attempts': 1, 'podName': 'unet-1', 'observedGeneration': 1,
                      'attemptStartTime': '2026-11-27T11:50:00Z',
                      'progress': {'lastProgressTime': '2026-11-27T11:55:00Z', 'epoch': 1, 'epochs': 2,
                                   'step': 1, 'steps': 16}}}
    plan = machine.reconcile(run, PodState('Running'), now, machine.Settings())
    status = plan.status_patch
    assert status['phase'] == 'Failed' and status['reason'] == 'ProgressTimeout'
    assert status['message'].endswith(f'; {summary}')
    assert status['stallReport']['class'] == 'DataLoaderWorkers' and status['stallReport']['summary'] == summary
    stall_event = next(event for event in plan.events if event.reason == 'ProgressTimeout')
    assert summary in stall_event.message
