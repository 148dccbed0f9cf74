"""What kube-apiserver checks for a CustomResourceDefinition and its objects, offline.

Two moments, as on a real server:

- **CRD creation** (:func:`crd_problems`): the schema is structural, every ``default``
  validates against its own subschema, every CEL rule (``x-kubernetes-validations``)
  compiles and evaluates cleanly against each default *as written* (nested defaults are not
  applied first: that is how kube-apiserver 1.36 refused the first TrainingRun CRD), and
  every string, list and map a rule can reach is bounded, so the rule's cost estimate is
  finite.
- **Object admission** (:func:`admit`): unknown fields pruned, structural defaults applied,
  the OpenAPI v3 schema validated, then the CEL rules evaluated; each refusal names the field.

Schema validation is ``jsonschema`` (Draft 4 is OpenAPI v3.0's semantics: boolean
``exclusiveMinimum``); CEL is ``common-expression-language``, a maintained CEL
implementation. Structural-schema, pruning and defaulting rules are not in any Python
library; they are written here from the Kubernetes documentation ("Specifying a structural
schema", "Defaulting", "Validation rules"), kept to what this project's CRDs use.

What this cannot prove: Kubernetes' CEL extension libraries (lists, strings, quantity,
format) and its exact cost figures are not reproduced (bounds are checked instead of
costs), and messages are worded like the server's, not byte-for-byte.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import cel
import jsonschema

Schema = Mapping[str, Any]

# Keywords a structural schema may not use at all, or only inside the logical junctors
# without type/default/etc. (Kubernetes docs, "Specifying a structural schema").
_FORBIDDEN = ('$ref', 'definitions', 'dependencies', 'additionalItems', 'patternProperties')
_JUNCTORS = ('allOf', 'anyOf', 'oneOf', 'not')
_NOT_IN_JUNCTORS = ('type', 'default', 'description', 'nullable', 'additionalProperties',
                    'x-kubernetes-preserve-unknown-fields', 'x-kubernetes-int-or-string',
                    'x-kubernetes-embedded-resource')
_VALID_TYPES = ('object', 'array', 'string', 'integer', 'number', 'boolean')
# The fields of apiextensions/v1 JSONSchemaProps: with strict field validation (kubectl's
# default) any other key in a schema node is refused as an unknown field.
_KNOWN_KEYWORDS = frozenset({
    'id', '$schema', '$ref', 'description', 'type', 'format', 'title', 'default', 'maximum', 'exclusiveMaximum',
    'minimum', 'exclusiveMinimum', 'maxLength', 'minLength', 'pattern', 'maxItems', 'minItems', 'uniqueItems',
    'multipleOf', 'enum', 'maxProperties', 'minProperties', 'required', 'items', 'allOf', 'oneOf', 'anyOf', 'not',
    'properties', 'additionalProperties', 'patternProperties', 'dependencies', 'additionalItems', 'definitions',
    'externalDocs', 'example', 'nullable', 'x-kubernetes-preserve-unknown-fields', 'x-kubernetes-embedded-resource',
    'x-kubernetes-int-or-string', 'x-kubernetes-list-map-keys', 'x-kubernetes-list-type', 'x-kubernetes-map-type',
    'x-kubernetes-validations',
})


@dataclasses.dataclass(frozen=True)
class Refusal:
    """One reason an object or a CRD is refused, with the field path the server would name."""

    field: str
    message: str

    def __str__(self) -> str:
        return f'{self.field}: {self.message}'


# -- walking the schema ----------------------------------------------------------------------

def _children(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    for name, sub in (schema.get('properties') or {}).items():
        yield f'{path}.properties[{name}]', sub
    if isinstance(schema.get('items'), Mapping):
        yield f'{path}.items', schema['items']
    if isinstance(schema.get('additionalProperties'), Mapping):
        yield f'{path}.additionalProperties', schema['additionalProperties']


def _walk(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    yield path, schema
    for child_path, child in _children(schema, path):
        yield from _walk(child, child_path)


@functools.lru_cache(maxsize=256)
def compile_rule(rule: str) -> Any:
    """A compiled CEL program; cached, since the same rules are evaluated on every write."""
    return cel.compile(rule)


def _evaluate(rule: str, value: Any, old: Any = None) -> bool:
    context = cel.Context()
    context.add_variable('self', value)
    if old is not None:
        context.add_variable('oldSelf', old)
    return bool(compile_rule(rule).execute(context))


def is_transition_rule(rule: Mapping[str, Any]) -> bool:
    """A rule that reads ``oldSelf`` runs only on an update whose old object has the field."""
    return 'oldSelf' in rule['rule']


# -- CRD creation ----------------------------------------------------------------------------

def structural_problems(schema: Schema, path: str = 'openAPIV3Schema') -> list[Refusal]:
    problems: list[Refusal] = []
    for node_path, node in _walk(schema, path):
        for keyword in sorted(set(node) - _KNOWN_KEYWORDS):
            problems.append(Refusal(f'{node_path}.{keyword}', 'unknown field: not part of JSONSchemaProps '
                                                              '(strict field validation refuses it)'))
        for keyword in _FORBIDDEN:
            if keyword in node:
                problems.append(Refusal(f'{node_path}.{keyword}', 'Forbidden: must not be used'))
        special = node.get('x-kubernetes-int-or-string') or node.get('x-kubernetes-preserve-unknown-fields')
        if 'type' not in node and not special:
            problems.append(Refusal(f'{node_path}.type', 'Required value: must not be empty for specified '
                                                         'object fields'))
        elif 'type' in node and node['type'] not in _VALID_TYPES:
            problems.append(Refusal(f'{node_path}.type', f'Unsupported value: {node["type"]!r}'))
        if 'properties' in node and 'additionalProperties' in node:
            problems.append(Refusal(f'{node_path}.additionalProperties',
                                    'Forbidden: additionalProperties and properties are mutual exclusive'))
        for junctor in _JUNCTORS:
            branches = node.get(junctor)
            for index, branch in enumerate(branches if isinstance(branches, list) else [branches] if branches else []):
                for keyword in _NOT_IN_JUNCTORS:
                    if keyword in branch and not (keyword == 'type' and node.get('x-kubernetes-int-or-string')):
                        problems.append(Refusal(f'{node_path}.{junctor}[{index}].{keyword}',
                                                'Forbidden: must be empty to be structural'))
    return problems


def _unbounded(schema: Schema, path: str) -> list[Refusal]:
    problems = []
    for node_path, node in _walk(schema, path):
        kind = node.get('type')
        if kind == 'string' and 'maxLength' not in node:  # an enum does not bound the estimate
            problems.append(Refusal(node_path, 'string without maxLength under a CEL rule'))
        elif node.get('x-kubernetes-int-or-string') and 'maxLength' not in node:
            problems.append(Refusal(node_path, 'int-or-string without maxLength under a CEL rule'))
        elif kind == 'array' and 'maxItems' not in node:
            problems.append(Refusal(node_path, 'list without maxItems under a CEL rule'))
        elif kind == 'object' and 'additionalProperties' in node and 'maxProperties' not in node:
            problems.append(Refusal(node_path, 'map without maxProperties under a CEL rule'))
    return problems


def _rule_errors_on(schema: Schema, value: Any, path: str, old: Any = None) -> list[Refusal]:
    """Every rule at this node and below, evaluated on the value as it stands (no defaulting).

    ``old`` is the value at the same place in the stored object on an update (None on a
    create, or where the old object lacks the field): transition rules run only with it.
    """
    errors: list[Refusal] = []
    for rule in schema.get('x-kubernetes-validations') or []:
        if is_transition_rule(rule) and old is None:
            continue
        try:
            if not _evaluate(rule['rule'], value, old if is_transition_rule(rule) else None):
                errors.append(Refusal(path + rule.get('fieldPath', ''), rule.get('message') or
                                      f'failed rule: {rule["rule"]}'))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            errors.append(Refusal(path, f'Invalid value: "object": no such key: {_key(error)} evaluating rule: '
                                        f'{rule.get("message") or rule["rule"]}'))
    if isinstance(value, Mapping):
        old_map = old if isinstance(old, Mapping) else {}
        for name, sub in (schema.get('properties') or {}).items():
            if name in value:
                errors += _rule_errors_on(sub, value[name], f'{path}.{name}', old_map.get(name))
        extra = schema.get('additionalProperties')
        if isinstance(extra, Mapping):
            for name, item in value.items():
                errors += _rule_errors_on(extra, item, f'{path}.{name}', old_map.get(name))
    elif isinstance(value, list) and isinstance(schema.get('items'), Mapping):
        # Transition rules inside lists need list-map keys to pair items; none of ours do.
        for index, item in enumerate(value):
            errors += _rule_errors_on(schema['items'], item, f'{path}[{index}]')
    return errors


def _key(error: Exception) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def crd_problems(crd: Mapping[str, Any]) -> list[Refusal]:
    """Why kube-apiserver would refuse this CRD at creation; [] when it would accept it."""
    problems: list[Refusal] = []
    for index, version in enumerate(crd['spec']['versions']):
        base = f'spec.versions[{index}].schema.openAPIV3Schema'
        schema = version['schema']['openAPIV3Schema']
        problems += structural_problems(schema, base)
        for node_path, node in _walk(schema, base):
            for rule in node.get('x-kubernetes-validations') or []:
                try:
                    compile_rule(rule['rule'])
                except ValueError as error:
                    problems.append(Refusal(f'{node_path}.x-kubernetes-validations', f'compilation failed: {error}'))
                    continue
                if 'fieldPath' in rule and not _field_path_exists(node, rule['fieldPath']):
                    problems.append(Refusal(f'{node_path}.x-kubernetes-validations',
                                            f'Invalid value: {rule["fieldPath"]!r}: fieldPath must be a valid '
                                            'path to a field of this schema'))
                problems += _unbounded(node, node_path)
            if 'default' in node:
                default = node['default']
                for error in jsonschema.Draft4Validator(_for_jsonschema(node)).iter_errors(default):
                    problems.append(Refusal(f'{node_path}.default', f'Invalid value: {error.message}'))
                for refusal in _rule_errors_on(node, copy.deepcopy(default), ''):
                    problems.append(Refusal(f'{node_path}.default', refusal.message))
    return _unique(problems)


def _field_path_exists(schema: Schema, field_path: str) -> bool:
    node: Schema = schema
    for part in field_path.lstrip('.').split('.'):
        properties = node.get('properties') or {}
        if part not in properties:
            return False
        node = properties[part]
    return True


def _unique(items: list[Refusal]) -> list[Refusal]:
    return list(dict.fromkeys(items))


# -- object admission ------------------------------------------------------------------------

def _for_jsonschema(schema: Schema) -> dict[str, Any]:
    """The schema with Kubernetes' extensions that jsonschema must not see removed."""
    if isinstance(schema, Mapping):
        return {key: _for_jsonschema(value) for key, value in schema.items()
                if key not in ('default', 'x-kubernetes-validations')}
    if isinstance(schema, list):
        return [_for_jsonschema(item) for item in schema]
    return schema


def prune(schema: Schema, value: Any) -> Any:
    """Drop fields the schema does not know, as the server does (unless preserve-unknown-fields)."""
    if isinstance(value, dict) and schema.get('type') == 'object':
        if schema.get('x-kubernetes-preserve-unknown-fields'):
            return value
        properties = schema.get('properties')
        extra = schema.get('additionalProperties')
        if properties is not None:
            return {key: prune(properties[key], item) for key, item in value.items() if key in properties}
        if isinstance(extra, Mapping):
            return {key: prune(extra, item) for key, item in value.items()}
        return value
    if isinstance(value, list) and isinstance(schema.get('items'), Mapping):
        return [prune(schema['items'], item) for item in value]
    return value


def unknown_fields(schema: Schema, value: Any, path: str = '') -> list[str]:
    """The paths ``prune`` would drop (``spec.template.spec.containers[0].command``): what
    ``fieldValidation=Strict`` (kubectl's default) refuses instead of dropping."""
    found: list[str] = []
    preserved = schema.get('x-kubernetes-preserve-unknown-fields')
    if isinstance(value, dict) and schema.get('type') == 'object' and not preserved:
        properties = schema.get('properties')
        extra = schema.get('additionalProperties')
        for key, item in value.items():
            child = f'{path}.{key}' if path else key
            if properties is not None:
                if key in properties:
                    found += unknown_fields(properties[key], item, child)
                else:
                    found.append(child)
            elif isinstance(extra, Mapping):
                found += unknown_fields(extra, item, child)
    elif isinstance(value, list) and isinstance(schema.get('items'), Mapping):
        for index, item in enumerate(value):
            found += unknown_fields(schema['items'], item, f'{path}[{index}]')
    return found


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting: a missing field with a default gets it, then defaults below it apply."""
    if isinstance(value, dict):
        for name, sub in (schema.get('properties') or {}).items():
            if name not in value and 'default' in sub:
                value[name] = copy.deepcopy(sub['default'])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        extra = schema.get('additionalProperties')
        if isinstance(extra, Mapping):
            for name in value:
                value[name] = apply_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get('items'), Mapping):
        return [apply_defaults(schema['items'], item) for item in value]
    return value


def _path(parts: Any) -> str:
    text = ''
    for part in parts:
        text += f'[{part}]' if isinstance(part, int) else f'.{part}'
    return text.lstrip('.') or '<root>'


_VALIDATORS: dict[int, tuple[Schema, jsonschema.Draft4Validator]] = {}


def _validator(schema: Schema) -> jsonschema.Draft4Validator:
    """One validator per schema: the emulator validates every write against the same few."""
    cached = _VALIDATORS.get(id(schema))
    if cached is None or cached[0] is not schema:
        cached = _VALIDATORS[id(schema)] = (schema, jsonschema.Draft4Validator(_for_jsonschema(schema)))
    return cached[1]


def schema_refusals(schema: Schema, value: Any) -> list[Refusal]:
    refusals = []
    validator = _validator(schema)
    for error in sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path))):
        path = list(error.absolute_path)
        if error.validator == 'required':
            missing = error.message.split("'")[1]
            refusals.append(Refusal(_path([*path, missing]), 'Required value'))
        else:
            refusals.append(Refusal(_path(path), f'Invalid value: {error.instance!r}: {error.message}'))
    return refusals


def admit(schema: Schema, obj: Mapping[str, Any],
          old: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[Refusal]]:
    """The object as the server would store it (pruned, defaulted), and why it is refused.

    On an update (``old`` given), a refusal of a field the update did not change is dropped:
    validation ratcheting (KEP-4008, on by default since Kubernetes 1.30), without which an
    object stored before a rule existed could never have its status written again.
    """
    metadata = copy.deepcopy(obj.get('metadata') or {})
    value = prune(schema, copy.deepcopy(dict(obj)))
    value = apply_defaults(schema, value)
    value['metadata'] = metadata  # metadata is the server's own; the CRD schema does not prune it
    refusals = schema_refusals(schema, value)
    if not refusals:  # the server runs CEL only on schema-valid objects
        body = {key: item for key, item in value.items() if key != 'metadata'}
        old_body = {key: item for key, item in old.items() if key != 'metadata'} if old is not None else None
        refusals = [Refusal(refusal.field.lstrip('.'), refusal.message)
                    for refusal in _rule_errors_on(_without_metadata(schema), body, '', old_body)]
    if old is not None:
        refusals = [refusal for refusal in refusals if _at(value, refusal.field) != _at(old, refusal.field)]
    return value, refusals


_MISSING = object()


def _at(obj: Any, field: str) -> Any:
    """The value at a refusal's field path (``spec.tolerations[0].key``), or a marker when absent."""
    for part in field.replace('[', '.[').split('.'):
        if part.startswith('['):
            index = int(part.strip('[]'))
            obj = obj[index] if isinstance(obj, list) and index < len(obj) else _MISSING
        elif part:
            obj = obj.get(part, _MISSING) if isinstance(obj, Mapping) else _MISSING
    return obj


def _without_metadata(schema: Schema) -> dict[str, Any]:
    properties = {key: sub for key, sub in (schema.get('properties') or {}).items() if key != 'metadata'}
    return {**schema, 'properties': properties}


def version_schema(crd: Mapping[str, Any], version: str) -> Schema:
    for candidate in crd['spec']['versions']:
        if candidate['name'] == version:
            return candidate['schema']['openAPIV3Schema']
    raise KeyError(f'{crd["metadata"]["name"]} has no version {version}')
