"""Static checks of the trainer Dockerfile (no Docker engine here; the kind e2e workflow builds it)."""

from __future__ import annotations

import re

from tests.crd_schema import ROOT

DOCKERFILE = (ROOT / 'trainer-image' / 'Dockerfile').read_text()


def test_torch_is_pinned_from_a_selectable_wheel_index():
    assert re.search(r'^ARG TORCH_VARIANT=cpu$', DOCKERFILE, re.M)
    assert re.search(r'^ARG TORCH_VERSION=\d+\.\d+\.\d+$', DOCKERFILE, re.M)
    assert '"torch==${TORCH_VERSION}"' in DOCKERFILE and '/whl/${TORCH_VARIANT}' in DOCKERFILE


def test_runs_as_non_root_with_writable_paths_only_under_tmp():
    assert re.search(r'^USER 10001$', DOCKERFILE, re.M)
    assert 'HOME=/tmp' in DOCKERFILE and 'MPLCONFIGDIR=/tmp/' in DOCKERFILE


def test_entrypoint_is_the_cli_and_copied_sources_exist():
    assert DOCKERFILE.strip().splitlines()[-1] == 'ENTRYPOINT ["python", "-m", "trainguard_trainer"]'
    for source in re.findall(r'^COPY (\S+) ', DOCKERFILE, re.M):
        assert (ROOT / 'trainer-image' / source).exists(), source


def test_the_matplotlib_font_cache_is_built_in_the_image_and_seeded_at_start(tmp_path):
    from trainguard_trainer.startup import seed_matplotlib_cache

    assert 'MPLCONFIGDIR=/opt/trainguard/matplotlib python -c "import matplotlib.font_manager"' in DOCKERFILE
    assert 'TRAINGUARD_MATPLOTLIB_CACHE=/opt/trainguard/matplotlib' in DOCKERFILE
    built = tmp_path / 'image'
    built.mkdir()
    (built / 'fontlist-v390.json').write_text('{"fonts": []}')
    env = {'TRAINGUARD_MATPLOTLIB_CACHE': str(built), 'MPLCONFIGDIR': str(tmp_path / 'pod-tmp' / 'matplotlib')}
    assert seed_matplotlib_cache(env) == ['fontlist-v390.json']
    assert (tmp_path / 'pod-tmp' / 'matplotlib' / 'fontlist-v390.json').read_text() == '{"fonts": []}'
    assert seed_matplotlib_cache(env) == []            # already there: left alone
    assert seed_matplotlib_cache({'MPLCONFIGDIR': str(tmp_path)}) == []   # outside the image: nothing to do
