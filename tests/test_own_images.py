"""The README's "use your own images" steps, replayed line by line on a fresh clone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, git, make_project, write_pngs
from PIL import Image

from aeselect.config import ConfigError, DataConfig, from_dict
from aeselect.dvc import dvc_env, run_dvc
from aeselect.stages import check_inputs_tracked


def readme_steps() -> list[str]:
    """The indented command lines under "To use your own images:" in README.md."""
    text = (ROOT / "README.md").read_text()
    block = text.split("To use your own images:\n\n", 1)[1].split("\n\n", 1)[0]
    lines = block.splitlines()
    assert lines and all(line.startswith("    ") for line in lines), block
    return [line.strip() for line in lines]


def write_masks(images: list[Path], masks_dir: Path) -> None:
    """A class-id mask (mode L, ids < data.num_classes) per image, same stem."""
    masks_dir.mkdir(parents=True)
    for i, image in enumerate(images):
        ids = np.zeros((32, 32), dtype=np.uint8)
        ids[8:24, 8:24] = 1 + i % (DataConfig().num_classes - 1)
        Image.fromarray(ids).save(masks_dir / image.name)


@pytest.mark.slow
def test_readme_own_images_steps_work_as_written(tmp_path):
    origin = make_project(tmp_path / "origin", TINY)
    git(tmp_path, "clone", "-q", str(origin), "clone")
    clone = tmp_path / "clone"
    images = write_pngs(tmp_path / "mine" / "images", 10)
    write_masks(images, tmp_path / "mine" / "masks")

    for step in readme_steps():
        command = step.replace("/path/to/", f"{tmp_path}/mine/")
        result = subprocess.run(
            ["bash", "-c", command], cwd=clone, env=dvc_env(), capture_output=True, text=True
        )
        assert result.returncode == 0, f"README step failed: {step}\n{result.stdout}{result.stderr}"

    meta = json.loads((clone / "data" / "prepared" / "meta.json").read_text())
    assert (meta["source"], meta["aux_task"], meta["num_images"]) == ("folder", "segmentation", 10)
    assert json.loads((clone / "results" / "evaluate" / "metrics.json").read_text())["mse"] > 0
    assert git(clone, "ls-files", "data/raw").split() == [
        "data/raw/.gitignore",
        "data/raw/README.md",
        "data/raw/images.dvc",
        "data/raw/masks.dvc",
    ]

    # Nothing changed: nothing to re-run. A changed mask re-runs prepare (and what follows).
    assert "up to date" in run_dvc(["status", "prepare"], cwd=clone).stdout
    mask = clone / "data" / "raw" / "masks" / images[0].name
    ids = np.asarray(Image.open(mask)).copy()
    ids[0, 0] = 1
    Image.fromarray(ids).save(mask)
    status = run_dvc(["status", "prepare"], cwd=clone).stdout
    assert "prepare:" in status and "modified:" in status and "data/raw" in status, status


def test_folder_inputs_outside_the_tracked_folder_are_refused(tmp_path):
    cfg = from_dict({"data": {"source": "folder", "root": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"data\.root: .* is outside data/raw, the folder"):
        check_inputs_tracked(cfg)
    check_inputs_tracked(from_dict({"data": {"source": "synthetic", "root": str(tmp_path)}}))
