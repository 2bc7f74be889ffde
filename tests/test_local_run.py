"""`phase run` drains with the cluster's drainer: a run killed with SIGKILL (the OOM killer, a
crashed box) is recovered by running the phase again, and nothing stays "running"."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY, make_project
from test_phase_runs import tiny_phases
from test_phases import VALID, aeselect

from aeselect.dvc import run_dvc

LONG = {"train.max_steps": 300, "train.eval_every": 50, "train.log_every": 10}


def start_phase_run(project, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "aeselect", "phase", "run", *args, "--repo", str(project)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the drainer, dvc and the trainings
    )


def wait_for_training(project, timeout: float = 240) -> None:
    """Until a training has logged its first steps (its experiment's log under hpc/logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("[train] device" in p.read_text() for p in (project / "hpc/logs").glob("*.log")):
            return
        time.sleep(0.2)
    raise AssertionError("no training started")


@pytest.mark.slow
def test_a_phase_run_killed_with_sigkill_is_finished_by_running_it_again(tmp_path):
    project = make_project(tmp_path / "project", TINY | LONG)
    tiny_phases(project, ("1.1", VALID))
    crashed = start_phase_run(project, "1.1", "-j", "2")
    wait_for_training(project)
    time.sleep(2)
    os.killpg(crashed.pid, signal.SIGKILL)  # every process of the run, at once
    crashed.wait(timeout=30)
    status = aeselect(project, "status", "1.1", check=False).stdout
    assert "success" not in status, status

    again = aeselect(project, "run", "1.1", "-j", "2")
    assert re.search(r"^p1-1-lc2: success$", again.stdout, re.M), again.stdout
    assert re.search(r"^p1-1-lc4: success$", again.stdout, re.M), again.stdout
    status = aeselect(project, "status", "1.1").stdout
    assert status.count("success") == 2 and "running" not in status and "queued" not in status
    # Each experiment succeeded exactly once, under its first name: the killed run ran again.
    names = run_dvc(["exp", "ls", "--name-only"], cwd=project).stdout.split()
    assert sorted(names) == ["p1-1-lc2", "p1-1-lc4"]


@pytest.mark.slow
def test_phase_run_exits_non_zero_naming_the_experiment_that_failed(tmp_path):
    project = make_project(tmp_path / "project", TINY)
    tiny_phases(project, ("1.1", VALID))
    (project / "src/aeselect/training/loss.py").write_text("raise SystemExit('broken on purpose')")
    subprocess.run(["git", "commit", "-qam", "break training"], cwd=project, check=True)
    run = aeselect(project, "run", "1.1", check=False)
    assert run.returncode == 1
    assert "not done: p1-1-lc2, p1-1-lc4" in run.stderr, run.stderr
    assert re.search(r"^p1-1-lc2: failed$", run.stdout, re.M), run.stdout


@pytest.mark.slow
def test_phase_run_starts_the_experiments_in_the_phase_files_order(tmp_path):
    # The claims are files read in name order (lc2 before lc4); the file lists lc4 first.
    project = make_project(tmp_path / "project", TINY)
    swapped = VALID.replace(
        "  lc2: {model.latent_channels: 2}\n      lc4: {model.latent_channels: 4}",
        "  lc4: {model.latent_channels: 4}\n      lc2: {model.latent_channels: 2}",
    )
    assert swapped != VALID
    tiny_phases(project, ("1.1", swapped))
    run = aeselect(project, "run", "1.1", "-j", "1")
    started = re.findall(r"^\[drain\] (p1-1-lc\d): started", run.stderr, re.M)
    assert started == ["p1-1-lc4", "p1-1-lc2"], run.stderr
