"""Builders tested by whole-object equality against golden files (regenerate: UPDATE_GOLDEN=1)."""

from __future__ import annotations

import os
import pathlib

import pytest
import yaml

from trainguard.domain import builders
from trainguard.domain.policy import CpuLimits, apply_cpu_safety
from trainguard.domain.spec import parse_hyperparameters, parse_spec

GOLDEN = pathlib.Path(__file__).parent / 'golden'
RUN = builders.RunRef(name='unet-cpu', namespace='ml', uid='0f6c1c1e-0000-4000-8000-000000000001')
SETTINGS = builders.PodSettings(image='ghcr.io/trainguard/trainer:0.1.0', heartbeat_seconds=10)


def cpu_pod():
    spec = parse_spec({'hyperparameters': {'batchSize': 32, 'numWorkers': 2},
                       'resources': {'limits': {'cpu': 2, 'memory': '4Gi'}}})
    effective, _ = apply_cpu_safety(spec.hyperparameters, CpuLimits())
    return builders.build_pod(RUN, spec, effective, 1, SETTINGS)


def gpu_pod():
    spec = parse_spec({'device': 'gpu', 'hyperparameters': {'numWorkers': 4}, 'nodeSelector': {'gpu': 'true'},
                       'output': {'claimName': 'out'},
                       'dataset': {'source': 'directory', 'claimName': 'scans', 'path': '/data'}})
    return builders.build_pod(RUN, spec, spec.hyperparameters, 2, SETTINGS, simulate_hang_after_steps=None)


def gang_pod(rank: int, **spec):
    parsed = parse_spec({'numNodes': 2, 'hyperparameters': {'batchSize': 4, 'numWorkers': 0, 'resolution': 128,
                                                           'cropSize': 128},
                         'output': {'claimName': 'out'}, **spec})
    return builders.build_pod(RUN, parsed, parsed.hyperparameters, 3, SETTINGS, rank=rank)


def single_node_two_gpu_pod():
    spec = parse_spec({'gpus': 2})
    return builders.build_pod(RUN, spec, spec.hyperparameters, 1, SETTINGS)


# A complete template, as a shared GPU cluster asks of every pod (README, "Pod template").
TEMPLATE = {
    'metadata': {'labels': {'cost-center': 'radiology', 'kueue.x-k8s.io/priority-class': 'high'},
                 'annotations': {'sidecar.istio.io/inject': 'false'}},
    'spec': {
        'priorityClassName': 'training-high',
        'imagePullSecrets': [{'name': 'registry-credentials'}],
        'affinity': {'nodeAffinity': {'requiredDuringSchedulingIgnoredDuringExecution': {'nodeSelectorTerms': [
            {'matchExpressions': [{'key': 'nvidia.com/gpu.product', 'operator': 'In',
                                   'values': ['NVIDIA-H100-80GB-HBM3']}]}]}}},
        'topologySpreadConstraints': [{'maxSkew': 1, 'topologyKey': 'kubernetes.io/hostname',
                                       'whenUnsatisfiable': 'ScheduleAnyway',
                                       'labelSelector': {'matchLabels': {'team': 'radiology'}}}],
        'schedulerName': 'volcano',
        'runtimeClassName': 'nvidia',
        'securityContext': {'supplementalGroups': [2000]},
        'volumes': [{'name': 'dataset-cache', 'persistentVolumeClaim': {'claimName': 'cache', 'readOnly': True}}],
        'containers': [{'name': 'trainer',
                        'env': [{'name': 'MLFLOW_TRACKING_URI', 'value': 'http://mlflow.ml:5000'}],
                        'envFrom': [{'secretRef': {'name': 'mlflow-token'}}],
                        'volumeMounts': [{'name': 'dataset-cache', 'mountPath': '/cache', 'readOnly': True}]}],
    },
}


def template_pod(rank: int | None = None):
    raw = {'template': TEMPLATE, 'hyperparameters': {'batchSize': 4, 'numWorkers': 2, 'resolution': 128,
                                                     'cropSize': 128}}
    if rank is not None:
        raw['numNodes'] = 2
    parsed = parse_spec(raw)
    return builders.build_pod(RUN, parsed, parsed.hyperparameters, 2, SETTINGS, rank=rank or 0)


CASES = {
    'pod-cpu': cpu_pod,
    'pod-gpu': gpu_pod,
    'pod-2node-rank0': lambda: gang_pod(0),
    'pod-2node-rank1': lambda: gang_pod(1),
    'pod-2node-gpu-rank1': lambda: gang_pod(1, gpus=4),
    'pod-1node-2gpu': single_node_two_gpu_pod,
    'pod-queued': lambda: builders.build_pod(RUN, parse_spec({'queueName': 'team-a'}),
                                             parse_spec({}).hyperparameters, 1, SETTINGS),
    'pod-2node-queued-rank0': lambda: gang_pod(0, queueName='team-a'),
    'pod-2node-queued-rank1': lambda: gang_pod(1, queueName='team-a'),
    'service': lambda: builders.build_service(RUN),
    'serviceaccount': lambda: builders.build_service_account(RUN),
    'role': lambda: builders.build_role(RUN),
    'rolebinding': lambda: builders.build_role_binding(RUN),
    'pod-3d-decathlon': lambda: builders.build_pod(RUN, parse_spec({
        'model': {'spatialDims': 3, 'numClasses': 3},
        'dataset': {'source': 'directory', 'format': 'decathlon', 'claimName': 'msd-task09', 'path': '/data',
                    'spacing': [1.5, 1.5, 2.0], 'intensityRange': [-57, 164]},
        'hyperparameters': {'batchSize': 2, 'numWorkers': 0, 'resolution': 96, 'cropSize': 64}}),
        parse_hyperparameters({'batchSize': 2, 'numWorkers': 0, 'resolution': 96, 'cropSize': 64}), 1, SETTINGS),
    'pod-template': template_pod,
    'pod-2node-template-rank0': lambda: template_pod(0),
    'pod-2node-template-rank1': lambda: template_pod(1),
    'namespace-serviceaccount': lambda: builders.build_namespace_service_account('ml'),
    'namespace-role': lambda: builders.build_namespace_role('ml'),
    'namespace-rolebinding': lambda: builders.build_namespace_role_binding('ml'),
}


@pytest.mark.parametrize('name', list(CASES))
def test_builder_matches_golden(name):
    built = CASES[name]()
    path = GOLDEN / f'{name}.yaml'
    if os.environ.get('UPDATE_GOLDEN'):
        path.write_text(yaml.safe_dump(built, sort_keys=False))
    assert built == yaml.safe_load(path.read_text())


def test_role_allows_only_get_and_patch_on_its_own_run():
    assert builders.build_role(RUN)['rules'] == [{'apiGroups': ['trainguard.io'], 'resources': ['trainingruns'],
                                                  'resourceNames': ['unet-cpu'], 'verbs': ['get', 'patch']}]


@pytest.mark.parametrize(('identity', 'account'), [
    (builders.RUN_IDENTITY, 'unet-cpu-trainer'), (builders.NAMESPACE_IDENTITY, 'trainguard-trainer'),
], ids=['per-run', 'per-namespace'])
def test_the_pod_runs_as_the_chosen_trainer_identity(identity, account):
    spec = parse_spec({})
    settings = builders.PodSettings(image='x', trainer_identity=identity)
    assert builders.build_pod(RUN, spec, spec.hyperparameters, 1, settings)['spec']['serviceAccountName'] == account


def test_the_namespace_identity_is_shared_not_owned_by_a_run():
    """Deleting a run must not take the identity its namespace's other runs hold."""
    for child in (builders.build_namespace_service_account('ml'), builders.build_namespace_role('ml'),
                  builders.build_namespace_role_binding('ml')):
        assert 'ownerReferences' not in child['metadata'] and child['metadata']['name'] == 'trainguard-trainer'


@pytest.mark.parametrize(('workers', 'batch', 'resolution', 'expected'), [
    (1, 4, 128, 64), (2, 32, 256, 128), (4, 32, 512, 1024)])
def test_shm_is_sized_for_the_loader(workers, batch, resolution, expected):
    hp = parse_spec({'hyperparameters': {'numWorkers': workers, 'batchSize': batch, 'resolution': resolution,
                                         'cropSize': resolution}}).hyperparameters
    assert builders.shm_size_mebibytes(hp) == expected


def test_long_names_stay_valid_label_values():
    value = builders.label_value('x' * 100)
    assert len(value) == 63 and value.startswith('x' * 54)


@pytest.mark.parametrize(('spec', 'image'), [
    ({}, 'cpu-image'),
    ({'device': 'gpu'}, 'cuda-image'),
    ({'gpus': 2}, 'cuda-image'),
    ({'resources': {'limits': {'nvidia.com/gpu': '1'}}}, 'cuda-image'),
    ({'device': 'gpu', 'image': 'mine'}, 'mine'),
    ({'device': 'cpu', 'image': 'mine'}, 'mine'),
], ids=['cpu', 'device-gpu', 'gpus', 'gpu-resource', 'own-image-gpu', 'own-image-cpu'])
def test_gpu_runs_get_the_cuda_image_unless_they_name_one(spec, image):
    settings = builders.PodSettings(image='cpu-image', gpu_image='cuda-image')
    assert builders.trainer_image(parse_spec(spec), settings) == image


@pytest.mark.parametrize(('run', 'attempt', 'nodes', 'expected'), [
    ('unet', 2, 1, ['unet-2']),
    ('unet', 2, 3, ['unet-2-0', 'unet-2-1', 'unet-2-2']),
], ids=['single-node-keeps-its-name', 'gang'])
def test_attempt_pod_names(run, attempt, nodes, expected):
    assert builders.attempt_pod_names(run, attempt, nodes) == expected


@pytest.mark.parametrize(('run', 'service', 'master'), [
    ('unet', 'unet', 'unet-1-0.unet'),
    ('v1.unet', 'v1-unet', 'v1-unet-1-0.v1-unet'),
    ('3d-unet', 'tg-3d-unet', '3d-unet-1-0.tg-3d-unet'),
    ('a' * 80, 'a' * 54 + '-0f45e858', 'a' * 54 + '-f4d95f98.' + 'a' * 54 + '-0f45e858'),
], ids=['plain', 'dots', 'digit-first', 'long'])
def test_dns_names_are_valid_labels(run, service, master):
    assert builders.service_name(run) == service
    address = builders.master_address(run, 1)
    host, svc = address.split('.')
    assert svc == service and all(len(part) <= 63 for part in (host, svc))
    assert svc[0].isalpha() and address == master


def test_only_distributed_pods_use_torchrun():
    single = cpu_pod()['spec']['containers'][0]
    assert 'command' not in single and not any(item['name'].startswith('PET_') for item in single['env'])
    rank1 = gang_pod(1)
    env = {item['name']: item['value'] for item in rank1['spec']['containers'][0]['env']}
    assert rank1['spec']['containers'][0]['command'] == ['torchrun']
    assert {key: env[key] for key in env if key.startswith('PET_')} == {
        'PET_NNODES': '2', 'PET_NPROC_PER_NODE': '1', 'PET_NODE_RANK': '1', 'PET_MASTER_ADDR': 'unet-cpu-3-0.unet-cpu',
        'PET_MASTER_PORT': '29500', 'PET_MAX_RESTARTS': '0'}
    # Only rank 0 writes (and mounts) the output claim.
    volumes = {v['name']: v for v in rank1['spec']['volumes']}
    assert volumes['output'] == {'name': 'output', 'emptyDir': {}}
    assert {v['name']: v for v in gang_pod(0)['spec']['volumes']}['output']['persistentVolumeClaim'] == {
        'claimName': 'out'}


def test_a_gang_is_one_kueue_pod_group_per_attempt():
    members = [gang_pod(rank, queueName='team-a') for rank in (0, 1)]
    groups = {(pod['metadata']['labels']['kueue.x-k8s.io/pod-group-name'],
               pod['metadata']['annotations']['kueue.x-k8s.io/pod-group-total-count'],
               pod['metadata']['annotations']['kueue.x-k8s.io/retriable-in-group']) for pod in members}
    assert groups == {('unet-cpu-3', '2', 'false')}
    assert all(pod['metadata']['ownerReferences'][0]['kind'] == 'TrainingRun' for pod in members)
    unqueued = gang_pod(0)['metadata']
    assert 'kueue.x-k8s.io/queue-name' not in unqueued['labels'] and 'annotations' not in unqueued
    assert builders.pod_group_name('r' * 80, 12) == builders.dns_label('r' * 80 + '-12')
    assert len(builders.pod_group_name('r' * 80, 12)) <= 63
