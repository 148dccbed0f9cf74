"""Offline validation of TrainingRuns against the CRD, as the API server would do it.

The API server applies the structural schema's defaults, validates the OpenAPI v3 schema,
then evaluates the CEL rules. jsonschema does the schema part (Draft 4 semantics match
OpenAPI v3.0: boolean exclusiveMinimum); defaulting and CEL have no Python implementation,
so defaulting is a short walk over the schema and each CEL rule has a Python mirror here.
A CEL rule without a mirror fails the tests, so the two cannot drift apart silently.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable
from typing import Any

import jsonschema

from trainguard.sandbox.cluster import CRD_PATH, load_crd

__all__ = ['CEL_MIRRORS', 'CRD_PATH', 'ROOT', 'load_crd', 'validate_run']

ROOT = pathlib.Path(__file__).resolve().parents[1]

CEL_MIRRORS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "self.device != 'cpu' || self.gpus == 0": lambda s: s['device'] != 'cpu' or s['gpus'] == 0,
    "self.dataset.source != 'directory' || self.dataset.claimName != ''":
        lambda s: s['dataset']['source'] != 'directory' or s['dataset']['claimName'] != '',
    'self.cropSize <= self.resolution': lambda s: s['cropSize'] <= s['resolution'],
    'size(self.strides) == size(self.channels) - 1': lambda s: len(s['strides']) == len(s['channels']) - 1,
}


def run_schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    crd = crd or load_crd()
    return crd['spec']['versions'][0]['schema']['openAPIV3Schema']


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and schema.get('type') == 'object':
        for name, sub in (schema.get('properties') or {}).items():
            if name not in value and 'default' in sub:
                value[name] = copy.deepcopy(sub['default'])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and schema.get('type') == 'array' and 'items' in schema:
        return [apply_defaults(schema['items'], item) for item in value]
    return value


def _cel_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    errors: list[str] = []
    if isinstance(value, dict):
        for rule in schema.get('x-kubernetes-validations') or []:
            mirror = CEL_MIRRORS.get(rule['rule'])
            if mirror is None:
                raise AssertionError(f'CEL rule without a Python mirror: {rule["rule"]}')
            try:
                ok = mirror(value)
            except (KeyError, TypeError):
                ok = True  # the schema errors already name the missing or mistyped field
            if not ok:
                errors.append(f'{path}{rule.get("fieldPath", "")}: {rule["message"]}')
        for name, sub in (schema.get('properties') or {}).items():
            if name in value:
                errors += _cel_errors(sub, value[name], f'{path}.{name}')
    return errors


def validate_run(obj: dict[str, Any], crd: dict[str, Any] | None = None) -> list[str]:
    """The API server's verdict: [] when accepted, else messages that name each bad field."""
    schema = run_schema(crd)
    value = apply_defaults(schema, copy.deepcopy(obj))
    errors = []
    for error in jsonschema.Draft4Validator(schema).iter_errors(value):
        where = '.'.join(str(part) for part in error.absolute_path) or '<root>'
        errors.append(f'{where}: {error.message}')
    if not errors:
        errors = _cel_errors(schema, value, '')
        errors = [error.lstrip('.') for error in errors]
    return errors
