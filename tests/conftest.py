"""Shared fixtures: a temporary Git+DVC copy of this project (aeselect.sandbox) with the tests'
own Git identity."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from aeselect.git import git
from aeselect.sandbox import TINY, make_project

__all__ = ["GIT_IDENTITY", "ROOT", "TINY", "git", "make_project", "write_pngs"]

ROOT = Path(__file__).resolve().parents[1]
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "aeselect tests",
    "GIT_AUTHOR_EMAIL": "tests@aeselect.invalid",
    "GIT_COMMITTER_NAME": "aeselect tests",
    "GIT_COMMITTER_EMAIL": "tests@aeselect.invalid",
}


@pytest.fixture(autouse=True)
def _project_env(monkeypatch):
    """Every test: a Git identity of its own, this venv's bin first, no DVC analytics."""
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "project", TINY)


def write_pngs(folder: Path, count: int, size: int = 32) -> list[Path]:
    """`count` small RGB PNG files of seeded shaded squares: real images for the folder source."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    ramp = np.broadcast_to(np.linspace(0, 1, size)[:, None, None], (size, size, 1))
    paths = []
    for i in range(count):
        image = ramp * rng.uniform(0, 255, 3) + (1 - ramp) * rng.uniform(0, 255, 3)
        lo, hi = sorted(rng.integers(0, size, 2))
        image[lo : hi + 1, lo : hi + 1] = rng.uniform(0, 255, 3)
        paths.append(folder / f"image{i:02d}.png")
        Image.fromarray(image.astype(np.uint8)).save(paths[-1])
    return paths
