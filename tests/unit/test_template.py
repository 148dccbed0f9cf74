"""spec.template: what a run may add to its pods, and what stays the operator's (trainguard.domain.template)."""

from __future__ import annotations

import dataclasses

import pytest

from trainguard.domain import builders
from trainguard.domain.spec import SpecError, parse_spec
from trainguard.domain.template import PRIORITY_LABEL, PodTemplate, parse_template, with_run_priority

RUN = builders.RunRef(name='r', namespace='ml', uid='u')
SETTINGS = builders.PodSettings(image='trainer:1')


def trainer(**fields):
    return {'spec': {'containers': [{'name': 'trainer', **fields}]}}


@pytest.mark.parametrize(('template', 'field', 'why'), [
    ({'metadata': {'labels': {'trainguard.io/run': 'x'}}}, 'spec.template.metadata.labels.trainguard.io/run',
     'set by the operator'),
    ({'metadata': {'labels': {'app.kubernetes.io/name': 'x'}}}, 'spec.template.metadata.labels.app.kubernetes.io/name',
     'set by the operator'),
    ({'metadata': {'labels': {'kueue.x-k8s.io/pod-group-name': 'x'}}},
     'spec.template.metadata.labels.kueue.x-k8s.io/pod-group-name', 'set by the operator'),
    ({'metadata': {'annotations': {'kueue.x-k8s.io/retriable-in-group': 'true'}}},
     'spec.template.metadata.annotations.kueue.x-k8s.io/retriable-in-group', 'set by the operator'),
    ({'metadata': {'labels': {'team': 3}}}, 'spec.template.metadata.labels.team', 'must be a string'),
    ({'spec': {'nodeSelector': {'a': 'b'}}}, 'spec.template.spec.nodeSelector', 'spec has its own field'),
    ({'spec': {'containers': [{'name': 'sidecar'}]}}, 'spec.template.spec.containers', 'named trainer'),
    (trainer(command=['sh']), 'spec.template.spec.containers[0].command', "trainer's image, command"),
    (trainer(resources={'limits': {'cpu': '64'}}), 'spec.template.spec.containers[0].resources', 'resources'),
    (trainer(securityContext={'privileged': True}), 'spec.template.spec.containers[0].securityContext',
     'securityContext are the operator'),
    (trainer(env=[{'name': 'TRAINGUARD_RUN_NAME', 'value': 'x'}]), 'spec.template.spec.containers[0].env[0].name',
     'set by the operator'),
    (trainer(env=[{'name': 'MASTER_ADDR', 'value': 'x'}]), 'spec.template.spec.containers[0].env[0].name',
     'set by the operator'),
    (trainer(volumeMounts=[{'name': 'shm', 'mountPath': '/dev/shm'}]),
     'spec.template.spec.containers[0].volumeMounts[0].mountPath', 'under /dev/shm'),
    (trainer(volumeMounts=[{'name': 'x', 'mountPath': '/tmp/cache'}]),
     'spec.template.spec.containers[0].volumeMounts[0].mountPath', 'under /tmp'),
    (trainer(volumeMounts=[{'name': 'x', 'mountPath': '/data/more'}]),
     'spec.template.spec.containers[0].volumeMounts[0].mountPath', 'under /data'),
    (trainer(volumeMounts=[{'name': 'output', 'mountPath': '/elsewhere'}]),
     'spec.template.spec.containers[0].volumeMounts[0].name', 'mounted by the operator'),
    ({'spec': {'volumes': [{'name': 'dshm', 'emptyDir': {}}]}}, 'spec.template.spec.volumes[0].name',
     "volume of the operator's"),
    ({'spec': {'securityContext': {'runAsNonRoot': False}}}, 'spec.template.spec.securityContext.runAsNonRoot',
     'non-root'),
    ({'spec': {'securityContext': {'runAsUser': 0}}}, 'spec.template.spec.securityContext.runAsUser', 'root'),
    ({'spec': {'securityContext': {'seccompProfile': {'type': 'Unconfined'}}}},
     'spec.template.spec.securityContext.seccompProfile.type', 'seccomp'),
    ({'spec': {'volumes': {'name': 'x'}}}, 'spec.template.spec.volumes', 'list of objects'),
    ('everything', 'spec.template', 'must be an object'),
], ids=['operator-label', 'app-label', 'pod-group-label', 'kueue-annotation', 'label-not-string', 'node-selector',
        'second-container', 'command', 'resources', 'privileged', 'trainguard-env', 'launcher-env', 'dev-shm',
        'under-tmp', 'under-data-path', 'operator-volume-mounted', 'operator-volume-name', 'run-as-root-allowed',
        'user-0', 'unconfined', 'volumes-not-a-list', 'not-an-object'])
def test_what_the_operator_owns_is_refused_naming_the_field(template, field, why):
    with pytest.raises(SpecError) as refused:
        parse_spec({'template': template})
    assert refused.value.field == field and why in refused.value.problem, refused.value


def test_the_data_path_counts_wherever_the_run_puts_it():
    with pytest.raises(SpecError, match='under /scans'):
        parse_spec({'dataset': {'source': 'directory', 'claimName': 'c', 'path': '/scans'},
                    'template': trainer(volumeMounts=[{'name': 'x', 'mountPath': '/scans'}])})


def test_an_empty_template_changes_no_pod():
    spec = parse_spec({})
    assert spec.template.empty
    plain = builders.build_pod(RUN, spec, spec.hyperparameters, 1, SETTINGS)
    assert builders.build_pod(RUN, parse_spec({'template': {}}), spec.hyperparameters, 1, SETTINGS) == plain


@pytest.mark.parametrize(('run_labels', 'template_labels', 'expected'), [
    ({PRIORITY_LABEL: 'high'}, {}, 'high'),
    ({PRIORITY_LABEL: 'high'}, {PRIORITY_LABEL: 'low'}, 'low'),
    ({}, {PRIORITY_LABEL: 'low'}, 'low'),
    ({}, {}, None),
], ids=['from-the-run', 'template-wins', 'template-only', 'none'])
def test_the_runs_kueue_priority_reaches_its_pods(run_labels, template_labels, expected):
    template = with_run_priority(PodTemplate(labels=template_labels), run_labels)
    spec = parse_spec({})
    pod = builders.build_pod(RUN, dataclasses.replace(spec, template=template), spec.hyperparameters, 1, SETTINGS)
    assert pod['metadata']['labels'].get(PRIORITY_LABEL) == expected


def test_the_pod_security_context_is_laid_over_the_operators():
    spec = parse_spec({'template': {'spec': {'securityContext': {'fsGroup': 3000, 'supplementalGroups': [5]}}}})
    pod = builders.build_pod(RUN, spec, spec.hyperparameters, 1, SETTINGS)
    assert pod['spec']['securityContext'] == {'runAsNonRoot': True, 'runAsUser': 10001, 'runAsGroup': 10001,
                                              'fsGroup': 3000, 'supplementalGroups': [5],
                                              'seccompProfile': {'type': 'RuntimeDefault'}}


def test_parse_template_keeps_only_the_fields_given():
    parsed = parse_template({'spec': {'priorityClassName': 'high', 'schedulerName': ''}})
    assert parsed.pod == {'priorityClassName': 'high'} and not parsed.container
