"""The trainer's watchdog says where it hung: the hang switch, and DataLoader workers that block,
freeze (SIGSTOP) or die (SIGKILL)."""

from __future__ import annotations

import json
import sys
import time
import traceback

import pytest

from tests.trainer.processes import start_in_group, stop_group
from tests.trainer.test_cli import _wait_for_log
from trainguard.domain.stallreport import classify
from trainguard_trainer.watchdog import _hung_in, summary_frames

TINY = ['--device', 'cpu', '--epochs', '1', '--num-samples', '20', '--batch-size', '4', '--resolution', '32',
        '--crop-size', '32', '--channels', '8,16', '--strides', '2', '--num-res-units', '0']
MARK = 'stall summary (no run configured): '
WORKER = ['--num-workers', '1', '--simulate-worker-block-after-items', '8', '--startup-report-seconds', '1',
          '--stall-report-seconds', '1']
DATALOADER = 'torch/utils/data/dataloader.py:'


def summaries(text: str) -> list[dict]:
    return [json.loads(line.split(MARK, 1)[1]) for line in text.splitlines() if MARK in line]


def summary_of(text: str, hung_in: str = '') -> dict:
    """The report of the hang: on a loaded machine a slow step before it can have its own report
    (one per stall; the next step re-arms the watchdog), so the first that names it is taken."""
    return next(summary for summary in summaries(text) if hung_in in summary['summary'].split(';')[0])


@pytest.mark.parametrize(('switch', 'hung_in', 'workers'), [
    (['--simulate-hang-after-steps', '2', '--stall-report-seconds', '0.5'],
     'trainguard_trainer/train.py:_hang_forever', []),
    ([*WORKER, '--simulate-worker-fault', 'block'], DATALOADER, ['is alive']),
    # The incident this project comes from: the worker *process* freezes. The main thread then
    # waits for its next batch, or inside multiprocessing's resource sharer for the handles of a
    # batch the worker already sent; either way the report names the DataLoader frame.
    # A model slow enough that sent batches wait in the pipe: the main thread then usually hangs
    # receiving one from the frozen worker (multiprocessing/resource_sharer.py:get_connection).
    ([*WORKER, '--simulate-worker-fault', 'stop', '--channels', '16,32,64', '--strides', '2,2',
      '--num-res-units', '1', '--resolution', '64', '--crop-size', '64', '--num-samples', '40'],
     DATALOADER, ['is alive']),
], ids=['loop-hang', 'worker-blocks', 'worker-frozen'])
def test_a_stall_report_names_the_frame_within_seconds(tmp_path, switch, hung_in, workers):
    log = tmp_path / 'log.txt'
    with log.open('w') as output:
        process = start_in_group([sys.executable, '-m', 'trainguard_trainer', *TINY, *switch,
                                  '--output-dir', str(tmp_path / 'out')], output)
        try:
            text = _wait_for_log(log, process, lambda text: any(
                hung_in in summary['summary'].split(';')[0] for summary in summaries(text)),
                f'a stall summary naming {hung_in}', timeout=90)
        finally:
            stop_group(process)
    summary = summary_of(text, hung_in)
    first = summary['summary'].split(';')[0]
    assert first.startswith('hung in ') and hung_in in first, summary
    assert [state.split(') ', 1)[1] for state in summary['workers']] == workers
    expected_class = 'DataLoaderWorkers' if workers else 'Unknown'
    assert classify(summary['frames'], summary['workers'], summary['summary']) == expected_class, summary
    report = (tmp_path / 'out' / 'stall-report.txt').read_text()
    assert '--- thread MainThread ---' in report and 'rss ' in report   # every thread's stack, and the process
    assert len(json.dumps(summary)) < 2048


def test_a_killed_worker_fails_the_trainer_at_once_naming_it(tmp_path):
    """SIGKILL (the OOM killer's way): PyTorch notices the dead worker within seconds and the trainer
    exits with an error that names it; the run fails as PodFailed instead of waiting for a timeout."""
    log = tmp_path / 'log.txt'
    started = time.monotonic()
    with log.open('w') as output:
        process = start_in_group([sys.executable, '-m', 'trainguard_trainer', *TINY, *WORKER,
                                  '--simulate-worker-fault', 'kill', '--output-dir', str(tmp_path / 'out')], output)
        try:
            code = process.wait(timeout=120)
        finally:
            stop_group(process)
    text = log.read_text()
    assert code != 0, text
    assert 'DataLoader worker (pid' in text and 'killed by signal: Killed' in text, text[-2000:]
    print(f'exited {code} after {time.monotonic() - started:.1f} s')


def _frames(*locations: tuple[str, str]) -> traceback.StackSummary:
    return traceback.StackSummary.from_list([(filename, 10, name, '') for filename, name in locations])


# Outermost first, as traceback.extract_stack gives them: the main thread of a trainer whose
# DataLoader worker froze after sending a batch (seen on a real control plane, issue 23).
RESOURCE_SHARER_WAIT = _frames(
    ('/app/trainguard_trainer/train.py', 'train'),
    ('/app/trainguard_trainer/train.py', '_train_epoch'),
    ('/usr/lib/python3.11/site-packages/torch/utils/data/dataloader.py', '__next__'),
    ('/usr/lib/python3.11/site-packages/torch/utils/data/dataloader.py', '_next_data'),
    ('/usr/lib/python3.11/site-packages/torch/utils/data/dataloader.py', '_get_data'),
    ('/usr/lib/python3.11/site-packages/torch/utils/data/dataloader.py', '_try_get_data'),
    ('/usr/local/lib/python3.11/multiprocessing/queues.py', 'get'),
    ('/usr/lib/python3.11/site-packages/torch/multiprocessing/reductions.py', 'rebuild_storage_fd'),
    ('/usr/local/lib/python3.11/multiprocessing/resource_sharer.py', 'detach'),
    ('/usr/local/lib/python3.11/multiprocessing/resource_sharer.py', 'get_connection'),
    ('/usr/local/lib/python3.11/multiprocessing/connection.py', 'Client'),
    ('/usr/local/lib/python3.11/multiprocessing/connection.py', 'answer_challenge'),
    ('/usr/local/lib/python3.11/multiprocessing/connection.py', 'recv_bytes'),
    ('/usr/local/lib/python3.11/multiprocessing/connection.py', '_recv'),
)


def test_a_wait_in_multiprocessing_plumbing_is_named_by_its_dataloader_frame():
    assert _hung_in(RESOURCE_SHARER_WAIT) == 'torch/utils/data/dataloader.py:_try_get_data'
    frames = summary_frames(RESOURCE_SHARER_WAIT)
    assert frames[0] == 'torch/utils/data/dataloader.py:10 _try_get_data' and frames[1] == '...'
    assert len(frames) == 6 and frames[-1] == 'python3.11/multiprocessing/connection.py:10 _recv'
    assert classify(frames, ['DataLoader worker 0 (pid 41) is alive']) == 'DataLoaderWorkers'
