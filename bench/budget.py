"""Issue 21's measurement: phases 1.1 and 1.2 at 4x the demo's sweep steps, with and without rungs.

Two scratch clones of HEAD run the same phases with the same drainer; the second commits a
`budget:` section to each phase file first. Printed per phase and mode: the training steps spent
(a pruned run counts up to its rung, an excluded-untrained one zero), the wall time, the winner
and verdict, and where each loser left. Steps saved and "same winners and verdicts" are the
figures; wall time is the machine's (another process on the 2 cores shows in it).

    .venv/bin/python bench/budget.py                      # 1.1 and 1.2, 4x steps, rungs 0.25 0.5
    .venv/bin/python bench/budget.py --factor 2 --rungs 0.25 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from aeselect.cluster.claims import read_claims
from aeselect.demo import DEMO_IDENTITY, SWEEP_STEPS, make_scratch_clone, run_phase
from aeselect.git import git
from aeselect.phases.promote import read_decision
from aeselect.sweep.spec import load_phase
from aeselect.sweep.status import Status

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent  # budget-<modes>-slack<slack>.json


def add_budget(repo: Path, phase_ids: list[str], rungs: list[float], slack: float) -> None:
    """Commit `budget: {rungs, prune: true, slack}` into each phase file of the clone."""
    for phase_id in phase_ids:
        path = repo / "phases" / f"phase{phase_id.replace('.', '_')}.yaml"
        raw = yaml.safe_load(path.read_text())
        raw["budget"] = {"rungs": rungs, "prune": True, "slack": slack}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    git(repo, "commit", "-q", "-am", f"budget: rungs {rungs}, slack {slack}")


def phase_outcome(repo: Path, phase_id: str, max_steps: int) -> dict:
    """Steps spent and how each candidate ended, from the drainer's claims and the decision."""
    spec = load_phase(phase_id, repo / "phases")
    decision = read_decision(phase_id, repo)
    candidates = {}
    for claim in read_claims(repo, spec).values():
        steps = {Status.PRUNED: claim.pruned_at or 0, Status.EXCLUDED: 0}.get(
            claim.status, max_steps
        )
        left = {
            Status.PRUNED: f"pruned at step {claim.pruned_at}",
            Status.EXCLUDED: "excluded, untrained",
        }
        candidates[claim.name] = {"status": claim.status, "steps": steps}
        candidates[claim.name]["left"] = left.get(claim.status, "trained to the end")
    return {
        "winner": decision["winner"],
        "verdict": decision["verdict"],
        "steps": sum(c["steps"] for c in candidates.values()),
        "candidates": candidates,
    }


def run_mode(workdir: Path, mode: str, args: argparse.Namespace) -> dict:
    repo = make_scratch_clone(ROOT, workdir / mode)
    if mode == "rungs":
        add_budget(repo, args.phases, args.rungs, args.slack)
    steps = args.factor * SWEEP_STEPS
    outcome = {}
    for phase_id in args.phases:
        spec = load_phase(phase_id, repo / "phases")
        wall = run_phase(repo, spec, args.jobs, steps)
        outcome[phase_id] = phase_outcome(repo, phase_id, steps) | {"wall_s": round(wall, 1)}
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=int, default=4, help="sweep steps / the demo's")
    parser.add_argument("--rungs", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--slack", type=float, default=0.0, help="budget.slack")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("full", "rungs"),
        default=["full", "rungs"],
        help="full sweeps are deterministic: rerun only the rungs to try another schedule",
    )
    parser.add_argument("--phases", nargs="+", default=["1.1", "1.2"])
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the scratch clones")
    args = parser.parse_args()
    for key, value in DEMO_IDENTITY.items():
        os.environ.setdefault(key, value)
    workdir = Path(tempfile.mkdtemp(prefix="aeselect-budget-", dir=ROOT / "build"))
    try:
        results = {mode: run_mode(workdir, mode, args) for mode in args.modes}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out = RESULTS / f"budget-{'-'.join(args.modes)}-slack{args.slack}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    steps = args.factor * SWEEP_STEPS
    print(f"\n{args.factor}x sweep steps ({steps}), rungs {args.rungs}, slack {args.slack}")
    print("| phase | mode | steps | wall s | winner | verdict | losers |")
    print("|---|---|---:|---:|---|---|---|")
    for phase_id in args.phases:
        for mode, outcome in results.items():
            got = outcome[phase_id]
            losers = "; ".join(
                f"{name}: {c['left']}"
                for name, c in sorted(got["candidates"].items())
                if c["status"] != Status.SUCCESS
            )
            print(
                f"| {phase_id} | {mode} | {got['steps']} | {got['wall_s']:.0f} | {got['winner']} "
                f"| {got['verdict']} | {losers or '-'} |"
            )
        if len(results) < 2:
            continue
        full, rungs = results["full"][phase_id], results["rungs"][phase_id]
        saved = 1 - rungs["steps"] / full["steps"]
        same = (full["winner"], full["verdict"]) == (rungs["winner"], rungs["verdict"])
        print(f"{phase_id}: {saved:.0%} of the steps saved; same winner and verdict: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
