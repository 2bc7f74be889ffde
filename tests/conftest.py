"""Shared fixtures: a temporary Git+DVC copy of this project with its own Git identity."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a clone of the project holds that its pipeline needs (no tests, no venv).
PROJECT_FILES = [
    "src",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
    "data/raw/README.md",
    "data/.gitignore",
    "results/.gitignore",
    "phases",
    "hpc",
]
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "aeselect tests",
    "GIT_AUTHOR_EMAIL": "tests@aeselect.invalid",
    "GIT_COMMITTER_NAME": "aeselect tests",
    "GIT_COMMITTER_EMAIL": "tests@aeselect.invalid",
}
# Small enough for a 2-core CPU: 32px images, 5 steps; evaluation every 5 steps.
TINY = {
    "data.image_size": 32,
    "data.num_images": 24,
    "model.base_channels": 8,
    "model.aux_hidden_channels": 8,
    "train.max_steps": 6,
    "train.batch_size": 4,
    "train.eval_every": 3,
    "train.log_every": 3,
    "train.warmup_steps": 2,
    "evaluate.batch_size": 8,
    "evaluate.num_sample_images": 2,
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, text=True, capture_output=True
    ).stdout


@pytest.fixture(autouse=True)
def _project_env(monkeypatch):
    """Every test: a Git identity of its own, this venv's bin first, no DVC analytics."""
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def make_project(directory: Path, params: dict | None = None) -> Path:
    """A committed Git+DVC repository holding this project's pipeline, params set to `params`."""
    import yaml

    from aeselect.config import apply_overrides, read_yaml

    directory.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if not source.exists():
            continue
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "logs"))
        else:
            shutil.copy2(source, target)
    raw = apply_overrides(read_yaml(ROOT / "params.yaml"), params or {})
    (directory / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git(directory, "init", "-q", "-b", "main")
    git(directory, "add", "-A")
    git(directory, "commit", "-q", "-m", "project")
    return directory


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
