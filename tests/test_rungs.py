"""Budget rungs: a training paused at each rung (per-image scores written, snapshot saved, exit 76)
and resumed ends bit-identical to one that never paused; bad rungs are refused up front."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch
from conftest import ROOT
from test_resume import PARAMS, TIMING, stage, workspace

from aeselect.config import apply_overrides, from_dict, read_yaml
from aeselect.envvars import RUNG_DIR_ENV, RUNG_EXIT_CODE, RUNGS_ENV
from aeselect.scoring.per_image import PAIRING_KEY, PER_IMAGE_METRICS
from aeselect.training.rungs import rung_plan

RUNGS = (50, 100)


def summary(workdir):
    data = json.loads((workdir / "results/train/metrics.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMING}


@pytest.mark.slow
def test_a_run_paused_at_every_rung_ends_as_one_that_never_paused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (RUNGS_ENV, "AESELECT_RESUME_DIR")}
    straight = workspace(tmp_path / "straight", env)
    assert stage(straight, "train", env).wait() == 0

    rung_dir = tmp_path / "rungs"
    env |= {
        "AESELECT_RESUME_DIR": str(tmp_path / "snapshots"),
        RUNGS_ENV: ",".join(map(str, RUNGS)),
        RUNG_DIR_ENV: str(rung_dir),
    }
    paused = workspace(tmp_path / "paused", env)
    for rung in RUNGS:
        process = stage(paused, "train", env)
        output = process.communicate(timeout=300)[0]
        assert process.returncode == RUNG_EXIT_CODE, output
        assert f"stopped at step {rung} at rung step {rung}" in output
    finished = stage(paused, "train", env)
    output = finished.communicate(timeout=300)[0]
    assert finished.returncode == 0, output
    assert f"resumed at step {RUNGS[-1]}" in output

    assert summary(paused) == summary(straight)
    for curve in sorted(p.relative_to(straight) for p in straight.rglob("results/train/**/*.tsv")):
        assert (paused / curve).read_text() == (straight / curve).read_text(), curve
    a = torch.load(straight / "models/best.pt", weights_only=True)["model"]
    b = torch.load(paused / "models/best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    first, second = (pd.read_csv(rung_dir / f"rung_{rung}.csv") for rung in RUNGS)
    assert list(first.columns) == [PAIRING_KEY, *PER_IMAGE_METRICS]
    assert set(first[PAIRING_KEY]) == set(second[PAIRING_KEY]) and first[PAIRING_KEY].is_unique
    # Scored on the weights at each rung, as the loop's own val pass at that step scored them.
    logged = pd.read_csv(straight / "results/train/plots/metrics/val/mse.tsv", sep="\t")
    for rung, scores in zip(RUNGS, (first, second), strict=True):
        at_rung = logged.loc[logged["step"] == rung, "mse"].item()
        assert scores["mse"].mean() == pytest.approx(at_rung, rel=1e-6)
    assert first["mse"].mean() != second["mse"].mean()


def config():
    return from_dict(apply_overrides(read_yaml(ROOT / "params.yaml"), PARAMS))


@pytest.mark.parametrize(
    ("rungs", "message"),
    [
        ("52", "multiple of train.log_every=5"),
        ("150", "must lie in (0, train.max_steps=150)"),
        ("100,50", "steps must increase"),
        ("half", "expected comma-separated steps"),
    ],
)
def test_bad_rungs_are_refused_naming_the_variable(monkeypatch, tmp_path, rungs, message):
    monkeypatch.setenv(RUNGS_ENV, rungs)
    monkeypatch.setenv(RUNG_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=RUNGS_ENV) as error:
        rung_plan(config(), tmp_path / "snapshot")
    assert message in str(error.value)


def test_rungs_need_a_resume_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(RUNGS_ENV, "50")
    monkeypatch.setenv(RUNG_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="AESELECT_RESUME_DIR"):
        rung_plan(config(), None)
    monkeypatch.delenv(RUNGS_ENV)
    assert rung_plan(config(), None) is None
