"""The chart README's values table is generated from values.yaml's `# --` comments and must match."""

from __future__ import annotations

import importlib.util

import yaml

from tests.crd_schema import ROOT

spec = importlib.util.spec_from_file_location('values_table', ROOT / 'scripts' / 'values_table.py')
values_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(values_table)


def test_readme_table_is_current():
    readme = (ROOT / 'charts' / 'trainguard' / 'README.md').read_text()
    assert values_table.table() in readme, 'regenerate: python scripts/values_table.py'


def test_every_leaf_value_is_documented():
    documented = {key for key, _, _ in values_table.rows()}

    def leaves(tree, prefix=''):
        for key, value in tree.items():
            path = f'{prefix}{key}'
            if path in documented:
                continue
            if isinstance(value, dict) and value:
                yield from leaves(value, path + '.')
            else:
                yield path

    values = yaml.safe_load((ROOT / 'charts' / 'trainguard' / 'values.yaml').read_text())
    assert list(leaves(values)) == []
