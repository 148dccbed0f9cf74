"""The operator's view of a run after its own writes: older watch events must not roll it back."""

from __future__ import annotations

import datetime

from trainguard.domain.config import config_from_env
from trainguard.domain.pods import PodState
from trainguard.domain.reconcile import conditions
from trainguard.runtime import Runtime


def body(rv: str, status: dict | None = None, annotations: dict | None = None) -> dict:
    return {'metadata': {'namespace': 'ns', 'name': 'r', 'resourceVersion': rv, 'annotations': annotations or {}},
            'status': status or {}}


def runtime() -> Runtime:
    return Runtime(config=config_from_env({}), api=None)  # observe_run never calls the API


def test_events_from_before_our_write_are_skipped():
    view = runtime()
    view.observe_run(body('1'))
    view._remember(('ns', 'r'), body('3', {'phase': 'Running'}))
    view.observe_run(body('2', {'phase': 'Pending'}))          # delivered late, older than our write
    assert view.runs[('ns', 'r')]['status'] == {'phase': 'Running'}


def test_a_merged_event_newer_than_our_write_is_taken():
    # kopf may merge our write's event (rv 3) with the trainer's heartbeat (rv 4): rv 3 never arrives.
    view = runtime()
    view._remember(('ns', 'r'), body('3', {'phase': 'Running'}))
    view.observe_run(body('4', {'phase': 'Running'}, {'trainguard.io/progress': '{}'}))
    assert view.runs[('ns', 'r')]['metadata']['annotations'] == {'trainguard.io/progress': '{}'}
    view.observe_run(body('5', {'phase': 'Running'}, {'trainguard.io/progress': '{"step": 2}'}))
    assert view.runs[('ns', 'r')]['metadata']['resourceVersion'] == '5'


def test_a_deleted_run_leaves_nothing_behind():
    view = runtime()
    view.observe_run(body('1', {'phase': 'Running', 'attempts': 2}))
    view.pods[('ns', 'r-1')] = view.pods[('ns', 'r-2')] = view.pods[('ns', 'other-1')] = None
    view.forget_run(('ns', 'r'))
    assert view.runs == {} and list(view.pods) == [('ns', 'other-1')]


def test_the_echo_of_our_own_write_is_recognised_and_nothing_else_is():
    view = runtime()
    view._remember(('ns', 'r'), body('3', {'phase': 'Running'}))
    assert view.is_own_echo(body('3', {'phase': 'Running'}))
    assert not view.is_own_echo(body('4', {'phase': 'Running'}, {'trainguard.io/progress': '{}'}))  # a heartbeat
    assert not view.is_own_echo({**body('3'), 'metadata': {**body('3')['metadata'], 'name': 'other'}})


def test_an_event_that_changes_nothing_is_settled_on_the_loop_without_the_api():
    """A Running run whose pod is Running and already mirrored: the pure reconcile plans nothing."""
    view = runtime()
    run = {'metadata': {'namespace': 'ns', 'name': 'r', 'uid': 'u', 'generation': 1, 'resourceVersion': '5'},
           'spec': {'device': 'cpu', 'cpuSafety': 'off'}}
    view.observe_run(run)
    first = view.settled(('ns', 'r'))     # no status yet and its pod never seen: creating is work
    assert first is False
    view.pods[('ns', 'r-1')] = PodState('Running', 'Training', 'the trainer is running')
    view.clock = lambda: datetime.datetime(2026, 11, 27, tzinfo=datetime.UTC)
    status = {'phase': 'Running', 'reason': 'Training', 'message': 'training in pod r-1', 'attempts': 1,
              'podName': 'r-1', 'nodes': '1/1', 'device': 'cpu', 'observedGeneration': 1,
              'attemptStartTime': '2026-11-26T23:59:50Z', 'startTime': '2026-11-26T23:59:50Z'}
    status['conditions'] = conditions('Running', 'Training', 'training in pod r-1', 1, [], view.clock())
    view.observe_run({**run, 'status': status})
    assert view.settled(('ns', 'r')) is True
    view.pods[('ns', 'r-1')] = PodState('Succeeded', 'Completed', 'training finished')
    assert view.settled(('ns', 'r')) is False   # the pod finished: a status write is due
