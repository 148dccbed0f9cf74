"""Who the operator is in the operator tier: the ServiceAccount and RBAC of an install, as rendered.

Every operator-tier test runs the operator with a token of the install's ServiceAccount, so
the emulator authorizes each request against exactly the rules that install ships; a
missing rule fails a test here instead of an operator on a user's cluster.
"""

from __future__ import annotations

import copy
import functools
import pathlib
import shutil
import subprocess
import sys
from typing import Any

import yaml

from trainguard_sandbox.cluster import manifests_operator_rbac

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / 'charts' / 'trainguard'
RBAC_KINDS = {'ServiceAccount', 'ClusterRole', 'ClusterRoleBinding', 'Role', 'RoleBinding'}


def manifests_rbac() -> list[dict[str, Any]]:
    """``kubectl apply -k manifests/default``: the standalone operator, webhook off."""
    return manifests_operator_rbac()


@functools.cache
def _chart_rbac(flags: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    helm = shutil.which('helm', path=str(pathlib.Path(sys.executable).parent)) or shutil.which('helm')
    assert helm, 'helm is missing: `make test` installs it into .venv/bin (scripts/install_helm_kubectl.py)'
    args = [helm, 'template', 'tg', str(CHART), '--namespace', 'trainguard-system']
    for flag in flags:
        args += ['--set', flag]
    output = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    return tuple(doc for doc in yaml.safe_load_all(output) if doc and doc['kind'] in RBAC_KINDS
                 and not doc['metadata']['name'].startswith('tg-trainguard-trainingrun-'))  # users' roles


def chart_rbac(*flags: str) -> list[dict[str, Any]]:
    """``helm install tg charts/trainguard -n trainguard-system --set FLAG...``: its operator's RBAC."""
    return copy.deepcopy(list(_chart_rbac(flags)))
