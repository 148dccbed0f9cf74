"""Each install's operator, as its ServiceAccount, with exactly the rules that install grants.

The webhook (tests/operator/test_webhook.py) and HA (test_peering.py) cases run as the chart's
ServiceAccount; the rest of the tier as manifests/rbac's. This covers the chart's namespaced
mode: the operator watches only its namespaces, with Roles there and a discovery ClusterRole.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.operator.conftest import PODS
from tests.operator.identities import chart_rbac
from tests.operator.test_lifecycle import phase, run_body

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def operator_rbac() -> list[dict]:
    return chart_rbac('rbac.scope=namespaced', 'rbac.namespaces={default}')


async def test_a_namespaced_install_serves_its_namespace_with_its_roles_only(api, cluster, tmp_path):
    roles = [(doc['kind'], doc['metadata'].get('namespace')) for doc in chart_rbac(
        'rbac.scope=namespaced', 'rbac.namespaces={default}') if doc['kind'] in ('Role', 'ClusterRole')]
    assert sorted(roles, key=str) == [('ClusterRole', None), ('Role', 'default')]
    env = {**os.environ, 'TRAINGUARD_NAMESPACES': 'default', 'TRAINGUARD_SWEEP_SECONDS': '1'}
    with (tmp_path / 'operator.log').open('wb') as log:
        operator = subprocess.Popen([sys.executable, '-m', 'trainguard.cli', 'run', '--standalone'], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await api.create(run_body('mine', device='cpu', numNodes=2))
        await api.wait_for_run('mine', phase('Pending'), timeout=60)
        assert sorted(pod['metadata']['name'] for pod in await api.list(PODS)) == ['mine-1-0', 'mine-1-1']
        # Every request for runs and pods named its namespace: nothing cluster-wide to refuse.
        scopes = {(request.resource.plural, request.namespace) for request in list(cluster)
                  if request.resource is not None and request.resource.plural in ('trainingruns', 'pods')
                  and not request.headers.get('User-Agent', '').startswith('kmock/')}
        assert scopes == {('trainingruns', 'default'), ('pods', 'default')}, scopes
    finally:
        os.killpg(operator.pid, signal.SIGTERM)
        operator.wait(timeout=60)
    # conftest fails the test if any of the operator's requests was refused.
