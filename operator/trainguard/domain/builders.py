"""Plain-dict builders for everything the operator creates for a run (tested by whole-dict equality).

Every child has a deterministic name and an ownerReference to its run, so creating it is
idempotent and deleting the run removes it through the garbage collector.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

from trainguard.domain.policy import effective_device, effective_gpus
from trainguard.domain.spec import Hyperparameters, RunSpec
from trainguard.domain.template import merge

API_VERSION = 'trainguard.io/v1alpha1'
KIND = 'TrainingRun'
RUN_LABEL = 'trainguard.io/run'
ATTEMPT_LABEL = 'trainguard.io/attempt'
RANK_LABEL = 'trainguard.io/rank'      # node rank within a multi-node attempt
# Kueue's plain-Pod integration: the queue to wait in, and for a gang, one pod group admitted
# (and preempted) as a whole.
QUEUE_LABEL = 'kueue.x-k8s.io/queue-name'
POD_GROUP_LABEL = 'kueue.x-k8s.io/pod-group-name'
POD_GROUP_COUNT_ANNOTATION = 'kueue.x-k8s.io/pod-group-total-count'
# A group is never retried in place (a new attempt is a new group), so a failed member ends it
# and Kueue releases its quota instead of waiting for a replacement pod.
RETRIABLE_IN_GROUP_ANNOTATION = 'kueue.x-k8s.io/retriable-in-group'
MASTER_PORT = 29500                    # torchrun's default rendezvous port, on rank 0's pod
MANAGED_BY = 'trainguard'
RUN_IDENTITY, NAMESPACE_IDENTITY = 'run', 'namespace'
# The trainer identity shared by a namespace's runs, and the admission policy that narrows it
# (charts/trainguard and manifests/rbac install the policy under this name).
NAMESPACE_TRAINER_ACCOUNT = 'trainguard-trainer'
TRAINER_POLICY = 'trainguard-trainer-own-run'
TRAINER_UID = 10001
PREFETCH_FACTOR = 2       # torch DataLoader's default prefetch_factor
SHM_HEADROOM = 2          # room for pinned buffers and the collate copy


@dataclasses.dataclass(frozen=True)
class RunRef:
    name: str
    namespace: str
    uid: str


@dataclasses.dataclass(frozen=True)
class PodSettings:
    """Operator configuration that shapes every pod."""

    image: str
    heartbeat_seconds: int = 10
    gpu_image: str = ''   # for runs that request GPUs and set no spec.image; empty: `image`
    image_pull_policy: str = 'IfNotPresent'
    extra_env: tuple[tuple[str, str], ...] = ()
    # Whose token the trainer holds: RUN_IDENTITY, a ServiceAccount and Role per run;
    # NAMESPACE_IDENTITY, one per namespace, narrowed to the pod's own run by the
    # ValidatingAdmissionPolicy TRAINER_POLICY (README, "What a trainer may do").
    trainer_identity: str = 'run'


def label_value(text: str) -> str:
    """Label values are at most 63 characters; long run names keep a readable prefix and a hash."""
    if len(text) <= 63:
        return text
    return f'{text[:54]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}'


def pod_name(run_name: str, attempt: int, rank: int | None = None) -> str:
    """``<run>-<attempt>``; in a multi-node attempt ``<run>-<attempt>-<rank>``."""
    suffix = f'-{attempt}' if rank is None else f'-{attempt}-{rank}'
    base = run_name if len(run_name) + len(suffix) <= 253 else run_name[: 253 - len(suffix)]
    return base + suffix


def attempt_pod_names(run_name: str, attempt: int, num_nodes: int) -> list[str]:
    """Every pod of one attempt, rank 0 first; a single-node attempt keeps its historic name."""
    if num_nodes == 1:
        return [pod_name(run_name, attempt)]
    return [pod_name(run_name, attempt, rank) for rank in range(num_nodes)]


def dns_label(text: str, *, letter_first: bool = False) -> str:
    """A DNS label (at most 63 characters, no dots) that stays readable: long names keep a prefix
    and a hash. ``letter_first``: a Service name must start with a letter (RFC 1035)."""
    label = text.replace('.', '-')
    if letter_first and not label[:1].isalpha():
        label = f'tg-{label}'
    if len(label) > 63:
        label = f'{label[:54].rstrip("-")}-{hashlib.sha256(text.encode()).hexdigest()[:8]}'
    return label


def service_name(run_name: str) -> str:
    """The run's headless Service: the DNS subdomain of its multi-node pods."""
    return dns_label(run_name, letter_first=True)


def pod_hostname(run_name: str, attempt: int, rank: int) -> str:
    return dns_label(f'{run_name}-{attempt}-{rank}')


def pod_group_name(run_name: str, attempt: int) -> str:
    """One Kueue pod group per attempt (a label value: a DNS label, shortened with a hash if long)."""
    return dns_label(f'{run_name}-{attempt}')


def master_address(run_name: str, attempt: int) -> str:
    """Rank 0's DNS name, ``<hostname>.<service>``: resolved through the pod's namespace search
    path, so it holds whatever the cluster domain is, and a new attempt gets a new name."""
    return f'{pod_hostname(run_name, attempt, 0)}.{service_name(run_name)}'


def processes_per_pod(spec: RunSpec) -> int:
    """torchrun's nproc-per-node: one process per GPU on GPU nodes, one on CPU."""
    return effective_gpus(spec) if effective_device(spec) == 'gpu' else 1


def world_size(spec: RunSpec) -> int:
    return spec.num_nodes * processes_per_pod(spec)


def trainer_account_name(run_name: str) -> str:
    name = f'{run_name}-trainer'
    return name if len(name) <= 253 else f'{run_name[:235]}-{hashlib.sha256(run_name.encode()).hexdigest()[:8]}-t'


def pod_account_name(run_name: str, identity: str) -> str:
    """The ServiceAccount a trainer pod of this run runs as."""
    return NAMESPACE_TRAINER_ACCOUNT if identity == NAMESPACE_IDENTITY else trainer_account_name(run_name)


def owner_reference(run: RunRef) -> dict[str, Any]:
    return {'apiVersion': API_VERSION, 'kind': KIND, 'name': run.name, 'uid': run.uid,
            'controller': True, 'blockOwnerDeletion': True}


def labels(run: RunRef, component: str) -> dict[str, str]:
    return {
        'app.kubernetes.io/name': 'trainguard-trainer',
        'app.kubernetes.io/instance': label_value(run.name),
        'app.kubernetes.io/component': component,
        'app.kubernetes.io/part-of': 'trainguard',
        'app.kubernetes.io/managed-by': MANAGED_BY,
        RUN_LABEL: label_value(run.name),
    }


def _metadata(run: RunRef, name: str, component: str) -> dict[str, Any]:
    return {'name': name, 'namespace': run.namespace, 'labels': labels(run, component),
            'ownerReferences': [owner_reference(run)]}


def build_service_account(run: RunRef) -> dict[str, Any]:
    return {'apiVersion': 'v1', 'kind': 'ServiceAccount',
            'metadata': _metadata(run, trainer_account_name(run.name), 'trainer-identity')}


def build_role(run: RunRef) -> dict[str, Any]:
    """Exactly what the heartbeat needs: get and patch on this one TrainingRun."""
    return {
        'apiVersion': 'rbac.authorization.k8s.io/v1', 'kind': 'Role',
        'metadata': _metadata(run, trainer_account_name(run.name), 'trainer-identity'),
        'rules': [{'apiGroups': ['trainguard.io'], 'resources': ['trainingruns'],
                   'resourceNames': [run.name], 'verbs': ['get', 'patch']}],
    }


def build_role_binding(run: RunRef) -> dict[str, Any]:
    name = trainer_account_name(run.name)
    return {
        'apiVersion': 'rbac.authorization.k8s.io/v1', 'kind': 'RoleBinding',
        'metadata': _metadata(run, name, 'trainer-identity'),
        'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role', 'name': name},
        'subjects': [{'kind': 'ServiceAccount', 'name': name, 'namespace': run.namespace}],
    }


def _namespace_metadata(namespace: str) -> dict[str, Any]:
    """Shared by every run in the namespace: no owner (deleting a run must not take it), so
    it stays until removed by hand (`kubectl delete sa,role,rolebinding -l ...`)."""
    return {'name': NAMESPACE_TRAINER_ACCOUNT, 'namespace': namespace, 'labels': {
        'app.kubernetes.io/name': 'trainguard-trainer', 'app.kubernetes.io/component': 'trainer-identity',
        'app.kubernetes.io/part-of': 'trainguard', 'app.kubernetes.io/managed-by': MANAGED_BY}}


def build_namespace_service_account(namespace: str) -> dict[str, Any]:
    return {'apiVersion': 'v1', 'kind': 'ServiceAccount', 'metadata': _namespace_metadata(namespace)}


def build_namespace_role(namespace: str) -> dict[str, Any]:
    """get and patch on the namespace's TrainingRuns: on its own far too much, so the policy
    TRAINER_POLICY lets a token use it only on the run whose current pod holds the token, and
    only to write the two annotations of the heartbeat protocol."""
    return {
        'apiVersion': 'rbac.authorization.k8s.io/v1', 'kind': 'Role', 'metadata': _namespace_metadata(namespace),
        'rules': [{'apiGroups': ['trainguard.io'], 'resources': ['trainingruns'], 'verbs': ['get', 'patch']}],
    }


def build_namespace_role_binding(namespace: str) -> dict[str, Any]:
    return {
        'apiVersion': 'rbac.authorization.k8s.io/v1', 'kind': 'RoleBinding', 'metadata': _namespace_metadata(namespace),
        'roleRef': {'apiGroup': 'rbac.authorization.k8s.io', 'kind': 'Role', 'name': NAMESPACE_TRAINER_ACCOUNT},
        'subjects': [{'kind': 'ServiceAccount', 'name': NAMESPACE_TRAINER_ACCOUNT, 'namespace': namespace}],
    }


def build_service(run: RunRef) -> dict[str, Any]:
    """Headless, so each pod's ``<hostname>.<service>`` resolves to the pod itself; not-ready
    addresses are published because rank 1 must reach rank 0 before anything is ready."""
    return {
        'apiVersion': 'v1', 'kind': 'Service',
        'metadata': _metadata(run, service_name(run.name), 'trainer-network'),
        'spec': {
            'clusterIP': 'None',
            'selector': {RUN_LABEL: label_value(run.name), 'app.kubernetes.io/component': 'trainer'},
            'publishNotReadyAddresses': True,
            'ports': [{'name': 'rendezvous', 'port': MASTER_PORT, 'targetPort': MASTER_PORT, 'protocol': 'TCP'}],
        },
    }


def shm_size_mebibytes(hp: Hyperparameters) -> int:
    """/dev/shm for DataLoader workers: each holds prefetch x batch of float32 images and labels."""
    batch_bytes = hp.batch_size * hp.resolution * hp.resolution * 4 * 2
    in_flight = hp.num_workers * PREFETCH_FACTOR * batch_bytes * SHM_HEADROOM
    return max(64, math.ceil(in_flight / 2**20))


def trainer_args(spec: RunSpec, hp: Hyperparameters, device: str) -> list[str]:
    args = [
        '--device', device,
        '--batch-size', str(hp.batch_size),
        '--num-workers', str(hp.num_workers),
        '--epochs', str(hp.epochs),
        '--learning-rate', repr(hp.learning_rate),
        '--resolution', str(hp.resolution),
        '--crop-size', str(hp.crop_size),
        '--channels', ','.join(map(str, spec.model.channels)),
        '--strides', ','.join(map(str, spec.model.strides)),
        '--num-res-units', str(spec.model.num_res_units),
        '--dataset', spec.dataset.source,
        '--output-dir', '/output',
    ]
    if spec.dataset.source == 'synthetic':
        args += ['--num-samples', str(spec.dataset.num_samples)]
    else:
        args += ['--data-dir', spec.dataset.path]
        if spec.dataset.format != 'folders':
            args += ['--dataset-format', spec.dataset.format]
        if spec.dataset.spacing:
            args += ['--spacing', ','.join(f'{value:g}' for value in spec.dataset.spacing)]
    if spec.dataset.intensity_range:
        # One argument: a window starting below zero would read as an option to argparse.
        args.append('--intensity-range=' + ','.join(f'{value:g}' for value in spec.dataset.intensity_range))
    # Only what differs from the trainer's defaults: a 2D run's arguments stay as they were.
    if spec.model.spatial_dims != 2:
        args += ['--spatial-dims', str(spec.model.spatial_dims)]
    if spec.model.num_classes:
        args += ['--num-classes', str(spec.model.num_classes)]
    return args


def _resources(spec: RunSpec) -> dict[str, dict[str, str]]:
    resources = {section: dict(values) for section, values in spec.resources.items()}
    gpus = effective_gpus(spec)
    if gpus:
        resources.setdefault('limits', {})['nvidia.com/gpu'] = str(gpus)
    return resources


def _tolerations(spec: RunSpec, device: str) -> list[dict[str, Any]]:
    tolerations = [dict(item) for item in spec.tolerations]
    gpu_toleration = {'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}
    if device == 'gpu' and not any(item.get('key') == 'nvidia.com/gpu' for item in tolerations):
        tolerations.append(gpu_toleration)  # GPU nodes are commonly tainted so only GPU pods land there
    return tolerations


def trainer_image(spec: RunSpec, settings: PodSettings) -> str:
    """spec.image, else the CUDA image for runs that request GPUs, else the CPU image.

    The default image holds CPU-only torch: a GPU run on it could only fail (GPUUnavailable).
    """
    if spec.image:
        return spec.image
    return settings.gpu_image if settings.gpu_image and effective_device(spec) == 'gpu' else settings.image


def _launcher_env(run: RunRef, spec: RunSpec, attempt: int, rank: int) -> list[dict[str, str]]:
    """torchrun's contract, as its PET_* environment variables (one per command-line option)."""
    multi_node = spec.num_nodes > 1
    return [
        {'name': 'PET_NNODES', 'value': str(spec.num_nodes)},
        {'name': 'PET_NPROC_PER_NODE', 'value': str(processes_per_pod(spec))},
        {'name': 'PET_NODE_RANK', 'value': str(rank)},
        {'name': 'PET_MASTER_ADDR', 'value': master_address(run.name, attempt) if multi_node else '127.0.0.1'},
        {'name': 'PET_MASTER_PORT', 'value': str(MASTER_PORT)},
        # Restarting a rank in place cannot rejoin a gang whose peers failed: the operator
        # stops the whole attempt and starts the next one instead.
        {'name': 'PET_MAX_RESTARTS', 'value': '0'},
        # A collective waiting on a dead or frozen peer ends the process after this long, even
        # with the operator away; the operator stops a silent gang sooner (progressTimeoutSeconds).
        {'name': 'TRAINGUARD_COLLECTIVE_TIMEOUT_SECONDS',
         'value': str(max(spec.progress_timeout_seconds, spec.startup_timeout_seconds))},
    ]


def build_pod(run: RunRef, spec: RunSpec, hp: Hyperparameters, attempt: int, settings: PodSettings,
              simulate_hang_after_steps: int | None = None, rank: int = 0) -> dict[str, Any]:
    """One trainer pod; with numNodes > 1, the pod of one node rank in the attempt's gang.

    A single-process run (one node, at most one GPU) runs the image's entrypoint as it always
    did; a distributed one starts the same trainer through torchrun.
    """
    device = effective_device(spec)
    multi_node = spec.num_nodes > 1
    metadata = _metadata(run, pod_name(run.name, attempt, rank if multi_node else None), 'trainer')
    metadata['labels'][ATTEMPT_LABEL] = str(attempt)
    if multi_node:
        metadata['labels'][RANK_LABEL] = str(rank)
    if spec.queue_name:
        metadata['labels'][QUEUE_LABEL] = spec.queue_name
        if multi_node:   # identical on every member: Kueue admits the gang whole or not at all
            metadata['labels'][POD_GROUP_LABEL] = pod_group_name(run.name, attempt)
            metadata['annotations'] = {POD_GROUP_COUNT_ANNOTATION: str(spec.num_nodes),
                                       RETRIABLE_IN_GROUP_ANNOTATION: 'false'}
    env = [
        {'name': 'TRAINGUARD_RUN_NAME', 'value': run.name},
        {'name': 'TRAINGUARD_RUN_NAMESPACE', 'value': run.namespace},
        {'name': 'TRAINGUARD_ATTEMPT', 'value': str(attempt)},
        {'name': 'TRAINGUARD_HEARTBEAT_SECONDS', 'value': str(settings.heartbeat_seconds)},
        # The trainer's watchdog reports where it hangs at half of each timeout, well before
        # the operator stops the attempt (trainguard_trainer/watchdog.py).
        {'name': 'TRAINGUARD_STALL_REPORT_SECONDS', 'value': str(spec.progress_timeout_seconds / 2)},
        {'name': 'TRAINGUARD_STARTUP_REPORT_SECONDS', 'value': str(spec.startup_timeout_seconds / 2)},
        # A mid-epoch checkpoint at most this often; on SIGTERM it saves at the step it stops.
        {'name': 'TRAINGUARD_CHECKPOINT_INTERVAL_SECONDS', 'value': str(spec.checkpoint_interval_seconds)},
        {'name': 'HOME', 'value': '/tmp'},
        {'name': 'MPLCONFIGDIR', 'value': '/tmp/matplotlib'},
    ]
    if simulate_hang_after_steps is not None:
        env.append({'name': 'TRAINGUARD_SIMULATE_HANG_AFTER_STEPS', 'value': str(simulate_hang_after_steps)})
    distributed = world_size(spec) > 1
    if distributed:
        env += _launcher_env(run, spec, attempt, rank)
    env += [{'name': name, 'value': value} for name, value in settings.extra_env]
    volume_mounts = [{'name': 'tmp', 'mountPath': '/tmp'}, {'name': 'output', 'mountPath': '/output'}]
    # Only rank 0 writes checkpoints and metrics (and the other ranks receive its checkpoint over
    # the process group), so only rank 0 mounts the output claim: a ReadWriteOnce claim works.
    volumes: list[dict[str, Any]] = [
        {'name': 'tmp', 'emptyDir': {}},
        {'name': 'output', 'persistentVolumeClaim': {'claimName': spec.output_claim}}
        if spec.output_claim and rank == 0 else {'name': 'output', 'emptyDir': {}},
    ]
    if spec.dataset.source == 'directory':
        volume_mounts.append({'name': 'data', 'mountPath': spec.dataset.path, 'readOnly': True})
        volumes.append({'name': 'data', 'persistentVolumeClaim': {'claimName': spec.dataset.claim_name,
                                                                   'readOnly': True}})
    if hp.num_workers > 0:
        volume_mounts.append({'name': 'dshm', 'mountPath': '/dev/shm'})
        volumes.append({'name': 'dshm', 'emptyDir': {'medium': 'Memory', 'sizeLimit': f'{shm_size_mebibytes(hp)}Mi'}})
    container: dict[str, Any] = {
        'name': 'trainer',
        'image': trainer_image(spec, settings),
        'imagePullPolicy': settings.image_pull_policy,
        # The kubelet copies the log's last lines into the terminated state when the trainer
        # fails without writing /dev/termination-log: the operator quotes them in the status.
        'terminationMessagePolicy': 'FallbackToLogsOnError',
        'args': trainer_args(spec, hp, device),
        'env': env,
        'resources': _resources(spec),
        'volumeMounts': volume_mounts,
        'securityContext': {
            'allowPrivilegeEscalation': False,
            'readOnlyRootFilesystem': True,
            'runAsNonRoot': True,
            'capabilities': {'drop': ['ALL']},
        },
    }
    if distributed:
        container['command'] = ['torchrun']
        container['args'] = ['--module', 'trainguard_trainer', *container['args']]
        container['ports'] = [{'name': 'rendezvous', 'containerPort': MASTER_PORT, 'protocol': 'TCP'}]
    pod_spec: dict[str, Any] = {
        'restartPolicy': 'Never',
        'serviceAccountName': pod_account_name(run.name, settings.trainer_identity),
        'automountServiceAccountToken': True,
        # SIGTERM to SIGKILL: the trainer finishes its step, saves and exits (a drain loses no step).
        'terminationGracePeriodSeconds': spec.termination_grace_period_seconds,
        'securityContext': {
            'runAsNonRoot': True, 'runAsUser': TRAINER_UID, 'runAsGroup': TRAINER_UID, 'fsGroup': TRAINER_UID,
            'seccompProfile': {'type': 'RuntimeDefault'},
        },
        'containers': [container],
        'volumes': volumes,
    }
    if multi_node:  # <hostname>.<service> resolves to this pod (the master address, for rank 0)
        pod_spec['hostname'] = pod_hostname(run.name, attempt, rank)
        pod_spec['subdomain'] = service_name(run.name)
    if spec.node_selector:
        pod_spec['nodeSelector'] = dict(spec.node_selector)
    tolerations = _tolerations(spec, device)
    if tolerations:
        pod_spec['tolerations'] = tolerations
    # The run's template last: it adds to what is above and overrides none of it (domain.template).
    return merge({'apiVersion': 'v1', 'kind': 'Pod', 'metadata': metadata, 'spec': pod_spec}, spec.template)
