"""Every tier: no process a test started may outlive the test run.

Each process started during the run inherits a marker in its environment; at the end of the
run any such process still alive (a DataLoader worker re-parented to init after its trainer
was killed, a sandbox pod, an operator subprocess) fails the run, named, and is killed.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import psutil
import pytest

MARKER = 'TRAINGUARD_TEST_RUN'


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(MARKER, uuid.uuid4().hex)   # inherited by everything the tests start


def _started_by_this_run(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(['pid', 'status']):
        if process.pid == os.getpid() or process.info['status'] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(MARKER) == marker:
                found.append(process)
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    marker = os.environ.get(MARKER)
    if not marker or hasattr(session.config, 'workerinput'):
        return
    # A process a test has just killed may take a moment to go.
    _, alive = psutil.wait_procs(_started_by_this_run(marker), timeout=10)
    leaked = []
    for process in alive:
        with contextlib.suppress(psutil.Error):
            leaked.append(f'pid {process.pid}: {" ".join(process.cmdline())[:200]}')
            process.kill()
    if leaked:
        reporter = session.config.pluginmanager.get_plugin('terminalreporter')
        if reporter is not None:
            reporter.write_line('')
            reporter.write_line('processes started by the tests are still running (killed now):\n  '
                                + '\n  '.join(leaked), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
