"""The TrainingRun CRD as the API server reads it, for the test tiers.

The checks themselves (structural defaulting, OpenAPI validation with jsonschema, CEL with
common-expression-language) live in trainguard_sandbox.crd, which the emulator uses on
every write too: the tests and the emulator cannot disagree about what is refused.
"""

from __future__ import annotations

import pathlib
from typing import Any

from trainguard_sandbox.cluster import CRD_PATH, load_crd
from trainguard_sandbox.crd import admit, version_schema

__all__ = ['CRD_PATH', 'ROOT', 'load_crd', 'run_schema', 'validate_run']

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    return dict(version_schema(crd or load_crd(), 'v1alpha1'))


def validate_run(obj: dict[str, Any], crd: dict[str, Any] | None = None) -> list[str]:
    """The API server's verdict: [] when accepted, else messages that name each bad field."""
    _, refusals = admit(run_schema(crd), obj)
    return [str(refusal) for refusal in refusals]
