"""What kube-apiserver checks when the CRD is created, reproduced here (trainguard_sandbox.crd).

A current kube-apiserver refused the first TrainingRun CRD because two CEL rules could not
evaluate on their object's ``default: {}`` as written; that CRD is kept as a golden file
and must stay refused here, with the server's own messages.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.crd_schema import ROOT, load_crd, run_schema
from trainguard_sandbox.crd import _rule_errors_on, _walk, crd_problems

REFUSED = ROOT / 'tests' / 'manifests' / 'golden' / 'crd-refused-by-kube-apiserver-1.36.yaml'
SPEC = 'spec.versions[0].schema.openAPIV3Schema.properties[spec]'


def test_the_crd_is_accepted() -> None:
    assert [str(problem) for problem in crd_problems(load_crd())] == []


def test_the_crd_the_api_server_refused_is_refused_here_with_its_messages() -> None:
    problems = [str(problem) for problem in crd_problems(yaml.safe_load(REFUSED.read_text()))]
    assert (f'{SPEC}.properties[hyperparameters].default: Invalid value: "object": no such key: cropSize '
            'evaluating rule: spec.hyperparameters.cropSize must be less than or equal to '
            'spec.hyperparameters.resolution') in problems
    assert (f'{SPEC}.properties[model].default: Invalid value: "object": no such key: strides evaluating rule: '
            'spec.model.strides must have exactly one entry fewer than spec.model.channels') in problems


def _defaults_and_rules() -> list[tuple[str, dict[str, Any], Any]]:
    cases = []
    for path, node in _walk(run_schema(), 'openAPIV3Schema'):
        if 'default' in node and any('x-kubernetes-validations' in sub for _, sub in _walk(node, '')):
            cases.append((path.replace('openAPIV3Schema.properties', '').replace('.properties', ''), node,
                          node['default']))
    return cases


CASES = _defaults_and_rules()


@pytest.mark.parametrize(('node', 'default'), [(node, default) for _, node, default in CASES],
                         ids=[path for path, _, _ in CASES])
def test_every_rule_evaluates_cleanly_on_every_default_as_written(node, default) -> None:
    assert _rule_errors_on(node, copy.deepcopy(default), '') == []  # a create: transition rules do not run
    # An update that keeps the default: transition rules (oldSelf) run too, and must pass.
    assert _rule_errors_on(node, copy.deepcopy(default), '', copy.deepcopy(default)) == []


def test_a_transition_rule_refuses_a_change_and_only_on_update() -> None:
    node = run_schema()['properties']['spec']['properties']['numNodes']
    assert _rule_errors_on(node, 3, '.spec.numNodes') == []
    assert [str(refusal) for refusal in _rule_errors_on(node, 3, '.spec.numNodes', 2)] == [
        '.spec.numNodes: spec.numNodes cannot be changed once the run exists']


def test_the_rules_sit_under_defaults() -> None:
    """Not a vacuous table: each object with a rule also has a default to check it on."""
    assert sorted(path for path, _, _ in CASES) == ['[spec][dataset]', '[spec][hyperparameters]', '[spec][model]',
                                                    '[spec][numNodes]']


def _mutated(change) -> dict[str, Any]:
    crd = load_crd()
    change(crd['spec']['versions'][0]['schema']['openAPIV3Schema']['properties']['spec'])
    return crd


@pytest.mark.parametrize(('change', 'expected'), [
    (lambda spec: spec['properties']['model']['properties']['channels'].pop('maxItems'),
     f'{SPEC}.properties[model].properties[channels]: list without maxItems under a CEL rule'),
    (lambda spec: spec['properties']['image'].pop('maxLength'),
     f'{SPEC}.properties[image]: string without maxLength under a CEL rule'),
    (lambda spec: spec['properties']['nodeSelector'].pop('maxProperties'),
     f'{SPEC}.properties[nodeSelector]: map without maxProperties under a CEL rule'),
    (lambda spec: spec['properties']['gpus'].pop('type'),
     f'{SPEC}.properties[gpus].type: Required value: must not be empty for specified object fields'),
    (lambda spec: spec['x-kubernetes-validations'].append({'rule': 'self.gpus >', 'message': 'm'}),
     f'{SPEC}.x-kubernetes-validations: compilation failed'),
    (lambda spec: spec['x-kubernetes-validations'][0].update(fieldPath='.gpu'),
     f"{SPEC}.x-kubernetes-validations: Invalid value: '.gpu': fieldPath must be a valid path"),
    (lambda spec: spec['properties']['gpus'].update(default=-1),
     f'{SPEC}.properties[gpus].default: Invalid value: -1 is less than the minimum of 0'),
    (lambda spec: spec['properties']['gpus'].update({'e.g. numWorkers.': None}),
     f'{SPEC}.properties[gpus].e.g. numWorkers.: unknown field'),
], ids=['unbounded-list', 'unbounded-string', 'unbounded-map', 'not-structural', 'rule-does-not-compile',
        'field-path-unknown', 'default-out-of-bounds', 'unknown-keyword'])
def test_each_check_catches_what_the_server_refuses(change, expected) -> None:
    problems = [str(problem) for problem in crd_problems(_mutated(change))]
    assert any(problem.startswith(expected) for problem in problems), problems


def test_every_rule_field_path_is_supported_by_the_oldest_declared_kubernetes() -> None:
    """fieldPath needs 1.28: the chart and the README declare 1.28 as the oldest minor."""
    chart = yaml.safe_load((ROOT / 'charts' / 'trainguard' / 'Chart.yaml').read_text())
    assert chart['kubeVersion'] == '>=1.28.0-0'
    assert 'Kubernetes 1.28' in (ROOT / 'README.md').read_text()
