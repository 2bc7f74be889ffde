"""Preemption: SIGUSR1 mid-training snapshots and exits 75; the rerun resumes bit-identically.
The snapshot round trip keeps every field of the training state."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY

from aeselect.config import apply_overrides, from_dict, read_yaml
from aeselect.envvars import PREEMPTED_EXIT_CODE
from aeselect.model import Autoencoder
from aeselect.training.resume import (
    STATE_FILE,
    TrainState,
    load_snapshot_state,
    restore_snapshot,
    save_snapshot,
)

PARAMS = TINY | {"train.max_steps": 150, "train.log_every": 5, "train.eval_every": 25}
TIMING = {"train_time_s", "images_per_s"}


def stage(workdir: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "aeselect", name],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def workspace(path: Path, env: dict[str, str]) -> Path:
    path.mkdir()
    raw = apply_overrides(read_yaml(ROOT / "params.yaml"), PARAMS)
    (path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert stage(path, "prepare", env).wait() == 0
    return path


def logged_steps(workdir: Path) -> int:
    tsv = workdir / "results/train/plots/metrics/loss/total.tsv"
    return max(0, len(tsv.read_text().splitlines()) - 1) if tsv.exists() else 0


@pytest.mark.slow
def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(tmp_path):
    env = dict(os.environ)
    env.pop("AESELECT_RESUME_DIR", None)
    straight = workspace(tmp_path / "straight", env)
    assert stage(straight, "train", env).wait() == 0

    env["AESELECT_RESUME_DIR"] = str(tmp_path / "snapshots")
    interrupted = workspace(tmp_path / "interrupted", env)
    process = stage(interrupted, "train", env)
    deadline = time.monotonic() + 120
    while logged_steps(interrupted) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == PREEMPTED_EXIT_CODE, output
    assert "stopped at step" in output
    assert list((tmp_path / "snapshots").iterdir())

    resumed = stage(interrupted, "train", env)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    stopped_at = int(output.split("resumed at step ")[1].split()[0])
    assert 0 < stopped_at < PARAMS["train.max_steps"]
    assert not list((tmp_path / "snapshots").iterdir())  # a finished run leaves no snapshot

    def summary(workdir):
        data = json.loads((workdir / "results/train/metrics.json").read_text())
        return {k: v for k, v in data.items() if k not in TIMING}

    assert summary(interrupted) == summary(straight)
    curves = sorted(p.relative_to(straight) for p in straight.rglob("results/train/**/*.tsv"))
    for curve in curves:
        assert (interrupted / curve).read_text() == (straight / curve).read_text(), curve
    a = torch.load(straight / "models/best.pt", weights_only=True)["model"]
    b = torch.load(interrupted / "models/best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def trained_model(seed: int) -> tuple[Autoencoder, torch.optim.Optimizer]:
    """A small VAE after one AdamW step: weights and optimiser moments that no new one has."""
    cfg = from_dict({"model": {"variational": True, "base_channels": 8, "aux_hidden_channels": 8}})
    torch.manual_seed(seed)
    model = Autoencoder(cfg.model, aux_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 3, 16, 16), generator=torch.Generator()).reconstruction.mean().backward()
    optimizer.step()
    return model, optimizer


def test_the_snapshot_round_trip_keeps_every_field_of_the_state(tmp_path):
    state = TrainState(
        step=37,
        best_val_mse=0.0123,
        best_step=25,
        loss_history=[0.5, 0.25, 0.125],
        val_history=[0.02, 0.0123],
        train_seconds=12.5,
    )
    # Every field set away from its default: a field added to TrainState but not here fails.
    for field in dataclasses.fields(TrainState):
        assert getattr(state, field.name) != getattr(TrainState(), field.name), field.name
    model, optimizer = trained_model(seed=0)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "best.pt").write_bytes(b"weights")
    save_snapshot(tmp_path / "snap", state.snapshot(model, optimizer), [tmp_path / "models"])
    (tmp_path / "models" / "best.pt").write_bytes(b"newer")

    snapshot = restore_snapshot(tmp_path / "snap", [tmp_path / "models"])
    assert (tmp_path / "models" / "best.pt").read_bytes() == b"weights"
    fresh_model, fresh_optimizer = trained_model(seed=1)
    assert not torch.equal(fresh_model.encoder.stem.weight, model.encoder.stem.weight)
    restored = TrainState.resume(snapshot, fresh_model, fresh_optimizer)
    assert restored == state
    for field in dataclasses.fields(TrainState):
        assert type(getattr(restored, field.name)) is type(getattr(state, field.name))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], value), key
    moments = [s for s in optimizer.state_dict()["state"].values()]
    restored_moments = [s for s in fresh_optimizer.state_dict()["state"].values()]
    assert len(moments) == len(restored_moments) > 0
    for kept, loaded in zip(moments, restored_moments, strict=True):
        assert all(torch.equal(kept[name], loaded[name]) for name in kept)
    assert load_snapshot_state(tmp_path / "nowhere") is None


def test_a_snapshot_missing_a_field_is_refused(tmp_path):
    model, optimizer = trained_model(seed=0)
    snapshot = TrainState(step=5).snapshot(model, optimizer)
    del snapshot["val_history"]
    torch.save(snapshot, tmp_path / STATE_FILE)
    with pytest.raises(KeyError, match="val_history"):
        TrainState.resume(load_snapshot_state(tmp_path), model, optimizer)
