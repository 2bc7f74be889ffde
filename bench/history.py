"""History independence: `phase status` and `phase compare` on a repository of 1,000 commits and
50 experiments, today's code against the code of OLD_REV (which read `dvc exp show -A`).

The 50 experiments are made cheaply, the way DVC lays one out: one real `dvc exp run --temp` of
this project at the tests' TINY params (its dvc.lock, outputs and cache are DVC's own), then 49
copies, each a commit whose parent is the baseline, holding the run's tree with a params.yaml
that sets its own `train.lr`, under `refs/exps/<baseline[:2]>/<baseline[2:]>/<name>`. Each copy's
params are its experiment's and its recorded deps are the real run's, so all 50 are fresh (for
both codes), with the real run's metrics and outputs. The 1,000 commits are empty, made by one
`git fast-import` on top of the baseline, as in the issue's measurement.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml
from _common import (
    GIT_IDENTITY,
    ROOT,
    BenchError,
    Result,
    Stats,
    alternate,
    dvc,
    log,
    make_project,
    ratio_stats,
    run_cmd,
    tool_env,
)

from aeselect.config import apply_overrides

OLD_REV = "4024ea99d4bee3fdc33a624eebd350b9bf3872ad"  # main before issue 20: `dvc exp show -A`
EXPERIMENTS = 50
COMMITS = 1000
PHASE = "1.1"
STATUS_GOAL_S = 3.0
COMPARE_GOAL = 2.0  # compare at COMMITS / compare with no history above the baseline


def lr(i: int) -> float:
    return round(0.001 + i * 1e-5, 8)


def phase_file(count: int) -> str:
    """A 1.1 sweep of `count` learning rates, ranked by val MSE."""
    experiments = {f"e{i:02d}": {"train.lr": lr(i)} for i in range(count)}
    body = {
        "id": PHASE,
        "title": "history bench",
        "requires": None,
        "selects": ["train.lr"],
        "experiments": experiments,
        "decide": {"metric": "mse", "direction": "min", "tolerance": 0.0, "tie_breakers": []},
    }
    return yaml.safe_dump(body, sort_keys=False)


def git(repo: Path, *args: str, input: str | None = None, env: dict | None = None) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=repo,
        input=input,
        text=True,
        capture_output=True,
        env=tool_env(env),
    )
    if result.returncode != 0:
        raise BenchError(f"`git {' '.join(args)}` failed in {repo}: {result.stderr.strip()}")
    return result.stdout.strip()


def copy_experiment(repo: Path, source: str, baseline: str, name: str, value: float) -> None:
    """A commit as `dvc exp run` makes one (the baseline as its parent, the run's tree) with
    params.yaml setting `train.lr`, under the experiment ref DVC would give it."""
    params = yaml.safe_load(git(repo, "show", f"{source}:params.yaml"))
    text = yaml.safe_dump(apply_overrides(params, {"train.lr": value}), sort_keys=False)
    blob = git(repo, "hash-object", "-w", "--stdin", input=text)
    index = {"GIT_INDEX_FILE": str(repo / ".git" / "bench-index")}
    git(repo, "read-tree", source, env=index)
    git(repo, "update-index", "--cacheinfo", f"100644,{blob},params.yaml", env=index)
    tree = git(repo, "write-tree", env=index)
    commit = git(repo, "commit-tree", tree, "-p", baseline, "-m", f"dvc: commit experiment {name}")
    git(repo, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}", commit)


def add_empty_commits(repo: Path, count: int) -> None:
    """`count` empty commits on top of the current branch, from one `git fast-import`."""
    branch = git(repo, "symbolic-ref", "HEAD")
    head = git(repo, "rev-parse", "HEAD")
    who = f"{GIT_IDENTITY['GIT_COMMITTER_NAME']} <{GIT_IDENTITY['GIT_COMMITTER_EMAIL']}>"
    stream = []
    for i in range(count):
        message = f"empty commit {i}\n"
        stream.append(f"commit {branch}\ncommitter {who} {1_700_000_000 + i} +0000\n")
        stream.append(f"data {len(message)}\n{message}")
        stream.append(f"from {head}\n\n" if i == 0 else "\n")
    git(repo, "fast-import", "--quiet", input="".join(stream))


def build(workdir: Path) -> Path:
    """The project with the 50 experiments on its baseline commit (no history above it yet)."""
    project = make_project(workdir / "history")
    for path in (project / "phases").glob("phase*.yaml"):
        path.unlink()
    (project / "phases" / "phase1_1.yaml").write_text(phase_file(EXPERIMENTS))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "history bench phase")
    baseline = git(project, "rev-parse", "HEAD")
    log(f"history: one real experiment, then {EXPERIMENTS - 1} copies of it")
    first = f"p{PHASE.replace('.', '-')}-e00"
    run_cmd(
        dvc("exp", "run", "--temp", "-n", first, "-S", f"train.lr={lr(0)}"), project, timeout=900
    )
    source = git(project, "rev-parse", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{first}")
    for i in range(1, EXPERIMENTS):
        copy_experiment(project, source, baseline, f"p{PHASE.replace('.', '-')}-e{i:02d}", lr(i))
    return project


def old_code(workdir: Path) -> Path | None:
    """OLD_REV's src/ from this checkout's Git, None when the clone lacks it (shallow)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", OLD_REV, "src"], cwd=ROOT, capture_output=True
    )
    if archive.returncode != 0:
        return None
    target = workdir / "old-code"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def phase_command(project: Path, src: Path, command: str) -> tuple[float, str]:
    """Wall seconds and stdout of `aeselect phase COMMAND 1.1` run with the code in `src`."""
    wall, result = run_cmd(
        [sys.executable, "-m", "aeselect", "phase", command, PHASE, "--repo", str(project)],
        project,
        timeout=1800,
        env=tool_env({"PYTHONPATH": str(src)}),
    )
    return wall, result.stdout


def measure(project: Path, codes: dict[str, Path], command: str, repeats: int) -> dict:
    """{code: [wall, ...]}, the codes alternating (ABBA); raises if their outputs differ."""
    outputs: dict[str, set[str]] = {name: set() for name in codes}
    walls: dict[str, list[float]] = {name: [] for name in codes}

    def timed(name: str):
        def call() -> None:
            wall, out = phase_command(project, codes[name], command)
            walls[name].append(wall)
            outputs[name].add(out)

        return call

    names = list(codes)
    if len(names) == 2:
        alternate(repeats, timed(names[0]), timed(names[1]))
    else:
        for _ in range(repeats):
            timed(names[0])()
    printed = {out for seen in outputs.values() for out in seen}
    if len(printed) != 1:
        raise BenchError(f"`phase {command}` printed differently across codes/repeats: {outputs}")
    return walls


def bench_history(workdir: Path, quick: bool) -> Result:
    result = Result()
    project = build(workdir)
    codes = {"new": ROOT / "src"}
    old = old_code(workdir)
    if old is not None:
        codes["old"] = old
    repeats = 1 if quick else 2
    walls = {}
    for commits in (0, COMMITS):
        if commits:
            log(f"history: {commits} empty commits on top")
            add_empty_commits(project, commits)
        for command in ("status", "compare"):
            log(f"history: phase {command} at +{commits} commits ({', '.join(codes)})")
            walls[command, commits] = measure(project, codes, command, repeats)
    for command in ("status", "compare"):
        deep, shallow = walls[command, COMMITS], walls[command, 0]
        for code, values in deep.items():
            name = f"{command}, {code} code, {COMMITS} commits + {EXPERIMENTS} exps"
            if command == "status" and code == "new":
                ok = Stats(values).median <= STATUS_GOAL_S
                result.add("history", name, Stats(values), "s", f"<= {STATUS_GOAL_S:g} s", ok)
            else:
                result.add("history", name, Stats(values), "s")
        ratio = ratio_stats(deep["new"], shallow["new"])
        name = f"{command}, new code: {COMMITS} commits / none above the baseline"
        if command == "compare":
            target = f"<= {COMPARE_GOAL:g}x"
            result.add("history", name, ratio, "x", target, ratio.median <= COMPARE_GOAL)
        else:
            result.add("history", name, ratio, "x")
    if old is None:
        result.add("history", "old code", None, "s", note=f"{OLD_REV[:7]} not in this clone")
    result.details = {f"{command} +{n}": w for (command, n), w in walls.items()}
    return result
