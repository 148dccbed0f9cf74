"""Print the chart's values table (markdown) from the `# --` comments in values.yaml.

helm-docs does this in Go; it is not installable from the registries this project reaches,
so this short script reads the same comment convention. tests/chart/test_chart_docs.py
fails when charts/trainguard/README.md's table differs from this output.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import yaml

VALUES = pathlib.Path(__file__).resolve().parents[1] / 'charts' / 'trainguard' / 'values.yaml'


def rows(path: pathlib.Path = VALUES) -> list[tuple[str, str, str]]:
    values = yaml.safe_load(path.read_text())
    lines = path.read_text().splitlines()
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    result = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith('# --'):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith('#') and comment:
            comment.append(stripped[1:].strip())
            continue
        match = re.match(r'^(\s*)([A-Za-z][\w.-]*):', line)
        if not match:
            continue
        indent, key = len(match[1]), match[2]
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        if comment:
            dotted = '.'.join(k for _, k in stack)
            value: object = values
            for part in dotted.split('.'):
                value = value[part]  # type: ignore[index]
            result.append((dotted, json.dumps(value), ' '.join(comment)))
            comment = []
    return result


def table() -> str:
    out = ['| Key | Default | Description |', '|-----|---------|-------------|']
    out += [f'| `{key}` | `{default}` | {text} |' for key, default, text in rows()]
    return '\n'.join(out) + '\n'


if __name__ == '__main__':
    sys.stdout.write(table())
