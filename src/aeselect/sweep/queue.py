"""Queueing a phase's runs in DVC.

Concurrent `dvc exp run --queue` calls fail now and then with `Unable to acquire lock`
(dvc 3.67.1): each is retried.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aeselect.dvc import DvcError, exp_run_command, run_dvc
from aeselect.git import git
from aeselect.sweep.runs import experiment_params, load_phase_runs
from aeselect.sweep.spec import PhaseSpec
from aeselect.sweep.status import Status
from aeselect.sweep.sweep_record import record_sweep

# Paths whose uncommitted edits a queued experiment would silently snapshot.
SNAPSHOT_PATHS = ("params.yaml", "dvc.yaml", "src")
LOCK_RETRIES = 5


def dirty_paths(repo: Path, paths: tuple[str, ...] = SNAPSHOT_PATHS) -> list[str]:
    """Tracked edits and untracked files under `paths` (a queued run snapshots or drops them)."""
    out = git(repo, "status", "--porcelain", "--untracked-files=all", "--", *paths)
    return [line[3:] for line in out.splitlines() if line.strip()]


def queue_phase(
    repo: Path,
    spec: PhaseSpec,
    sweep: dict[str, Any],
    *,
    retry_failed: bool = True,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Queue a run for each experiment that has no fresh run done or under way (and, with
    `retry_failed`, for each whose fresh run failed); returns the runs that now speak for the
    phase, queued here or before.

    Stale runs never count: their still-queued tasks are removed from DVC's queue (they could
    never be used), and a fresh run is queued under a new name.
    """
    view = load_phase_runs(repo, spec, sweep)  # validates every experiment before any is queued
    if not dry_run:
        record_sweep(repo, spec, sweep)
    current: list[str] = []
    for phase_run in spec.runs():
        for run in view.stale(phase_run):
            if run.task and run.task.task and run.status == Status.QUEUED and not dry_run:
                run_dvc(["queue", "remove", run.name], cwd=repo)
                echo(f"{run.name}: removed from DVC's queue (stale: queued on {run.ran_on})")
        run = view.current(phase_run)
        if run is not None and not view.wants_new_run(phase_run, retry_failed):
            echo(f"{run.name}: already {run.status}; not queued again")
            current.append(run.name)
            continue
        name = view.next_name(phase_run)
        args = exp_run_command(name, experiment_params(spec, phase_run, sweep), queue=True)
        if dry_run:
            echo(shlex.join(["dvc", *args]))
            continue
        _run_with_lock_retry(repo, args)
        stale = view.stale(phase_run)
        if run is not None:
            why = f" (again: {run.name} failed)"
        elif stale:
            why = f" ({stale[-1].name} is stale: it ran on {stale[-1].ran_on})"
        else:
            why = ""
        echo(f"{name}: queued{why}")
        current.append(name)
    return current


def _run_with_lock_retry(repo: Path, args: list[str]) -> None:
    for attempt in range(LOCK_RETRIES):
        try:
            run_dvc(args, cwd=repo)
            return
        except DvcError as err:
            if "Unable to acquire lock" not in str(err) or attempt == LOCK_RETRIES - 1:
                raise
            time.sleep(1 + attempt)
