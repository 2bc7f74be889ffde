"""A throwaway copy of this project as a committed Git+DVC repository, for the tests and the
benchmarks to run the real pipeline in (not used by the pipeline itself).

It copies from the source checkout this module lies in (src/aeselect/ of the project).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from aeselect.config import apply_overrides, read_yaml
from aeselect.git import git

ROOT = Path(__file__).resolve().parents[2]
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
# Small enough for a 2-core CPU: 32px images, 6 steps; evaluation every 3 steps.
TINY = {
    "data.image_size": 32,
    "data.num_images": 24,
    "data.val_fraction": 0.2,
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


def make_project(directory: Path, params: dict[str, Any] | None = None) -> Path:
    """A committed Git+DVC repository holding this project's pipeline, params set to `params`.

    Commits with the Git identity of the environment (GIT_AUTHOR_NAME etc.): the caller's.
    """
    if not (ROOT / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{ROOT} is not the project checkout: sandbox copies from one")
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
