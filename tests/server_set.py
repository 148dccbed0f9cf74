"""What an API server adds to each kind of object the operator creates.

The operator tier holds the emulator to it (tests/operator/test_emulator_server_set.py) and the
apiserver tier holds the golden file to a real kube-apiserver (tests/apiserver), so the
emulator cannot drift from what the operator and the sandbox's kubelet read on a real server
(a pod's ``status.phase``: the emulator once left it empty, and the pod runner, deciding by
it, started no pod on a real server).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

from trainguard.domain import builders, reconcile
from trainguard.domain.spec import parse_hyperparameters, parse_spec

GOLDEN = pathlib.Path(__file__).parent / 'operator' / 'golden' / 'server-set-fields-1.36.yaml'
# The paths compared: what the operator and the pod runner read or rely on. Spec defaulting
# (restartPolicy, dnsPolicy, schedulerName, a container's terminationMessagePath ...) and the
# admission plugins' additions (the service account token volume, default tolerations) are
# recorded in the golden file but not required of the emulator: nothing here reads them.
COMPARED = ('metadata.', 'status')


def children(namespace: str) -> list[dict[str, Any]]:
    """One of each kind the operator creates for a two-node run, built by the operator's own builders."""
    ref = builders.RunRef('golden', namespace, '00000000-0000-0000-0000-000000000001')
    spec = parse_spec({'numNodes': 2, 'device': 'cpu'})
    settings = reconcile.Settings()
    pod = builders.build_pod(ref, spec, parse_hyperparameters({}), 1, settings.pod, None, 0)
    documents = [builders.build_service_account(ref), builders.build_role(ref), builders.build_role_binding(ref),
                 builders.build_service(ref), pod]
    for document in documents:   # an owner reference to a run that does not exist is not the point here
        document['metadata'].pop('ownerReferences', None)
    return documents


def paths(value: Any, prefix: str = '') -> Iterator[str]:
    """Every leaf path of a JSON object (list items as ``[]``)."""
    if isinstance(value, Mapping):
        if not value and prefix:
            yield prefix
        for key, item in value.items():
            yield from paths(item, f'{prefix}.{key}' if prefix else str(key))
    elif isinstance(value, list):
        if not value:
            yield prefix
        for item in value:
            yield from paths(item, f'{prefix}[]')
    else:
        yield prefix


def server_set(sent: Mapping[str, Any], answered: Mapping[str, Any]) -> set[str]:
    """The paths the server's answer has that the request did not (server-side apply's
    bookkeeping, ``metadata.managedFields``, as one path)."""
    found = set(paths(answered)) - set(paths(sent))
    return {'metadata.managedFields' if path.startswith('metadata.managedFields') else path for path in found}


def compared(found: set[str]) -> set[str]:
    """The paths the emulator must set too (managedFields: nothing here reads them)."""
    return {path for path in found if path.startswith(COMPARED) and path != 'metadata.managedFields'}


def load_golden() -> dict[str, list[str]]:
    return yaml.safe_load(GOLDEN.read_text())
