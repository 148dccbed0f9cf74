"""GitOps: the Argo CD health check (Lua, run with lupa) and the Flux example."""

from __future__ import annotations

from typing import Any

import lupa
import pytest
import yaml

from tests.crd_schema import ROOT

LUA = (ROOT / 'gitops' / 'argocd' / 'trainingrun-health.lua').read_text()


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run the health script the way Argo CD does: `obj` is a global table, the script returns hs."""
    runtime = lupa.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(_to_lua(runtime, obj))
    result = runtime.execute(LUA)
    return {key: result[key] for key in ('status', 'message') if result[key] is not None}


def _to_lua(runtime: lupa.LuaRuntime, value: Any) -> Any:
    if isinstance(value, dict):
        return runtime.table_from({key: _to_lua(runtime, item) for key, item in value.items()})
    return value


@pytest.mark.parametrize(('status', 'expected'), [
    (None, {'status': 'Progressing', 'message': 'Waiting for the trainguard operator to pick up the run'}),
    ({'phase': 'Pending', 'reason': 'PodCreated', 'message': 'created trainer pod unet-1'},
     {'status': 'Progressing', 'message': 'PodCreated: created trainer pod unet-1'}),
    ({'phase': 'Running', 'reason': 'Training', 'message': 'training in pod unet-1', 'progress': {'percent': 40}},
     {'status': 'Progressing', 'message': 'Training: training in pod unet-1 (40%)'}),
    ({'phase': 'Succeeded', 'reason': 'Succeeded', 'message': 'training finished in pod unet-1'},
     {'status': 'Healthy', 'message': 'Succeeded: training finished in pod unet-1'}),
    ({'phase': 'Failed', 'reason': 'ProgressTimeout', 'message': 'no progress for 312s (last: epoch 1/2)'},
     {'status': 'Degraded', 'message': 'ProgressTimeout: no progress for 312s (last: epoch 1/2)'}),
    ({'phase': 'Suspended', 'reason': 'Suspended', 'message': 'suspended: no trainer pod runs'},
     {'status': 'Suspended', 'message': 'Suspended: suspended: no trainer pod runs'}),
    ({'phase': 'Running', 'reason': 'Disrupted', 'message': 'attempt 1 was disrupted'},
     {'status': 'Progressing', 'message': 'Disrupted: attempt 1 was disrupted'}),
    ({'phase': 'Queued', 'reason': 'Queued', 'message': 'waiting for admission (queue team-a)'},
     {'status': 'Progressing', 'message': 'Queued: waiting for admission (queue team-a)'}),
], ids=['no-status', 'pending', 'running', 'succeeded', 'failed', 'suspended', 'disrupted', 'queued'])
def test_argocd_health(status, expected):
    obj = {'apiVersion': 'trainguard.io/v1alpha1', 'kind': 'TrainingRun', 'metadata': {'name': 'unet'}}
    if status is not None:
        obj['status'] = status
    assert health(obj) == expected


def test_argocd_config_embeds_the_tested_script():
    docs = list(yaml.safe_load_all((ROOT / 'gitops' / 'argocd' / 'argocd-cm-patch.yaml').read_text()))
    data = docs[0]['data']
    assert data['resource.customizations.health.trainguard.io_TrainingRun'].strip() == LUA.strip()
    ignored = yaml.safe_load(data['resource.customizations.ignoreResourceUpdates.trainguard.io_TrainingRun'])
    assert '/metadata/annotations/trainguard.io~1progress' in ignored['jsonPointers']
    options = docs[1]['metadata']['annotations']['argocd.argoproj.io/compare-options']
    assert 'ServerSideDiff=true' in options and 'IncludeMutationWebhook=true' in options


def test_flux_example_waits_on_trainingruns():
    kustomization = yaml.safe_load((ROOT / 'gitops' / 'flux' / 'kustomization.yaml').read_text())
    assert kustomization['spec']['wait'] is True
    assert kustomization['spec']['healthChecks'][0]['kind'] == 'TrainingRun'
