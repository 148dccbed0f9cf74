"""Trainer processes in tests: each in its own process group, stopped as a group.

Killing only a trainer's main process leaves its DataLoader workers (and torchrun's
workers) running, re-parented to init, after pytest exits. Every test that starts a trainer
starts it with ``start_new_session`` and stops it with ``stop_group``; tests/conftest.py
checks at the end of the run that none is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import IO, Any

import psutil


def start_in_group(command: Sequence[str], output: IO[Any], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                            **kwargs)


def stop_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL the process, its process group and any descendant that left the group (torchrun's
    workers start their own sessions); a stopped (SIGSTOP) process dies of SIGKILL too."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)
