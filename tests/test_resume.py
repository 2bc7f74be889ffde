"""Preemption: SIGUSR1 mid-training snapshots and exits 75; the rerun resumes bit-identically."""

from __future__ import annotations

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

from aeselect.config import apply_overrides, read_yaml
from aeselect.envvars import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow
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
