from __future__ import annotations

import shutil
import subprocess

import pytest


def docker_available() -> bool:
    if shutil.which('docker') is None:
        return False
    try:
        return subprocess.run(['docker', 'info'], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if docker_available():
        return
    skip = pytest.mark.skip(reason='kind e2e needs a Docker engine (none here); '
                                   'run `make kind-demo` or the e2e-kind GitHub workflow')
    for item in items:
        if 'e2e_kind' in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Keep each phase's report on the item, so a fixture can dump cluster state after a failure."""
    outcome = yield
    setattr(item, f'rep_{call.when}', outcome.get_result())
