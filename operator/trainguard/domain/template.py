"""``spec.template``: what a run adds to every trainer pod, and what stays the operator's.

Shared clusters ask things of every pod that trainguard cannot guess: a PriorityClass, pull
secrets for a private registry, affinity and spread, another scheduler or runtime class,
cost-allocation labels, a sidecar opt-out annotation, env from a Secret, a shared volume.
A run says them in ``spec.template`` (a subset of a PodTemplateSpec, with Kubernetes' own
types in the CRD), and the operator merges it into every pod of every attempt, all ranks
alike (``merge``).

What the operator relies on cannot be overridden, and a run that tries is refused naming the
field, by the CRD's CEL rules at ``kubectl apply`` (generated from the constants here by
scripts/crd_template_schema.py) and again here (``parse_template``: Failed/InvalidSpec for a
run admitted without those rules): its labels and Kueue labels, the volumes it mounts and
their paths, the environment it sets, a pod that would run as root or without seccomp. The
trainer's command, arguments, image, resources and container securityContext are not
template fields at all (the CRD refuses them as unknown fields).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from trainguard.domain.errors import SpecError

RESERVED_PREFIXES = ('trainguard.io/', 'app.kubernetes.io/')
RESERVED_KUEUE = ('kueue.x-k8s.io/queue-name', 'kueue.x-k8s.io/pod-group-name',
                  'kueue.x-k8s.io/pod-group-total-count', 'kueue.x-k8s.io/retriable-in-group')
RESERVED_VOLUMES = ('tmp', 'output', 'data', 'dshm')
RESERVED_PATHS = ('/tmp', '/output', '/dev/shm')
RESERVED_ENV = ('HOME', 'MPLCONFIGDIR', 'MASTER_ADDR', 'MASTER_PORT', 'WORLD_SIZE', 'RANK', 'LOCAL_RANK',
                'NODE_RANK', 'NCCL_ASYNC_ERROR_HANDLING', 'TORCH_NCCL_ASYNC_ERROR_HANDLING', 'OMP_NUM_THREADS')
RESERVED_ENV_PREFIXES = ('TRAINGUARD_', 'PET_')
PRIORITY_LABEL = 'kueue.x-k8s.io/priority-class'   # Kueue's workload priority: a run's own label reaches its pods
POD_FIELDS = ('priorityClassName', 'imagePullSecrets', 'affinity', 'topologySpreadConstraints', 'schedulerName',
              'runtimeClassName', 'securityContext', 'volumes')
CONTAINER_FIELDS = ('env', 'envFrom', 'volumeMounts')


@dataclasses.dataclass(frozen=True)
class PodTemplate:
    """The parsed template: plain JSON values, passed to the pods as written."""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    pod: Mapping[str, Any] = dataclasses.field(default_factory=dict)        # POD_FIELDS present
    container: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # CONTAINER_FIELDS present

    @property
    def empty(self) -> bool:
        return not (self.labels or self.annotations or self.pod or self.container)


def _reserved_key(key: str) -> bool:
    return key.startswith(RESERVED_PREFIXES) or key in RESERVED_KUEUE


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip('/') + '/')


def _object(raw: Any, field: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpecError(field, f'must be an object, got {raw!r}')
    return raw


def _list(raw: Any, field: str) -> list[Mapping[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, Mapping) for item in raw):
        raise SpecError(field, f'must be a list of objects, got {raw!r}')
    return raw


def _strings(raw: Any, field: str, what: str) -> dict[str, str]:
    values = dict(_object(raw, field))
    for key, value in values.items():
        if not isinstance(value, str):
            raise SpecError(f'{field}.{key}', f'must be a string, got {value!r}')
        if _reserved_key(key):
            raise SpecError(f'{field}.{key}', f'{what} under trainguard.io/ and app.kubernetes.io/, and the Kueue '
                                              f'queue and pod-group {what}, are set by the operator')
    return values


def parse_template(raw: Any, data_path: str = '/data') -> PodTemplate:
    """``spec.template`` checked against what the operator owns; SpecError names the field."""
    template = _object(raw, 'spec.template')
    metadata = _object(template.get('metadata'), 'spec.template.metadata')
    spec = _object(template.get('spec'), 'spec.template.spec')
    labels = _strings(metadata.get('labels'), 'spec.template.metadata.labels', 'labels')
    annotations = _strings(metadata.get('annotations'), 'spec.template.metadata.annotations', 'annotations')
    unknown = sorted(set(spec) - {*POD_FIELDS, 'containers'})
    if unknown:
        raise SpecError(f'spec.template.spec.{unknown[0]}', 'is not a template field: the operator sets it, or the '
                                                            'spec has its own field for it (nodeSelector, '
                                                            'tolerations, resources)')
    pod = {key: copy.deepcopy(spec[key]) for key in POD_FIELDS if spec.get(key) not in (None, '', [], {})}
    for index, volume in enumerate(_list(pod.get('volumes'), 'spec.template.spec.volumes')):
        if volume.get('name') in RESERVED_VOLUMES:
            raise SpecError(f'spec.template.spec.volumes[{index}].name',
                            f'{volume.get("name")!r} is a volume of the operator\'s (tmp, output, data, dshm)')
    security = _object(pod.get('securityContext'), 'spec.template.spec.securityContext')
    if security.get('runAsNonRoot') is False:
        raise SpecError('spec.template.spec.securityContext.runAsNonRoot', 'trainer pods run as non-root')
    if security.get('runAsUser') == 0:
        raise SpecError('spec.template.spec.securityContext.runAsUser', 'trainer pods do not run as root (user 0)')
    if (_object(security.get('seccompProfile'), 'spec.template.spec.securityContext.seccompProfile')
            .get('type') == 'Unconfined'):
        raise SpecError('spec.template.spec.securityContext.seccompProfile.type', 'trainer pods keep a seccomp profile')
    containers = _list(spec.get('containers'), 'spec.template.spec.containers')
    if len(containers) > 1 or any(container.get('name') != 'trainer' for container in containers):
        raise SpecError('spec.template.spec.containers', 'may hold one entry, named trainer: the trainer container')
    container_raw = containers[0] if containers else {}
    unknown = sorted(set(container_raw) - {'name', *CONTAINER_FIELDS})
    if unknown:
        raise SpecError(f'spec.template.spec.containers[0].{unknown[0]}',
                        "is not a template field: the trainer's image, command, arguments, resources and "
                        'securityContext are the operator\'s')
    container = {key: copy.deepcopy(container_raw[key]) for key in CONTAINER_FIELDS if container_raw.get(key)}
    for index, variable in enumerate(_list(container.get('env'), 'spec.template.spec.containers[0].env')):
        name = str(variable.get('name', ''))
        if name.startswith(RESERVED_ENV_PREFIXES) or name in RESERVED_ENV:
            raise SpecError(f'spec.template.spec.containers[0].env[{index}].name',
                            f'{name} is set by the operator (TRAINGUARD_*, PET_*, HOME, MPLCONFIGDIR and the '
                            'distributed launcher\'s variables)')
    _list(container.get('envFrom'), 'spec.template.spec.containers[0].envFrom')
    for index, mount in enumerate(_list(container.get('volumeMounts'),
                                        'spec.template.spec.containers[0].volumeMounts')):
        path, field = str(mount.get('mountPath', '')), f'spec.template.spec.containers[0].volumeMounts[{index}]'
        if mount.get('name') in RESERVED_VOLUMES:
            raise SpecError(f'{field}.name', f'{mount.get("name")!r} is mounted by the operator')
        for reserved in (*RESERVED_PATHS, data_path):
            if _under(path, reserved):
                raise SpecError(f'{field}.mountPath', f'{path} is under {reserved}, which the operator mounts')
    return PodTemplate(labels=labels, annotations=annotations, pod=pod, container=container)


def with_run_priority(template: PodTemplate, run_labels: Mapping[str, str]) -> PodTemplate:
    """The run's own Kueue priority label reaches its pods too (the template's wins), as the
    run's queue label does: Kueue reads a plain pod's priority from the pod."""
    priority = run_labels.get(PRIORITY_LABEL)
    if not priority or PRIORITY_LABEL in template.labels:
        return template
    return dataclasses.replace(template, labels={PRIORITY_LABEL: priority, **template.labels})


def merge(pod: dict[str, Any], template: PodTemplate) -> dict[str, Any]:
    """The pod with the template merged in (a new dict): labels and annotations added (the
    operator's win, though parse_template already refused a clash), pod fields set, the pod
    securityContext's keys laid over the operator's, volumes, env and mounts appended after the
    operator's."""
    if template.empty:
        return pod
    merged = copy.deepcopy(pod)
    metadata, spec = merged['metadata'], merged['spec']
    if template.labels:
        metadata['labels'] = {**template.labels, **metadata.get('labels', {})}
    if template.annotations:
        metadata['annotations'] = {**template.annotations, **metadata.get('annotations', {})}
    for key, value in template.pod.items():
        if key == 'securityContext':
            spec['securityContext'] = {**spec.get('securityContext', {}), **copy.deepcopy(value)}
        elif key == 'volumes':
            spec['volumes'] = [*spec.get('volumes', []), *copy.deepcopy(value)]
        else:
            spec[key] = copy.deepcopy(value)
    trainer = next(container for container in spec['containers'] if container['name'] == 'trainer')
    for key in ('env', 'volumeMounts'):
        if template.container.get(key):
            trainer[key] = [*trainer.get(key, []), *copy.deepcopy(template.container[key])]
    if template.container.get('envFrom'):
        trainer['envFrom'] = copy.deepcopy(template.container['envFrom'])
    return merged
