"""The operator's view of a run after its own writes: older watch events must not roll it back."""

from __future__ import annotations

from trainguard.domain.config import config_from_env
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
