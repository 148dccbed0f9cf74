from __future__ import annotations

import datetime
import json

import pytest

from trainguard.domain.heartbeat import Heartbeat, parse_heartbeat
from trainguard.domain.pods import PodState, observe_deleted_pod, observe_pod
from trainguard.domain.stall import Healthy, Stalled, judge_stall

T0 = datetime.datetime(2026, 11, 25, 12, 0, 0, tzinfo=datetime.UTC)
GOOD = {'epoch': 1, 'epochs': 2, 'step': 8, 'steps': 16, 'loss': 0.4213, 'samplesPerSecond': 5.1,
        'time': '2026-11-25T19:20:00Z'}


def test_a_good_heartbeat_parses_with_percent():
    beat = parse_heartbeat(json.dumps(GOOD))
    assert isinstance(beat, Heartbeat) and beat.percent == 25
    status = beat.to_status(T0)
    assert status['lastProgressTime'] == '2026-11-25T12:00:00Z' and status['loss'] == 0.4213


@pytest.mark.parametrize('text', [
    '{not json', '[1, 2]', '"text"', json.dumps({**GOOD, 'epoch': 'one'}), json.dumps({**GOOD, 'steps': 0}),
    json.dumps({**GOOD, 'loss': float('nan')}) .replace('NaN', '"nan"'), json.dumps({**GOOD, 'epoch': 3}),
    json.dumps({**GOOD, 'step': 17}), json.dumps({'epoch': 1}),
], ids=['not-json', 'list', 'string', 'epoch-text', 'zero-steps', 'loss-text', 'epoch-past-end', 'step-past-end',
        'missing-fields'])
def test_malformed_heartbeats_return_a_reason(text):
    result = parse_heartbeat(text)
    assert isinstance(result, str) and 'trainguard.io/progress' in result


def test_a_beat_after_a_validation_carries_the_models_dice_into_the_status():
    beat = parse_heartbeat(json.dumps({**GOOD, 'dice': 0.81234567, 'bestDice': 0.85, 'bestEpoch': 1}))
    assert isinstance(beat, Heartbeat)
    status = beat.to_status(T0)
    assert (status['dice'], status['bestDice'], status['bestEpoch']) == (0.8123, 0.85, 1)
    # Before the first validation the beat has none, and writes none (the status keeps the last).
    assert not {'dice', 'bestDice', 'bestEpoch'} & set(parse_heartbeat(json.dumps(GOOD)).to_status(T0))
    # A beat that differs only by its Dice (same second, same step) is still written.
    assert not beat.same_beat({**status, 'dice': 0.5})


@pytest.mark.parametrize('quality', [
    {'dice': 1.5}, {'dice': -0.1}, {'dice': 'good'}, {'bestDice': 0.9}, {'bestDice': 0.9, 'bestEpoch': 0},
], ids=['dice-over-one', 'dice-negative', 'dice-text', 'best-without-epoch', 'best-epoch-zero'])
def test_a_malformed_dice_is_named(quality):
    result = parse_heartbeat(json.dumps({**GOOD, **quality}))
    assert isinstance(result, str) and 'malformed' in result


def test_no_heartbeat_is_none():
    assert parse_heartbeat(None) is None and parse_heartbeat('') is None


def running(**status):
    return {'phase': 'Running', 'attemptStartTime': '2026-11-25T12:00:00Z', **status}


def beat_at(seconds, **extra):
    return {'lastProgressTime': (T0 + datetime.timedelta(seconds=seconds)).strftime('%Y-%m-%dT%H:%M:%SZ'),
            'epoch': 1, 'epochs': 2, 'step': 8, 'steps': 16, 'loss': 0.42, **extra}


@pytest.mark.parametrize(('status', 'after', 'verdict'), [
    (running(), 599, Healthy),
    (running(), 600, 'StartupTimeout'),
    (running(progress=beat_at(10)), 309, Healthy),
    (running(progress=beat_at(10)), 322, 'ProgressTimeout'),
    (running(progress=beat_at(-100)), 500, Healthy),          # a beat from an earlier attempt
    (running(progress=beat_at(-100)), 700, 'StartupTimeout'),
    ({'phase': 'Pending'}, 10_000, Healthy),
    ({'phase': 'Running'}, 10_000, Healthy),                    # not yet seen running: no clock started
], ids=['startup-ok', 'startup-late', 'progress-ok', 'progress-late', 'old-beat-ok', 'old-beat-startup',
        'pending', 'no-start'])
def test_stall_decision(status, after, verdict):
    result = judge_stall(status, T0 + datetime.timedelta(seconds=after), progress_timeout=300, startup_timeout=600)
    if verdict is Healthy:
        assert isinstance(result, Healthy)
    else:
        assert isinstance(result, Stalled) and result.reason == verdict


def test_progress_stall_message():
    result = judge_stall(running(progress=beat_at(10)), T0 + datetime.timedelta(seconds=322),
                         progress_timeout=300, startup_timeout=600)
    assert result.message == 'no progress for 312s (last: epoch 1/2, step 8/16, loss 0.42)'


def pod(phase='Pending', state=None, **status):
    body = {'spec': {'containers': [{'name': 'trainer', 'resources': {'limits': {'memory': '2Gi'}}}]},
            'status': {'phase': phase, **status}}
    if state:
        body['status']['containerStatuses'] = [{'name': 'trainer', 'state': state}]
    return body


@pytest.mark.parametrize(('body', 'expected'), [
    (pod(), PodState('Pending', 'PodPending', 'waiting for the trainer pod to start')),
    (pod(state={'waiting': {'reason': 'ImagePullBackOff', 'message': 'back-off pulling'}}),
     PodState('Pending', 'ImagePullBackOff', 'back-off pulling')),
    (pod(state={'waiting': {'reason': 'ErrImagePull'}}), PodState('Pending', 'ErrImagePull', 'ErrImagePull')),
    (pod(conditions=[{'type': 'PodScheduled', 'status': 'False', 'reason': 'Unschedulable',
                      'message': '0/3 nodes have a GPU'}]),
     PodState('Pending', 'Unschedulable', '0/3 nodes have a GPU')),
    (pod('Running'), PodState('Running', 'Training', 'the trainer is running')),
    (pod('Succeeded'), PodState('Succeeded', 'Completed', 'training finished')),
    (pod('Failed', {'terminated': {'reason': 'OOMKilled', 'exitCode': 137}}),
     PodState('Failed', 'OOMKilled', 'the trainer ran out of memory and was killed (limit 2Gi)')),
    (pod('Failed', {'terminated': {'reason': 'Error', 'exitCode': 1}}),
     PodState('Failed', 'PodFailed', 'the trainer exited with code 1')),
    (pod('Failed', {'terminated': {'reason': 'Error', 'exitCode': 3, 'message': 'loading\ndataset: training[2]: '
                                                                                  'label labelsTr/c.nii.gz does not '
                                                                                  'exist'}}),
     PodState('Failed', 'InvalidDataset', 'dataset: training[2]: label labelsTr/c.nii.gz does not exist')),
    (pod('Failed', reason='Evicted', message='low on memory'),
     PodState('Failed', 'Evicted', 'low on memory', disruption='Evicted')),
    (pod('Failed', {'terminated': {'reason': 'Error', 'exitCode': 6}}),
     PodState('Failed', 'Stopped', 'the trainer was stopped (SIGTERM) and saved a checkpoint (exit code 6)')),
], ids=['pending', 'image-pull-backoff', 'err-image-pull', 'unschedulable', 'running', 'succeeded', 'oom',
        'exit-code', 'invalid-dataset', 'evicted', 'stopped-without-a-disruption'])
def test_pod_phase_mapping(body, expected):
    assert observe_pod(body) == expected


def disrupted(phase='Running', condition='DisruptionTarget', reason='EvictionByEvictionAPI', deleting=True):
    body = pod(phase, conditions=[{'type': condition, 'status': 'True', 'reason': reason,
                                   'message': f'{reason} message'}])
    body['metadata'] = {'deletionTimestamp': '2026-11-27T12:00:00Z'} if deleting else {}
    return body


@pytest.mark.parametrize(('body', 'disruption', 'terminating'), [
    (disrupted(), 'EvictionByEvictionAPI', True),
    (disrupted(reason='PreemptionByScheduler'), 'PreemptionByScheduler', True),
    (disrupted(reason='DeletionByTaintManager'), 'DeletionByTaintManager', True),
    (disrupted(reason='DeletionByPodGC'), 'DeletionByPodGC', True),
    (disrupted('Failed', reason='TerminationByKubelet', deleting=False), 'TerminationByKubelet', False),
    (disrupted(condition='TerminationTarget', reason='Preempted'), 'Preempted', True),
    (pod('Failed', reason='NodeLost'), 'NodeLost', False),
    (dict(pod('Running'), metadata={'deletionTimestamp': '2026-11-27T12:00:00Z'}), '', True),   # kubectl delete pod
    ({**disrupted(), 'status': {'phase': 'Running', 'conditions': [
        {'type': 'DisruptionTarget', 'status': 'False', 'reason': 'EvictionByEvictionAPI'}]}}, '', True),
], ids=['evicted-by-api', 'preempted', 'taint-manager', 'pod-gc', 'kubelet', 'kueue', 'node-lost',
        'deleted-by-a-user', 'condition-false'])
def test_disruptions_are_told_apart_from_failures(body, disruption, terminating):
    state = observe_pod(body)
    assert (state.disruption, state.terminating) == (disruption, terminating)
    gone = observe_deleted_pod(body)
    assert (gone.disruption if gone else '') == disruption


@pytest.mark.parametrize(('status', 'spec', 'after', 'resync', 'due'), [
    ({'phase': 'Succeeded'}, {}, 10_000, True, False),
    ({'phase': 'Pending'}, {}, 0, False, False),
    ({'phase': 'Pending'}, {}, 0, True, True),
    (running(progress=beat_at(10)), {'progressTimeoutSeconds': 300}, 100, False, False),
    (running(progress=beat_at(10)), {'progressTimeoutSeconds': 300}, 400, False, True),
    (running(), {'startupTimeoutSeconds': 60}, 61, False, True),
    (running(), {'startupTimeoutSeconds': 'soon'}, 0, False, True),
    ({'phase': 'Pending', 'activeSince': T0.strftime('%Y-%m-%dT%H:%M:%SZ')}, {'activeDeadlineSeconds': 60}, 61,
     False, True),
    ({'phase': 'Pending', 'activeSince': T0.strftime('%Y-%m-%dT%H:%M:%SZ')}, {'activeDeadlineSeconds': 60}, 59,
     False, False),
    ({'phase': 'Suspended', 'activeSeconds': 100}, {'activeDeadlineSeconds': 60}, 1000, False, False),
], ids=['terminal', 'pending', 'pending-resync', 'running-healthy', 'running-stalled', 'startup-late', 'bad-spec',
        'deadline-passed', 'deadline-ahead', 'suspended-clock-stopped'])
def test_due_for_sweep(status, spec, after, resync, due):
    from trainguard.domain.stall import due_for_sweep

    run = {'status': status, 'spec': spec}
    assert due_for_sweep(run, T0 + datetime.timedelta(seconds=after), resync=resync) is due


@pytest.mark.parametrize(('payload', 'activity', 'percent'), [
    ({'phase': 'Starting', 'epoch': 0, 'epochs': 2, 'step': 0, 'steps': 0}, 'Starting', 0),
    ({'phase': 'PreparingData', 'epoch': 0, 'epochs': 2, 'step': 0, 'steps': 0, 'done': 340, 'total': 1000},
     'PreparingData 340/1000', 0),
    ({'phase': 'Validating', 'epoch': 1, 'epochs': 2, 'step': 0, 'steps': 16, 'done': 3, 'total': 10},
     'Validating 3/10', 0),
    ({'phase': 'Training', 'epoch': 2, 'epochs': 2, 'step': 8, 'steps': 16, 'loss': 0.4}, 'Training', 75),
    ({'epoch': 2, 'epochs': 2, 'step': 8, 'steps': 16, 'loss': 0.4}, 'Training', 75),   # an older trainer
], ids=['starting', 'preparing', 'validating', 'training', 'no-phase'])
def test_every_phase_is_a_heartbeat(payload, activity, percent):
    beat = parse_heartbeat(json.dumps({**payload, 'time': '2026-11-25T12:00:00Z'}))
    assert isinstance(beat, Heartbeat) and beat.activity == activity and beat.percent == percent
    status = beat.to_status(T0)
    assert status.get('activity') == (activity if 'phase' in payload else None)
    assert status['lastProgressTime'] == '2026-11-25T12:00:00Z'


@pytest.mark.parametrize('payload', [
    {'phase': 'Sleeping', 'epoch': 1, 'epochs': 2, 'step': 1, 'steps': 4},
    {'phase': 'Training', 'epoch': 0, 'epochs': 2, 'step': 0, 'steps': 4},     # training has an epoch
    {'phase': 'PreparingData', 'epoch': 0, 'epochs': 2, 'step': 0, 'steps': 0, 'done': -1, 'total': 9},
], ids=['unknown-phase', 'training-without-epoch', 'negative-done'])
def test_malformed_phase_beats_return_a_reason(payload):
    assert isinstance(parse_heartbeat(json.dumps(payload)), str)


def test_silence_in_a_phase_is_named_in_the_timeout():
    status = running(progress={'lastProgressTime': '2026-11-25T12:00:00Z', 'phase': 'PreparingData',
                               'done': 340, 'total': 1000, 'epoch': 0, 'epochs': 2, 'step': 0, 'steps': 0})
    result = judge_stall(status, T0 + datetime.timedelta(seconds=400), progress_timeout=300, startup_timeout=600)
    assert isinstance(result, Stalled) and result.reason == 'ProgressTimeout'
    assert result.message == 'no progress for 400s (last: hung in PreparingData (340/1000))'


def merge(progress: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386) of status.progress, as the API server applies it."""
    merged = {**progress, **patch}
    return {key: value for key, value in merged.items() if value is not None}


def test_a_phase_leaves_nothing_behind_in_the_merged_status():
    """A merge patch keeps keys the patch leaves out: the phase fields are written as null, so
    done/total of PreparingData do not outlive it and the next beat is seen as new."""
    preparing = parse_heartbeat(json.dumps({'phase': 'PreparingData', 'epoch': 0, 'epochs': 2, 'step': 0,
                                            'steps': 0, 'done': 340, 'total': 1000, 'detail': 'caching',
                                            'time': '2026-11-25T12:00:00Z'}))
    training = parse_heartbeat(json.dumps({**GOOD, 'phase': 'Training', 'time': '2026-11-25T12:00:01Z'}))
    assert isinstance(preparing, Heartbeat) and isinstance(training, Heartbeat)
    progress = merge({}, preparing.to_status(T0))
    assert progress['activity'] == 'PreparingData 340/1000 (caching)' and 'epoch' not in progress
    progress = merge(progress, training.to_status(T0))
    assert (progress['phase'], progress['activity']) == ('Training', 'Training')
    assert not {'done', 'total', 'detail'} & set(progress)
    assert training.same_beat(progress) and not preparing.same_beat(progress)


def test_data_preparation_keeps_a_resumed_runs_position():
    """Before training a beat has no epoch: the status keeps the last known one (attempt 2 of a
    run stopped at 50% shows 50% while its cache fills, not 0%)."""
    trained = parse_heartbeat(json.dumps(GOOD))
    preparing = parse_heartbeat(json.dumps({'phase': 'PreparingData', 'epoch': 0, 'epochs': 2, 'step': 0,
                                            'steps': 0, 'done': 3, 'total': 9, 'time': '2026-11-25T13:00:00Z'}))
    assert isinstance(trained, Heartbeat) and isinstance(preparing, Heartbeat)
    progress = merge(merge({}, trained.to_status(T0)), preparing.to_status(T0))
    assert (progress['epoch'], progress['step'], progress['percent']) == (1, 8, 25)
    assert progress['activity'] == 'PreparingData 3/9' and progress['loss'] == 0.4213
    assert preparing.same_beat(progress)


def test_an_older_trainers_beat_writes_no_phase():
    beat = parse_heartbeat(json.dumps(GOOD))
    assert isinstance(beat, Heartbeat)
    assert {key: beat.to_status(T0)[key] for key in ('phase', 'activity', 'done', 'total', 'detail')} == dict.fromkeys(
        ('phase', 'activity', 'done', 'total', 'detail'))


STARTING = {'lastProgressTime': '2026-11-25T12:00:10Z', 'phase': 'Starting', 'detail': 'joining 4 ranks',
            'epochs': 2}


@pytest.mark.parametrize(('progress', 'after', 'verdict'), [
    (STARTING, 100, Healthy), (STARTING, 599, Healthy),
    (STARTING, 620, Stalled('StartupTimeout', 'no progress for 610s while Starting (joining 4 ranks)'
                                              ' (startupTimeoutSeconds 600)', 610)),
    ({**STARTING, 'detail': None}, 700, Stalled('StartupTimeout', 'no progress for 690s while Starting'
                                                                  ' (startupTimeoutSeconds 600)', 690)),
    ({**STARTING, 'phase': 'PreparingData', 'done': 3, 'total': 9, 'detail': 'waiting for rank 1'}, 320,
     Stalled('ProgressTimeout', 'no progress for 310s (last: hung in PreparingData (3/9), waiting for rank 1)', 310)),
], ids=['setup-early', 'setup-just-in-time', 'setup-silent', 'setup-no-detail', 'gang-preparing-silent'])
def test_set_up_is_held_to_the_startup_timeout_and_the_rest_to_the_progress_timeout(progress, after, verdict):
    """Starting (imports, the rendezvous) counts no items: its silence is judged against
    startupTimeoutSeconds; data preparation counts items and is judged like training."""
    result = judge_stall(running(progress=progress), T0 + datetime.timedelta(seconds=after),
                         progress_timeout=300, startup_timeout=600)
    assert result == verdict if isinstance(verdict, Stalled) else isinstance(result, Healthy)
