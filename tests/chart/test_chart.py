"""The Helm chart: lint, render with several values files, validate every object, no drift from manifests/."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.crd_schema import ROOT, load_crd
from trainguard.domain.admission import CONFIGURATION_NAME

CHART = ROOT / 'charts' / 'trainguard'
BIN = pathlib.Path(sys.executable).parent
HELM = shutil.which('helm', path=str(BIN)) or shutil.which('helm')
VALUES_FILES = sorted((CHART / 'ci').glob('*-values.yaml'))
KUBERNETES_VERSION = '1.33'
# Kinds whose schemas are not part of Kubernetes itself (CRDs of other projects).
FOREIGN_KINDS = {'ServiceMonitor', 'PrometheusRule', 'Certificate', 'ClusterKopfPeering'}

if HELM is None:
    pytest.fail('helm is missing: `make test` installs it into .venv/bin (scripts/install_helm_kubectl.py)',
                pytrace=False)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check, timeout=120)


def render(values: pathlib.Path | None = None, *extra: str) -> list[dict[str, Any]]:
    args = ['template', 'tg', str(CHART), '--namespace', 'trainguard-system', *extra]
    if values:
        args += ['--values', str(values)]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def test_lint_strict():
    result = helm('lint', '--strict', str(CHART))
    assert '0 chart(s) failed' in result.stdout


@pytest.mark.parametrize('values', [None, *VALUES_FILES], ids=['defaults', *[p.stem for p in VALUES_FILES]])
def test_rendered_objects_are_valid_kubernetes(values):
    docs = render(values)
    assert 'Deployment' in [doc['kind'] for doc in docs]
    for doc in docs:
        if doc['kind'] in FOREIGN_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc['kind'] == kind]


def test_defaults_render_the_documented_install():
    docs = render()
    deployment = by_kind(docs, 'Deployment')[0]
    container = deployment['spec']['template']['spec']['containers'][0]
    env = {item['name']: item['value'] for item in container['env']}
    assert env['TRAINGUARD_CPU_MAX_BATCH_SIZE'] == '4' and env['TRAINGUARD_WEBHOOK'] == 'off'
    assert env['TRAINGUARD_TRAINER_IMAGE'] == 'ghcr.io/trainguard/trainer:0.1.0'
    assert env['TRAINGUARD_TRAINER_GPU_IMAGE'] == 'ghcr.io/trainguard/trainer:0.1.0-cuda'
    assert container['args'] == ['run', '--liveness=http://0.0.0.0:8080/healthz', '--standalone']
    assert container['securityContext']['readOnlyRootFilesystem'] is True
    assert deployment['spec']['strategy']['type'] == 'Recreate'
    assert not by_kind(docs, 'PodDisruptionBudget')
    crd = by_kind(docs, 'CustomResourceDefinition')[0]
    assert crd['metadata']['annotations'] == {'helm.sh/resource-policy': 'keep'}


def test_namespaced_mode_grants_roles_only_where_it_watches():
    docs = render(CHART / 'ci' / 'namespaced-values.yaml')
    roles = by_kind(docs, 'Role')
    assert sorted(role['metadata']['namespace'] for role in roles) == ['ml-team-a', 'ml-team-b']
    cluster_roles = {role['metadata']['name'] for role in by_kind(docs, 'ClusterRole')}
    assert 'tg-trainguard' not in cluster_roles and 'tg-trainguard-discovery' in cluster_roles
    env = {item['name']: item['value'] for item in
           by_kind(docs, 'Deployment')[0]['spec']['template']['spec']['containers'][0]['env']}
    assert env['TRAINGUARD_NAMESPACES'] == 'ml-team-a,ml-team-b'


def test_replicas_add_peering_and_a_disruption_budget():
    docs = render(CHART / 'ci' / 'replicas-values.yaml')
    container = by_kind(docs, 'Deployment')[0]['spec']['template']['spec']['containers'][0]
    assert '--peering=tg-trainguard' in container['args'] and '--standalone' not in container['args']
    assert by_kind(docs, 'PodDisruptionBudget') and by_kind(docs, 'ClusterKopfPeering')
    crd = next(doc for doc in by_kind(docs, 'CustomResourceDefinition') if doc['spec']['group'] == 'trainguard.io')
    assert 'annotations' not in crd['metadata']   # crds.keep: false


@pytest.mark.parametrize('values', [None, *VALUES_FILES], ids=['defaults', *[p.stem for p in VALUES_FILES]])
def test_no_object_is_of_a_kind_that_the_same_release_defines(values):
    """Helm maps every object of a release to a served kind before it creates anything, so an
    object whose CRD is a template of the same release fails `helm install` on a cluster
    without that CRD ("ensure CRDs are installed first"); `helm template` never notices.
    Such CRDs belong in crds/, which Helm installs first."""
    docs = render(values)
    templated = {(crd['spec']['group'], crd['spec']['names']['kind'])
                 for crd in by_kind(docs, 'CustomResourceDefinition')}
    clashes = [(doc['apiVersion'], doc['kind']) for doc in docs
               if (doc['apiVersion'].rpartition('/')[0], doc['kind']) in templated]
    assert clashes == []


def test_kinds_outside_kubernetes_come_from_crds_folder_or_a_documented_prerequisite():
    chart_crds = [yaml.safe_load(path.read_text()) for path in sorted((CHART / 'crds').glob('*.yaml'))]
    for crd in chart_crds:
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
    from_crds_folder = {crd['spec']['names']['kind'] for crd in chart_crds}
    assert from_crds_folder == {'ClusterKopfPeering'}
    prerequisites = {'ServiceMonitor': 'prometheus-operator', 'PrometheusRule': 'prometheus-operator',
                     'Certificate': 'cert-manager'}
    readme = (CHART / 'README.md').read_text()
    for kind, project in prerequisites.items():
        assert project in readme, f'the chart README must say that {kind} needs {project}'
    assert from_crds_folder | set(prerequisites) == FOREIGN_KINDS
    # `helm install` applies crds/ first; `helm template --include-crds` shows them in that order.
    docs = render(CHART / 'ci' / 'replicas-values.yaml', '--include-crds')
    kinds = [doc['kind'] for doc in docs]
    peering_crd = next(i for i, doc in enumerate(docs) if doc['kind'] == 'CustomResourceDefinition'
                       and doc['spec']['group'] == 'kopf.dev')
    assert peering_crd < kinds.index('ClusterKopfPeering')


def test_webhook_with_cert_manager():
    docs = render(CHART / 'ci' / 'webhook-values.yaml')
    env = {item['name']: item.get('value', item.get('valueFrom')) for item in
           by_kind(docs, 'Deployment')[0]['spec']['template']['spec']['containers'][0]['env']}
    assert env['TRAINGUARD_WEBHOOK'] == 'on'
    assert env['TRAINGUARD_WEBHOOK_HOST'] == 'tg-trainguard-webhook.trainguard-system.svc'
    # The API server reaches the webhook through its Service; failures are Events on the operator's Pod.
    assert env['TRAINGUARD_WEBHOOK_SERVICE'] == 'trainguard-system/tg-trainguard-webhook'
    assert env['POD_NAME'] == {'fieldRef': {'fieldPath': 'metadata.name'}}
    assert env['TRAINGUARD_WEBHOOK_CERT_DIR'] == '/etc/trainguard/webhook-tls'
    assert by_kind(docs, 'Certificate')[0]['spec']['issuerRef'] == {'name': 'cluster-ca', 'kind': 'ClusterIssuer'}
    assert by_kind(docs, 'ServiceMonitor')[0]['metadata']['labels']['release'] == 'prometheus'


@pytest.mark.parametrize(('flag', 'message'), [
    ('image.tagg=1', "additional properties 'tagg' not allowed"),
    ('replicas=2', "additional properties 'replicas' not allowed"),
    ('operator.logFormat=xml', 'logFormat'),
    ('rbac.scope=namespaced', 'minItems'),
], ids=['misspelled-nested', 'misspelled-top', 'bad-enum', 'namespaced-without-namespaces'])
def test_values_schema_refuses_mistakes(flag, message):
    result = helm('template', 'tg', str(CHART), '--set', flag, check=False)
    assert result.returncode != 0 and message in result.stderr


def test_feature_rules_only_when_the_feature_is_on():
    def operator_rules(docs):
        role = next(r for r in by_kind(docs, 'ClusterRole') if r['metadata']['name'] == 'tg-trainguard')
        return _rules(role['rules'])
    defaults = operator_rules(render())
    assert not any(group == 'kopf.dev' or resource.startswith('mutating') for group, resource, _ in defaults)
    # The trainer policy is read by name, only where the operator may share a trainer identity.
    policy_rules = [rule for rule in next(r for r in by_kind(render(), 'ClusterRole')
                                          if r['metadata']['name'] == 'tg-trainguard')['rules']
                    if rule['apiGroups'] == ['admissionregistration.k8s.io']]
    assert policy_rules == [{'apiGroups': ['admissionregistration.k8s.io'],
                             'resources': ['validatingadmissionpolicies', 'validatingadmissionpolicybindings'],
                             'resourceNames': ['trainguard-trainer-own-run'], 'verbs': ['get']}]
    per_run = operator_rules(render(None, '--set', 'operator.trainerIdentity=run'))
    assert not any(group == 'admissionregistration.k8s.io' for group, _, _ in per_run)
    assert ('kopf.dev', 'clusterkopfpeerings', 'patch') in operator_rules(render(CHART / 'ci' / 'replicas-values.yaml'))
    assert ('admissionregistration.k8s.io', 'mutatingwebhookconfigurations', 'patch') in operator_rules(
        render(CHART / 'ci' / 'webhook-values.yaml'))
    # Exactly what the operator's own registration needs (trainguard.webhook.Registration):
    role = next(r for r in by_kind(render(CHART / 'ci' / 'webhook-values.yaml'), 'ClusterRole')
                if r['metadata']['name'] == 'tg-trainguard')
    admission = [rule for rule in role['rules'] if rule['apiGroups'] == ['admissionregistration.k8s.io']
                 and rule['resources'][0].startswith('mutating')]
    assert admission == [
        {'apiGroups': ['admissionregistration.k8s.io'], 'resources': ['mutatingwebhookconfigurations'],
         'verbs': ['create']},
        {'apiGroups': ['admissionregistration.k8s.io'], 'resources': ['mutatingwebhookconfigurations'],
         'resourceNames': [CONFIGURATION_NAME], 'verbs': ['patch']}]


def _rules(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule['apiGroups']
            for resource in rule['resources'] for verb in rule['verbs']}


def test_no_drift_from_manifests():
    docs = render()
    chart_crd = by_kind(docs, 'CustomResourceDefinition')[0]
    manifest_crd = load_crd()
    assert chart_crd['spec'] == manifest_crd['spec']
    manifest_role = yaml.safe_load((ROOT / 'manifests' / 'rbac' / 'role.yaml').read_text())
    chart_role = next(role for role in by_kind(docs, 'ClusterRole') if role['metadata']['name'] == 'tg-trainguard')
    assert _rules(chart_role['rules']) == _rules(manifest_role['rules'])
    manifest_policy = list(yaml.safe_load_all((ROOT / 'manifests' / 'rbac' / 'trainer_policy.yaml').read_text()))
    chart_policy = [doc for doc in docs if doc['kind'].startswith('ValidatingAdmissionPolicy')]
    assert chart_policy == manifest_policy
    manifest_user_roles = {doc['metadata']['name'].removeprefix('trainguard-'): doc for doc in
                           yaml.safe_load_all((ROOT / 'manifests' / 'rbac' / 'trainingrun_roles.yaml').read_text())}
    for suffix, manifest in manifest_user_roles.items():
        chart = next(role for role in by_kind(docs, 'ClusterRole')
                     if role['metadata']['name'] == f'tg-trainguard-{suffix}')
        assert _rules(chart['rules']) == _rules(manifest['rules'])
        aggregate = {k: v for k, v in chart['metadata']['labels'].items() if k.startswith('rbac.authorization')}
        assert aggregate == {k: v for k, v in manifest['metadata']['labels'].items() if k.startswith('rbac.')}


@pytest.mark.parametrize(('args', 'rendered'), [
    ((), True), (('--kube-version', '1.29.0'), False), (('--set', 'operator.trainerIdentity=run'), False),
], ids=['1.30-and-later', 'before-1.30', 'identity-per-run'])
def test_the_trainer_policy_is_rendered_where_it_is_served_and_used(args, rendered):
    docs = render(None, *args)
    kinds = sorted(doc['kind'] for doc in docs if doc['kind'].startswith('ValidatingAdmissionPolicy'))
    assert kinds == (['ValidatingAdmissionPolicy', 'ValidatingAdmissionPolicyBinding'] if rendered else [])
    env = {item['name']: item['value'] for item in
           by_kind(docs, 'Deployment')[0]['spec']['template']['spec']['containers'][0]['env']}
    assert env['TRAINGUARD_TRAINER_IDENTITY'] == ('run' if 'operator.trainerIdentity=run' in args else 'auto')


def test_manifests_render_with_kustomize_and_validate():
    kubectl = shutil.which('kubectl', path=str(BIN)) or shutil.which('kubectl')
    assert kubectl, 'kubectl is missing: `make test` installs it into .venv/bin'
    output = subprocess.run([kubectl, 'kustomize', str(ROOT / 'manifests' / 'default')], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    docs = [doc for doc in yaml.safe_load_all(output) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    namespaces = {doc['metadata'].get('namespace') for doc in docs if doc['kind'] in ('Deployment', 'ServiceAccount')}
    assert namespaces == {'trainguard-system'}
    binding = next(doc for doc in docs if doc['kind'] == 'ClusterRoleBinding')
    assert binding['subjects'][0]['namespace'] == 'trainguard-system'
