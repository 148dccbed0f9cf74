from __future__ import annotations

import pathlib

import pytest

from trainguard_sandbox.app import Sandbox


@pytest.fixture()
async def sandbox(tmp_path: pathlib.Path):
    """The emulated API, the real operator (sweeping every second) and the local pod runner."""
    async with Sandbox(tmp_path, sweep_seconds=1) as running:
        yield running
