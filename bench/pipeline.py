"""DVC benchmarks: per-experiment overhead against DVC's floor, and a queued phase at -j 1 / -j 2.

Stage processes are timed from inside the real DVC runs: a `python` shim first on PATH (the stage
commands are `PYTHONPATH=src python -m aeselect.stages <stage>`) logs each stage's start, end,
thread setting and, after `train`, a copy of results/train/metrics.json; then it exits with the
stage's status. DVC's own executable is launched through its shebang, so only stage commands hit
the shim.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import ROOT, BenchError, Result, Stats, dvc, log, make_project, run_cmd, tool_env

from aeselect.envvars import THREADS_ENV
from aeselect.paths import TRAIN_METRICS
from aeselect.sweep.tasks import queue_states

LOG_ENV = "AESELECT_BENCH_LOG"
SHIM = """#!/bin/sh
# aeselect bench: time stage commands (python -m aeselect.stages STAGE) as DVC runs them.
start=$(date +%s.%N)
"{python}" "$@"
rc=$?
end=$(date +%s.%N)
case "$*" in
  *"-m aeselect"*)
    stage=$3
    echo "$start $end $rc $stage ${{{threads}:-}} $$" >> "${log}"
    if [ "$stage" = train ] && [ -f {metrics} ]; then
      cp {metrics} "${log}.train.$$.json"
    fi;;
esac
exit $rc
"""


class StageLog:
    """The shim's log: one line per stage process, plus the train metrics it copied."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.shim_dir = directory / "shim"
        self.shim_dir.mkdir(exist_ok=True)
        shim = self.shim_dir / "python"
        script = SHIM.format(
            python=sys.executable, threads=THREADS_ENV, log=LOG_ENV, metrics=TRAIN_METRICS
        )
        shim.write_text(script)
        shim.chmod(0o755)
        self.path = directory / "stages.log"
        self.clear()

    def clear(self) -> None:
        self.path.write_text("")
        for old in self.path.parent.glob(self.path.name + ".train.*.json"):
            old.unlink()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = tool_env(extra)
        env["PATH"] = f"{self.shim_dir}{os.pathsep}{env['PATH']}"
        env[LOG_ENV] = str(self.path)
        return env

    def read(self) -> dict[str, Any]:
        stages = []
        for line in self.path.read_text().splitlines():
            start, end, rc, stage, threads, pid = (line.split(" ") + [""] * 6)[:6]
            stages.append(
                {
                    "stage": stage,
                    "start": float(start),
                    "seconds": float(end) - float(start),
                    "rc": int(rc),
                    "threads": threads,
                    "pid": pid,
                }
            )
        metrics = [
            json.loads(p.read_text())
            for p in sorted(self.path.parent.glob(self.path.name + ".train.*.json"))
        ]
        return {"stages": stages, "train_metrics": metrics}


def _empty_repo(directory: Path) -> Path:
    """DVC's floor: a Git+DVC repo whose dvc.yaml has one stage, `cmd: true`."""
    directory.mkdir(parents=True)
    run_cmd(["git", "init", "-q", "-b", "main"], directory, timeout=60)
    run_cmd(dvc("init", "-q"), directory, timeout=120)
    (directory / "dvc.yaml").write_text('stages:\n  noop:\n    cmd: "true"\n')
    run_cmd(["git", "add", "-A"], directory, timeout=60)
    run_cmd(["git", "commit", "-q", "-m", "empty pipeline"], directory, timeout=60)
    return directory


def tiny_experiments(project: Path, empty: Path, stage_log: StageLog, repeats: int) -> dict:
    """Per repeat: both floors, then one tiny `dvc exp run --temp` with its stages timed."""
    floors: dict[str, list[float]] = {"workspace": [], "temp": []}
    runs = []
    for r in range(repeats):
        for mode, args in (("workspace", []), ("temp", ["--temp"])):
            wall, out = run_cmd(dvc("exp", "run", *args), empty, timeout=120)
            if "noop" not in out.stdout:
                raise BenchError(f"empty stage did not run:\n{out.stdout[-2000:]}")
            floors[mode].append(wall)
        stage_log.clear()
        lr = f"train.lr={0.002 + 0.0001 * (r + 1):.4f}"
        wall, out = run_cmd(
            dvc("exp", "run", "--temp", "-S", lr), project, timeout=300, env=stage_log.env()
        )
        info = stage_log.read()
        ran = re.findall(r"Running stage '([^']+)'", out.stdout)
        if "train" not in ran or not info["train_metrics"]:
            raise BenchError(f"train did not run in the experiment (ran {ran}):\n{out.stdout}")
        runs.append({"wall": wall, "ran": ran, **info})
    return {"floors": floors, "runs": runs}


def bench_dvc(workdir: Path, quick: bool) -> Result:
    """Benchmark 4: DVC's overhead per tiny experiment (--temp) against its floor."""
    res = Result()
    project = make_project(workdir / "dvc_project")
    empty = _empty_repo(workdir / "dvc_empty")
    stage_log = StageLog(workdir / "dvc_log")
    version, _ = run_cmd(dvc("--version"), empty, timeout=60)
    # Warm-up: the first experiment also runs `prepare` (then restored from the run cache).
    lr = "train.lr=0.00205"
    run_cmd(dvc("exp", "run", "--temp", "-S", lr), project, timeout=300, env=stage_log.env())
    measured = tiny_experiments(project, empty, stage_log, 2 if quick else 3)
    runs, floors = measured["runs"], measured["floors"]
    res.details |= {"runs": runs, "dvc_version_call_s": version}
    walls = [run["wall"] for run in runs]
    stage_sums = [sum(s["seconds"] for s in run["stages"]) for run in runs]
    loops = [float(run["train_metrics"][0]["train_time_s"]) for run in runs]
    res.add("dvc", "`dvc --version` (CLI start-up)", Stats([version]), "s")
    res.add("dvc", "floor: `dvc exp run`, empty stage", Stats(floors["workspace"]), "s")
    res.add("dvc", "floor: `dvc exp run --temp`, empty stage", Stats(floors["temp"]), "s")
    note = f"stages run: {', '.join(runs[-1]['ran'])} (prepare from run cache)"
    res.add("dvc", "tiny experiment `dvc exp run --temp`", Stats(walls), "s", note=note)
    note = "python start + imports + work, timed by a PATH shim"
    res.add("dvc", "  of which stage processes", Stats(stage_sums), "s", note=note)
    res.add("dvc", "  of which train loop (train_time_s)", Stats(loops), "s")
    overhead = Stats([w - s for w, s in zip(walls, stage_sums, strict=True)])
    target = Stats(floors["temp"]).median + 2
    name, bound = "DVC overhead per experiment (wall - stages)", f"<= floor + 2 s = {target:.1f} s"
    res.add("dvc", name, overhead, "s", target=bound, ok=overhead.median <= target)
    beyond = Stats([w - lp for w, lp in zip(walls, loops, strict=True)])
    note = "DVC + process start/imports + evaluate + checkpoints"
    res.add("dvc", "wall - train_time_s (all non-training time)", beyond, "s", note=note)
    res.details["stage_breakdown"] = _stage_means(runs)
    res.details["imports"] = import_costs(workdir)
    for name, seconds in res.details["imports"].items():
        res.add("dvc", f"import {name}", Stats(seconds), "s", note="fresh interpreter")
    return res


def _stage_means(runs: list[dict[str, Any]]) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for run in runs:
        for s in run["stages"]:
            per.setdefault(s["stage"], []).append(s["seconds"])
    return {name: sum(v) / len(v) for name, v in per.items()}


def import_costs(workdir: Path, repeats: int = 3) -> dict[str, list[float]]:
    """Interpreter start + imports of what each stage process loads before doing any work."""
    modules = {
        "python + torch + dvclive": "import torch, dvclive",
        "aeselect.training.loop (train stage)": "import aeselect.training.loop",
        "aeselect.evaluation.evaluate (evaluate stage)": "import aeselect.evaluation.evaluate",
    }
    env = tool_env({"PYTHONPATH": str(ROOT / "src")})
    out: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(repeats):
        for name, code in modules.items():
            wall, _ = run_cmd([sys.executable, "-c", code], workdir, timeout=120, env=env)
            out[name].append(wall)
    return out


def _queue_counts(project: Path) -> Counter:
    """Tasks per state in DVC's queue (aeselect's parser: a Running task whose process is gone
    counts as Stuck)."""
    return Counter(task.status for task in queue_states(project).values())


def _workers_gone(project: Path, env: dict[str, str], timeout: float) -> None:
    """Wait until no queue worker is left (a leftover idle worker keeps its old env)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, out = run_cmd(dvc("queue", "status"), project, timeout=120, env=env)
        match = re.search(r"Worker status: (\d+) active, (\d+) idle", out.stdout)
        if not match or match.groups() == ("0", "0"):
            return
        time.sleep(2)
    run_cmd(dvc("queue", "stop"), project, timeout=120, env=env, check=False)


def drain(
    project: Path, jobs: int, lrs: list[str], stage_log: StageLog, timeout: float, poll_s: float
) -> dict[str, Any]:
    """Queue one experiment per lr, then `dvc queue start -j jobs` and poll until drained."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = stage_log.env({THREADS_ENV: str(threads)})
    stage_log.clear()
    queue_start = time.perf_counter()
    for lr in lrs:
        run_cmd(dvc("exp", "run", "--queue", "-S", f"train.lr={lr}"), project, timeout=120, env=env)
    queued_s = time.perf_counter() - queue_start
    start = time.perf_counter()
    run_cmd(dvc("queue", "start", "-j", str(jobs)), project, timeout=120, env=env)
    polls = 0
    while (counts := _queue_counts(project))["Queued"] + counts["Running"]:
        polls += 1
        if time.perf_counter() - start > timeout:
            kill = dvc("queue", "kill", "--force", "--all")
            run_cmd(kill, project, timeout=120, env=env, check=False)
            raise BenchError(f"-j {jobs}: queue not drained after {timeout:.0f} s: {counts}")
        time.sleep(poll_s)
    wall = time.perf_counter() - start
    if counts["Failed"] or counts["Stuck"]:
        raise BenchError(
            f"-j {jobs}: experiments failed or died, {counts} (see `dvc queue logs <task>` "
            f"in {project})"
        )
    _workers_gone(project, env, timeout=60)
    info = stage_log.read()
    seen = {s["threads"] for s in info["stages"]}
    if seen != {str(threads)}:
        raise BenchError(f"-j {jobs}: stages saw {THREADS_ENV}={seen}, not {threads}")
    return {
        "jobs": jobs,
        "threads": threads,
        "queue_add_s": queued_s,
        "drain_s": wall,
        "polls": polls,
        "counts": dict(counts),
        "stage_means": _stage_means([info]),
        "train_time_s": [float(m["train_time_s"]) for m in info["train_metrics"]],
    }


def bench_queue(workdir: Path, quick: bool) -> Result:
    """Benchmark 5: 4 tiny experiments drained by `dvc queue start -j 1` and `-j 2`."""
    res = Result()
    project = make_project(workdir / "queue_project")
    stage_log = StageLog(workdir / "queue_log")
    # Warm-up: populate the cache and run cache with `prepare`, as a phase's baseline has.
    lr = "train.lr=0.0031"
    run_cmd(dvc("exp", "run", "--temp", "-S", lr), project, timeout=300, env=stage_log.env())
    order = [1, 2] if quick else [1, 2, 2, 1]
    phases: list[dict[str, Any]] = []
    counter = 0
    try:
        for jobs in order:
            lrs = [f"{0.003 + 0.00001 * (counter + i):.5f}" for i in range(4)]  # unique: no cache
            counter += 4
            log(f"queue phase -j {jobs}: 4 experiments")
            phases.append(drain(project, jobs, lrs, stage_log, timeout=400, poll_s=2.0))
    finally:
        run_cmd(dvc("queue", "stop"), project, timeout=120, check=False)
    res.details = {"phases": phases}
    by_jobs = {j: [p["drain_s"] for p in phases if p["jobs"] == j] for j in (1, 2)}
    res.add("queue", "4 tiny exps, -j 1 (2 threads each)", Stats(by_jobs[1]), "s")
    res.add("queue", "4 tiny exps, -j 2 (1 thread each)", Stats(by_jobs[2]), "s")
    # Pairs in run order, (-j 1, -j 2) then (-j 2, -j 1): each pair measured back to back.
    speedups = []
    for a, b in zip(phases[::2], phases[1::2], strict=True):
        one, two = (a, b) if a["jobs"] == 1 else (b, a)
        speedups.append(one["drain_s"] / two["drain_s"])
    sp = Stats(speedups)
    res.add("queue", "speed-up -j 2 over -j 1", sp, "x", target=">= 1.0x", ok=sp.median >= 1.0)
    res.add(
        "queue",
        "queueing 4 exps (`dvc exp run --queue` x4)",
        Stats([p["queue_add_s"] for p in phases]),
        "s",
    )
    for jobs in (1, 2):
        means = [p["stage_means"] for p in phases if p["jobs"] == jobs]
        for stage in ("train", "evaluate"):
            values = [m[stage] for m in means if stage in m]
            if values:
                res.add("queue", f"  {stage} stage process, -j {jobs}", Stats(values), "s")
    return res
