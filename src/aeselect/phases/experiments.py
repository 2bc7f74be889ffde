"""A phase's experiments in DVC: queue them, read their states, collect their results.

Facts designed around (dvc 3.67.1): `dvc queue status` has no JSON; `dvc exp show` lists a failed
experiment with an error and no metrics; concurrent `dvc exp run --queue` calls fail now and then
with `Unable to acquire lock`; a worker killed with SIGKILL leaves its task "Running" forever.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from aeselect.config import PARAMS_FILE, ConfigError, apply_overrides, flatten, from_dict, read_yaml
from aeselect.dvc import DvcError, run_dvc
from aeselect.phases.spec import PhaseError, PhaseRun, PhaseSpec

RUN_DIR = Path(".dvc/tmp/exps/run")
DRAIN_DIR = Path(".dvc/tmp/aeselect-drain")  # the drainer's claims (aeselect.cluster.drain)
METRICS_FILES = ("results/evaluate/metrics.json", "results/train/metrics.json")
# Paths whose uncommitted edits a queued experiment would silently snapshot.
SNAPSHOT_PATHS = ("params.yaml", "dvc.yaml", "src")
LOCK_RETRIES = 5
TERMINAL = ("Success", "Failed")


@dataclass(frozen=True)
class TaskState:
    name: str
    task: str  # DVC's short task id
    status: str  # Queued | Running | Success | Failed | Stuck | Missing
    log: str = ""  # set for drained tasks; DVC's queue keeps its logs by task id

    def log_path(self, repo: Path) -> Path | None:
        if self.log:
            return repo / self.log
        matches = sorted((repo / RUN_DIR).glob(f"{self.task}*/{self.task}*.out"))
        return matches[0] if matches else None


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, text=True, capture_output=True)
    if result.returncode != 0:
        raise PhaseError(f"`git {' '.join(args)}` failed in {repo}: {result.stderr.strip()}")
    return result.stdout


def dirty_paths(repo: Path, paths: tuple[str, ...] = SNAPSHOT_PATHS) -> list[str]:
    """Tracked edits and untracked files under `paths` (a queued run snapshots or drops them)."""
    out = git(repo, "status", "--porcelain", "--untracked-files=all", "--", *paths)
    return [line[3:] for line in out.splitlines() if line.strip()]


def dvc_command(name: str, params: dict[str, Any]) -> list[str]:
    """`dvc exp run --queue -n NAME -S k=v ...` as an argument list (values in YAML syntax)."""
    sets: list[str] = []
    for key, value in params.items():
        sets += ["-S", f"{key}={json.dumps(value)}"]
    return ["exp", "run", "--queue", "-n", name, *sets]


def experiment_params(spec: PhaseSpec, run: PhaseRun, extra: dict[str, Any]) -> dict[str, Any]:
    """What one run sets on top of params.yaml: its experiment's params (and, with `repeats`,
    its training seed), then the sweep's --set."""
    clash = sorted(set(extra) & set(run.params))
    if clash:
        raise PhaseError(
            f"--set {', '.join(clash)}: phase {spec.id} run {run.name!r} sets this itself "
            f"({spec.path}: its experiment {run.key!r} or `repeats`); drop it from --set"
        )
    return {**run.params, **extra}


def queue_states(repo: Path) -> dict[str, TaskState]:
    """Name -> state from `dvc queue status`, Running tasks whose process is gone marked Stuck,
    then the drainer's claims (aeselect.cluster.drain), which own a task once it left the queue."""
    out = run_dvc(["queue", "status"], cwd=repo).stdout
    states: dict[str, TaskState] = {}
    for info in sorted((repo / DRAIN_DIR).glob("*.json")):
        claim = json.loads(info.read_text())
        status = {"claimed": "Queued", "interrupted": "Queued"}.get(claim["status"])
        states[claim["name"]] = TaskState(
            claim["name"], "", status or claim["status"].capitalize(), claim["log"]
        )
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 3 or line.startswith("Worker status"):
            continue
        task, name, status = fields[0], fields[1], fields[-1]
        if status == "Running" and not _task_alive(repo, task):
            status = "Stuck"
        states.setdefault(name, TaskState(name, task, status))
    return states


def _task_alive(repo: Path, task: str) -> bool:
    """A Running task whose recorded pid is gone was killed (SIGKILL) and will never finish."""
    infos = sorted((repo / RUN_DIR).glob(f"{task}*/{task}*.json"))
    if not infos:
        return True  # not started by the executor yet
    pid = json.loads(infos[0].read_text()).get("pid")
    if pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def queue_phase(
    repo: Path,
    spec: PhaseSpec,
    extra: dict[str, Any],
    *,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> list[str]:
    """Queue every experiment of the phase not yet queued or done; returns the names queued."""
    baseline = read_yaml(repo / PARAMS_FILE)
    commands: dict[str, list[str]] = {}
    for run in spec.runs():  # validate all before queuing any: a phase is queued whole
        params = experiment_params(spec, run, extra)
        try:
            from_dict(apply_overrides(baseline, params))
        except ConfigError as err:
            raise PhaseError(
                f"{spec.path}: experiment {run.key!r} on top of {PARAMS_FILE}: {err}"
            ) from None
        commands[run.name] = dvc_command(run.name, params)
    if dry_run:
        for args in commands.values():
            echo(shlex.join(["dvc", *args]))
        return []
    states = queue_states(repo)
    queued: list[str] = []
    for name, args in commands.items():
        if name in states:
            echo(f"{name}: already {states[name].status.lower()} in DVC's queue; not queued again")
            continue
        _run_with_lock_retry(repo, args)
        echo(f"{name}: queued")
        queued.append(name)
    return queued


def _run_with_lock_retry(repo: Path, args: list[str]) -> None:
    for attempt in range(LOCK_RETRIES):
        try:
            run_dvc(args, cwd=repo)
            return
        except DvcError as err:
            if "Unable to acquire lock" not in str(err) or attempt == LOCK_RETRIES - 1:
                raise
            time.sleep(1 + attempt)


def exp_show(repo: Path) -> list[dict[str, Any]]:
    """Every experiment of every commit (`-A`: promoted phases drop out of a plain exp show)."""
    out = run_dvc(["exp", "show", "--json", "-A", "--no-fetch"], cwd=repo).stdout
    return json.loads(out)


def collect_results(repo: Path, spec: PhaseSpec) -> pd.DataFrame:
    """One row per run of the phase (`key`, `repeat`): state, baseline, rev, params and metrics.

    Failed experiments keep their row (state Failed) without metrics, never the baseline's; an
    experiment not in exp show at all is Missing. When a name occurs more than once, the newest
    experiment wins, as in DVC's own lookup.
    """
    runs = {run.name: run for run in spec.runs()}
    names = {name: run.key for name, run in runs.items()}
    rows: dict[str, dict[str, Any]] = {}
    for baseline in exp_show(repo):
        for exp in baseline.get("experiments") or []:
            name = exp.get("name")
            if name not in names:
                continue
            rev = exp["revs"][0]
            data = rev.get("data") or {}
            row = {
                "experiment": name,
                "key": names[name],
                "repeat": runs[name].repeat,
                "state": "Failed" if rev.get("error") else "Success",
                "rev": rev.get("rev"),
                "baseline": baseline.get("rev"),
                "timestamp": data.get("timestamp"),
            }
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            row |= {f"params.{k}": v for k, v in flatten(params).items()}
            if not rev.get("error"):
                for path in METRICS_FILES:
                    metrics = (data.get("metrics") or {}).get(path, {}).get("data") or {}
                    row |= {k: v for k, v in flatten(metrics).items() if k not in row}
            previous = rows.get(name)
            if previous is None or (row["timestamp"] or "") >= (previous["timestamp"] or ""):
                rows[name] = row
    # exp show lists a queued or running experiment like a finished one: the queue knows better.
    states = queue_states(repo)
    for name, key in names.items():
        row = rows.setdefault(
            name,
            {"experiment": name, "key": key, "repeat": runs[name].repeat, "state": "Missing"},
        )
        if name in states and states[name].status != "Success":
            row["state"] = states[name].status
    return pd.DataFrame([rows[name] for name in names])
