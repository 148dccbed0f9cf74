"""The operator ships without the sandbox: its image copies no sandbox code, its wheel holds none."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.crd_schema import ROOT

OPERATOR_DOCKERFILE = (ROOT / 'operator' / 'Dockerfile').read_text()


def test_the_operator_image_copies_only_the_operator_and_trainer_sources():
    copied = re.findall(r'^COPY (.+?) /src', OPERATOR_DOCKERFILE, re.M)
    assert copied == ['pyproject.toml README.md', 'operator', 'trainer-image/trainguard_trainer']


@pytest.mark.timeout(120)
def test_the_wheel_built_as_the_image_builds_it_holds_no_sandbox(tmp_path):
    """What `pip install /src` sees in the operator image: the same files, built into a wheel."""
    source = tmp_path / 'src'
    (source / 'trainer-image').mkdir(parents=True)
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / 'operator', source / 'operator', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(ROOT / 'trainer-image' / 'trainguard_trainer', source / 'trainer-image' / 'trainguard_trainer',
                    ignore=shutil.ignore_patterns('__pycache__'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(tmp_path / 'dist'), str(source)], check=True, capture_output=True)
    [wheel] = (tmp_path / 'dist').glob('trainguard-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith('trainguard/handlers.py') for name in names)
    assert not [name for name in names if name.startswith('trainguard_sandbox/')]
