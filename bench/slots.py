"""Where a sweep's wall time goes: each experiment's slot, stage by stage, and the efficiency.

Clones this repository's HEAD, runs `aeselect phase run PHASE -j JOBS` there exactly as a user
would (the drainer, one `dvc exp run --temp` per experiment), and reads each experiment's log,
where every stage process prints its own wall time (aeselect.stages). It prints per experiment:

- slot: from the drainer's "started" to its "success" line (its `dvc exp run --temp`);
- each stage process's wall (prepare, train, evaluate, probe), and in the train stage the
  training loop's own `train_time_s` (val passes, imports, data and init are the rest);
- DVC: the slot less its stage processes (temporary workspace, hashing, caching, commit).

Then efficiency = training seconds / (drain wall x jobs), the figure `make run` prints per phase,
and slot use = slot seconds / (drain wall x jobs), what the executor itself can lose.

    .venv/bin/python bench/slots.py                 # phase 1.1, -j 2: about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, run_cmd, tool_env

STAGES = ("prepare", "train", "evaluate", "probe")
DRAIN_LINE = re.compile(r"^\[drain\] (\S+): (started|success|failed)(?:.*, log (\S+))?")
STAGE_LINE = re.compile(r"^\[(\w+)\] stage process: ([\d.]+) s$", re.M)
TRAIN_LINE = re.compile(r"^\[train\] (\{.*\})$", re.M)


def run_phase(repo: Path, phase: str, jobs: int) -> tuple[dict, float]:
    """Each experiment's slot (start, end, log) from the drainer's lines, and the drain's wall."""
    command = [sys.executable, "-m", "aeselect", "phase", "run", phase, "-j", str(jobs)]
    began = time.time()
    process = subprocess.Popen(command, cwd=repo, env=tool_env(), stderr=subprocess.PIPE, text=True)
    slots: dict[str, dict] = {}
    for line in process.stderr:
        sys.stderr.write(line)
        if match := DRAIN_LINE.match(line):
            name, event, log = match.groups()
            slot = slots.setdefault(name, {})
            if event == "started":
                slot.update(start=time.time(), log=repo / log)
            else:
                slot["end"] = time.time()
    if process.wait() != 0:
        raise SystemExit(f"`{' '.join(command)}` failed in {repo} (exit {process.returncode})")
    return slots, time.time() - began


def breakdown(slots: dict) -> list[dict]:
    """Per experiment: its slot, each stage's wall (`[stage] stage process: s`, printed by
    aeselect.stages), the training loop's train_time_s and DVC's share (the rest of the slot)."""
    rows = []
    for name, slot in sorted(slots.items(), key=lambda item: item[1]["start"]):
        text = slot["log"].read_text()
        row = {"experiment": name, "slot": slot["end"] - slot["start"]}
        for stage, seconds in STAGE_LINE.findall(text):
            row[stage] = row.get(stage, 0.0) + float(seconds)
        trained = TRAIN_LINE.findall(text)
        if "train" not in row or not trained:
            raise SystemExit(f"{name}: no timed train stage in {slot['log']}")
        row["train_time_s"] = float(json.loads(trained[-1])["train_time_s"])
        row["dvc"] = row["slot"] - sum(row.get(stage, 0.0) for stage in STAGES)
        rows.append(row)
    return rows


def print_table(rows: list[dict], wall: float, jobs: int) -> dict:
    columns = ["slot", "train_time_s", "train", *[s for s in STAGES if s != "train"], "dvc"]
    print(f"{'experiment':16}" + "".join(f"{c:>14}" for c in columns))
    for row in rows:
        print(f"{row['experiment']:16}" + "".join(f"{row.get(c, 0.0):14.1f}" for c in columns))
    totals = {c: sum(row.get(c, 0.0) for row in rows) for c in columns}
    print(f"{'sum':16}" + "".join(f"{totals[c]:14.1f}" for c in columns))
    summary = {
        "drain_wall_s": wall,
        "jobs": jobs,
        "efficiency": totals["train_time_s"] / (wall * jobs),
        "slot_use": totals["slot"] / (wall * jobs),
        "share_of_slots": {c: totals[c] / totals["slot"] for c in columns if c != "slot"},
    }
    print(
        f"drain wall {wall:.0f} s x {jobs} jobs; efficiency (training / wall x jobs) "
        f"{summary['efficiency']:.0%}; slot use {summary['slot_use']:.0%}"
    )
    shares = ", ".join(f"{c} {v:.0%}" for c, v in summary["share_of_slots"].items())
    print(f"share of the slots' time: {shares} (train = the whole train stage process)")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", default="1.1")
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("--keep", help="clone into this directory and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(args.keep or scratch) / "repo"
        run_cmd(["git", "clone", "-q", str(ROOT), str(repo)], ROOT, timeout=300, env=tool_env())
        slots, wall = run_phase(repo, args.phase, args.jobs)
        rows = breakdown(slots)
        summary = print_table(rows, wall, args.jobs)
    print(json.dumps({"rows": rows, **summary}, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
