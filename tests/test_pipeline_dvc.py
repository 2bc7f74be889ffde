"""The pipeline under real `dvc exp run` in a temporary Git+DVC repository."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from aeselect.dvc import run_dvc

pytestmark = pytest.mark.slow

# Wall-clock figures differ between identical runs; everything else must match exactly.
TIMING_KEYS = {"train_time_s", "images_per_s", "cost"}


def read_metrics(repo, stage):
    return json.loads((repo / "results" / stage / "metrics.json").read_text())


def deterministic(metrics):
    return {key: value for key, value in metrics.items() if key not in TIMING_KEYS}


def test_exp_run_trains_evaluates_and_reruns_identically(project):
    run_dvc(["exp", "run"], cwd=project)
    evaluated = read_metrics(project, "evaluate")
    trained = read_metrics(project, "train")
    assert evaluated["latent"]["shape"] == "4x4x4"
    assert 0 < evaluated["mse"] < 0.5
    assert 3 < evaluated["psnr"] < 60
    assert -1 <= evaluated["ssim"] <= 1
    assert 0 <= evaluated["aux_pixel_acc"] <= 1
    assert all(math.isfinite(v) for v in trained["val"].values())
    assert (project / "models" / "best.pt").exists()
    assert (project / "results" / "evaluate" / "per_image.csv").exists()
    assert list((project / "results" / "train" / "plots" / "images").rglob("*.png"))

    # No change -> nothing re-runs.
    rerun = run_dvc(["exp", "run"], cwd=project).stdout
    assert "Running stage" not in rerun

    # Forced re-run of every stage: bit-identical metrics.
    run_dvc(["exp", "run", "--force"], cwd=project)
    assert deterministic(read_metrics(project, "evaluate")) == deterministic(evaluated)
    assert deterministic(read_metrics(project, "train")) == deterministic(trained)

    # A phase's -S changes what is trained, and dvc exp show reports it.
    run_dvc(["exp", "run", "-n", "lc8", "-S", "model.latent_channels=8"], cwd=project)
    assert read_metrics(project, "evaluate")["latent"]["shape"] == "4x4x8"
    shown = json.loads(run_dvc(["exp", "show", "--json"], cwd=project).stdout)
    names = [exp.get("name") for rev in shown for exp in (rev.get("experiments") or [])]
    assert "lc8" in names


def test_a_typo_in_a_set_param_fails_the_stage_with_the_key_named(project):
    result = run_dvc(["exp", "run", "-S", "+model.latent_chanels=8"], cwd=project, check=False)
    assert result.returncode != 0
    assert (
        "model.latent_chanels: unknown key; did you mean 'model.latent_channels'" in result.stdout
    )


def test_stage_entry_reports_config_errors_without_a_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("model:\n  downsampling_steps: 9\n")
    result = subprocess.run(
        ["python", "-m", "aeselect", "train"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "params.yaml: model.downsampling_steps: must be in [1, 6], got 9" in result.stderr
    assert "Traceback" not in result.stderr
