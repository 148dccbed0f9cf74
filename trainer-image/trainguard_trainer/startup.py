"""Start-up work that must happen before the heavy imports (torch, MONAI)."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Mapping


def seed_matplotlib_cache(env: Mapping[str, str]) -> list[str]:
    """Copy the image's prebuilt matplotlib font cache into MPLCONFIGDIR; returns what was copied.

    MONAI imports matplotlib.pyplot at import time, and matplotlib builds its font list on
    its first import in a fresh MPLCONFIGDIR: 6 s on a GPU node with many fonts. The trainer
    image builds it once (TRAINGUARD_MATPLOTLIB_CACHE); MPLCONFIGDIR sits on the pod's /tmp
    emptyDir (the root filesystem is read-only), so each pod starts with a copy instead.
    """
    source, target = env.get('TRAINGUARD_MATPLOTLIB_CACHE', ''), env.get('MPLCONFIGDIR', '')
    if not source or not target or not pathlib.Path(source).is_dir():
        return []
    destination = pathlib.Path(target)
    copied = []
    for cache in sorted(pathlib.Path(source).glob('fontlist-*.json')):
        if not (destination / cache.name).exists():
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache, destination / cache.name)
            copied.append(cache.name)
    return copied
