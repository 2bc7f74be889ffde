"""Run a phase's queued experiments on this machine: DVC's own queue workers, waited on until each
run has ended (`phase run` and the demo; on a cluster, aeselect.cluster.drain does this)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from aeselect.dvc import queue_status, start_queue_workers
from aeselect.envvars import THREADS_ENV
from aeselect.sweep.experiments import TERMINAL, task_states

POLL_SECONDS = 2.0
STUCK_GRACE_SECONDS = 30.0


def wait_for_phase(
    repo: Path, names: list[str], jobs: int, *, echo: Callable[[str], None] = print
) -> dict[str, str]:
    """Drain the queue until each of the runs `names` is Success or Failed.

    A task still Queued while no worker runs (DVC once lost one at a worker's idle shutdown)
    gets workers started again; a Stuck task (its worker was killed) is reported, not waited on.
    """
    jobs = max(1, min(jobs, len(names)))  # a one-experiment phase gets every core
    env = {THREADS_ENV: str(max(1, (os.cpu_count() or 1) // jobs))}
    start_queue_workers(jobs, repo, env)
    seen: dict[str, str] = {}
    stuck_since: dict[str, float] = {}
    start = time.monotonic()
    while True:
        current = _statuses(repo, names, stuck_since)
        for name, status in current.items():
            if seen.get(name) != status:
                echo(f"[{time.monotonic() - start:6.0f}s] {name}: {status.lower()}")
        seen = current
        pending = [n for n, s in current.items() if s not in (*TERMINAL, "Stuck", "Missing")]
        if not pending:
            return current
        if all(current[n] == "Queued" for n in pending) and not _workers_alive(repo):
            start_queue_workers(jobs, repo, env)
        time.sleep(POLL_SECONDS)


def _statuses(repo: Path, names: list[str], stuck_since: dict[str, float]) -> dict[str, str]:
    """Each run's status now; a finished task is "Running" with its process gone until DVC
    collects it, so only a task stuck that way for STUCK_GRACE_SECONDS counts as Stuck (killed)."""
    states = task_states(repo)
    current = {n: states[n].status if n in states else "Missing" for n in names}
    now = time.monotonic()
    for name, status in current.items():
        if status != "Stuck":
            stuck_since.pop(name, None)
        elif now - stuck_since.setdefault(name, now) < STUCK_GRACE_SECONDS:
            current[name] = "Running"
    return current


def _workers_alive(repo: Path) -> bool:
    return queue_status(repo).active_workers > 0
