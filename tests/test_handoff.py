"""The hand-off to Phase 2 on a tiny model that `dvc exp run` really trained and evaluated."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from aeselect.data.dataset import PreparedData, to_model_input
from aeselect.dvc import run_dvc
from aeselect.handoff import export_autoencoder, load_autoencoder
from aeselect.model.checkpoint import load_checkpoint


def val_images(repo) -> torch.Tensor:
    """The images the evaluate stage measured the scale factor on, as Phase 2 would pass them."""
    data = PreparedData.load(repo / "data" / "prepared")
    rows = data.split_indices("val")
    images, _ = to_model_input(
        torch.from_numpy(data.images[rows]), torch.from_numpy(data.targets[rows]), "cpu"
    )
    return images


@pytest.mark.slow
def test_phase_two_gets_the_trained_autoencoder_by_path_and_by_revision(project):
    run_dvc(["exp", "run", "-n", "tiny"], cwd=project)
    measured = json.loads((project / "results/evaluate/metrics.json").read_text())["latent"]
    scale = measured["scale_factor"]
    exported = export_autoencoder(project / "models/best.pt", scale, project / "export/model.pt")
    stored = load_checkpoint(exported)
    assert "optimizer" not in stored
    assert stored["scale_factor"] == scale and stored["latent_shape"] == (4, 4, 4)

    autoencoder = load_autoencoder(exported)
    assert autoencoder.scale_factor == scale
    assert autoencoder.latent_shape == (4, 4, 4)
    assert autoencoder.latent_shape_for(64) == (8, 8, 4)
    with pytest.raises(ValueError, match="36x36 is not a multiple of 8"):
        autoencoder.latent_shape_for(36)

    images = val_images(project)
    latents = autoencoder.encode(images)
    assert latents.shape == (len(images), 4, 4, 4)
    assert float(latents.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
    decoded = autoencoder.decode(latents)
    assert decoded.shape == images.shape
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    with torch.no_grad():
        own = autoencoder.model(images).reconstruction.clamp(0, 1)
    torch.testing.assert_close(decoded, own)  # scaling in and out again costs only rounding

    with pytest.raises(ValueError, match=r"holds no scale factor.*scale_factor="):
        load_autoencoder("models/best.pt", repo=project)
    best = load_autoencoder("models/best.pt", repo=project, scale_factor=scale)
    assert torch.equal(best.encode(images), latents)

    # By revision, with the workspace copy gone: the weights come from DVC's cache.
    subprocess.run(["git", "add", "dvc.lock"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "tiny"], cwd=project, check=True)
    shutil.rmtree(project / "models")
    for rev in ("HEAD", "tiny"):
        by_rev = load_autoencoder("models/best.pt", rev=rev, repo=project, scale_factor=scale)
        assert torch.equal(by_rev.encode(images), latents)
    with pytest.raises(FileNotFoundError, match=r"models/nope\.pt at revision 'HEAD'.*dvc pull"):
        load_autoencoder("models/nope.pt", rev="HEAD", repo=project)


def test_a_missing_file_names_the_path_and_how_to_produce_it(tmp_path):
    expected = re.escape(str(tmp_path / "export" / "autoencoder.pt"))
    with pytest.raises(FileNotFoundError, match=rf"{expected}: .*`dvc exp run` produces it"):
        load_autoencoder(repo=tmp_path)


def test_import_aeselect_stays_light():
    code = (
        "import sys, aeselect; assert 'torch' not in sys.modules; "
        "assert callable(aeselect.load_autoencoder)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
