"""`make run`: all of Phase 1 on the embedded synthetic data, in a scratch clone of this repository.

Each phase is queued, drained, compared and promoted exactly as a user would do by hand; the
sweeps (1.1-1.4) train for SWEEP_STEPS steps, the final training (1.5) for what its file says.
The user's repository is never touched: the clone lives under build/ (ignored by Git).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import yaml

from aeselect.cluster.drain import drain
from aeselect.git import git
from aeselect.phases.promote import promote, read_decision, require_decided
from aeselect.phases.report import compare, display_table
from aeselect.sweep.queue import queue_phase
from aeselect.sweep.spec import DECISIONS_DIR, PhaseError, PhaseSpec, all_phases

SCRATCH = Path("build/phase1-demo")
# Chosen by measurement (README, "The demo's numbers"): with the block-PCA shortcut every sweep
# model is near its latent's linear bound by then. `make run`, set-up included, took 13 min 19 s
# on a 2-core CPU with the final's 1200 steps, and 16 min 47 s once the probe stage was added.
SWEEP_STEPS = 200
VAL_POINTS = 10  # points on each sweep's val curve
DEMO_IDENTITY = {
    "GIT_AUTHOR_NAME": "aeselect demo",
    "GIT_AUTHOR_EMAIL": "demo@aeselect.invalid",
    "GIT_COMMITTER_NAME": "aeselect demo",
    "GIT_COMMITTER_EMAIL": "demo@aeselect.invalid",
}


def sweep_schedule(steps: int) -> dict[str, int]:
    """The sweeps' override: `steps` train steps, validated VAL_POINTS times along the way."""
    return {"train.max_steps": steps, "train.eval_every": max(1, steps // VAL_POINTS)}


def make_scratch_clone(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    git(Path.cwd(), "clone", "-q", str(source), str(target))
    return target


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _verdict(met: bool) -> str:
    return "met" if met else "not met"


def decision_summary(decision: dict) -> str:
    """One line per decision: the winner, the verdict and every other candidate's difference from
    the best in the primary metric with its 95% interval (or why none exists)."""
    others = []
    for candidate in decision["candidates"]:
        if candidate.get("versus_best") in (None, "best"):
            continue
        interval = candidate.get("interval_95")
        bounds = "no interval" if interval is None else f"[{interval[0]:+.3g}, {interval[1]:+.3g}]"
        difference = candidate["difference_from_best"]
        others.append(
            f"{candidate['experiment']} {difference:+.3g} {bounds} ({candidate['versus_best']})"
        )
    metric = decision["rule"]["metric"]
    against = f"; {metric} vs best: " + ", ".join(others) if others else ""
    return f"{decision['phase']} {decision['winner']} ({decision['verdict']}){against}"


class StepClock:
    """Wall seconds of a phase's steps, in order: where a phase's time goes."""

    def __init__(self) -> None:
        self.mark = time.monotonic()
        self.laps: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self.laps[step], self.mark = now - self.mark, now

    def __str__(self) -> str:
        return ", ".join(f"{step} {seconds:.0f}" for step, seconds in self.laps.items())


def run_demo(args: argparse.Namespace) -> int:
    source = Path(args.repo).resolve()
    if git(source, "status", "--porcelain", "--untracked-files=no").strip():
        print("note: uncommitted changes are not part of the demo (it runs a clone of HEAD)")
    for key, value in DEMO_IDENTITY.items():  # commits in the clone need no global Git config
        os.environ.setdefault(key, value)
    repo = make_scratch_clone(source, source / args.scratch)
    print(f"Phase 1 demo in {repo} (a clone of {source})\n")
    started = time.monotonic()
    timings = {
        spec.id: run_phase(repo, spec, args.jobs, args.sweep_steps)
        for spec in all_phases(repo / "phases")
    }
    print_result(repo, timings, time.monotonic() - started)
    return 0


def run_phase(repo: Path, spec: PhaseSpec, jobs: int, sweep_steps: int) -> float:
    """Queue, drain, compare and promote one phase as a user would; returns its wall time."""
    phase_start = time.monotonic()
    print(f"== phase {spec.id}: {spec.title} ==")
    require_decided(spec, repo)
    sets_steps = any("train.max_steps" in p for p in spec.experiments.values())
    extra = {} if sets_steps else sweep_schedule(sweep_steps)
    steps = StepClock()
    queue_phase(repo, spec, extra)
    steps.lap("queue")
    if drain(repo, spec, jobs) != 0:
        raise PhaseError(f"phase {spec.id}: an experiment failed; its log is under hpc/logs/")
    steps.lap("drain")
    comparison = compare(repo, spec, extra)
    steps.lap("compare")
    table = comparison.ranking.table
    print(display_table(spec, table).to_string(index=False))
    decision = promote(repo, spec, extra, gathered=comparison.phase)
    steps.lap("promote")
    elapsed = time.monotonic() - phase_start
    trained = float(table.loc[table["state"] == "Success", "train_time_s"].sum())
    print(f"-> {decision['commit_message']}  [{elapsed:.0f} s: {steps}]")
    print(
        f"   efficiency: {trained:.0f} s of training / ({elapsed:.0f} s wall x {jobs} jobs) "
        f"= {trained / (elapsed * jobs):.0%}"
    )
    print(f"   why: {decision['rationale']}")
    print(f"   report: {comparison.report_dir.relative_to(repo)}/report.md\n")
    return elapsed


def print_result(repo: Path, timings: dict[str, float], total: float) -> None:
    """Phase 1's result from final.yaml: latent shape, success criteria, decisions, timings."""
    final = yaml.safe_load((repo / DECISIONS_DIR / "final.yaml").read_text())
    print("== Phase 1 result (phases/decisions/final.yaml) ==")
    print(f"latent shape HxWxC at 512px: {final['latent_shape_hwc_at_512']}")
    size, shape = final["trained_image_size"], final["latent_shape_hwc_trained"]
    print(f"latent shape at the demo's {size}px: {shape}")
    print(f"success criteria, bounds inclusive: {_verdict(final['success_criteria_met'])}")
    for gate, check in final["success_criteria"].items():
        values = ", ".join(map(_number, check["values"].values()))
        print(f"  {gate}: {values} ({check['target']}: {_verdict(check['met'])})")
    pooled = _number(final["metrics"].get("psnr_pooled"))
    print(f"  psnr_pooled: {pooled} (the val set's MSE in dB; not gated, psnr is per image)")
    print("decisions (winner, verdict; the others' difference from the best, 95% interval):")
    for phase_id in timings:
        print(f"  {decision_summary(read_decision(phase_id, repo))}")
    print(f"checkpoint: {final['checkpoint']['get']}")
    print("phase wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"total: {total:.0f} s\n")
    print(git(repo, "log", "--oneline", "-n", str(len(timings) + 1)))


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", default=".", help="repository to clone (default: .)")
    parser.add_argument("--scratch", default=str(SCRATCH), help="clone location inside the repo")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="parallel experiments")
    parser.add_argument("--sweep-steps", type=int, default=SWEEP_STEPS, help="train steps, 1.1-1.4")
