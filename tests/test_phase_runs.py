"""Baseline binding and retries: which runs count for a phase today, with real DVC runs.

A run counts (is fresh) only when its recorded params equal params.yaml at HEAD plus its
experiment's set plus the sweep's --set, and every stage's definition and deps are HEAD's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, git, make_project
from PIL import Image
from test_phases import CHAIN_1_2, REPEATED, VALID, aeselect, write_phase

from aeselect.dvc import active_workers, queue_tasks, run_dvc
from aeselect.sweep.claim_states import DRAIN_DIR
from aeselect.sweep.names import parse_run_name, run_name
from aeselect.sweep.runs import Baseline, PhaseRuns, Run
from aeselect.sweep.spec import load_phase
from aeselect.sweep.status import Status
from aeselect.sweep.tasks import TaskState, queue_states

PREFIXED = VALID.replace("lc4: {model.latent_channels: 4}", "lc2-b: {model.latent_channels: 4}")


def test_run_names_parse_back_to_their_experiment_and_attempt(tmp_path):
    write_phase(tmp_path, "1.1", PREFIXED)
    spec = load_phase("1.1", tmp_path)
    assert parse_run_name(spec, "p1-1-lc2") == ("lc2", 0, 1)
    assert parse_run_name(spec, "p1-1-lc2-b") == ("lc2-b", 0, 1)  # a key that extends another
    assert parse_run_name(spec, "p1-1-lc2-b_3") == ("lc2-b", 0, 3)
    assert run_name(spec.runs()[1], 3) == "p1-1-lc2-b_3"
    for other in ("p1-1-lc9", "p1-2-lc2", "p1-1-lc2_x", "p1-1-lc2_1", "lc2", "p1-1-lc2_"):
        assert parse_run_name(spec, other) is None, other


def test_with_repeats_each_training_seed_has_its_own_attempts(tmp_path):
    write_phase(tmp_path, "1.1", REPEATED)
    spec = load_phase("1.1", tmp_path)
    assert parse_run_name(spec, "p1-1-lc4-s1") == ("lc4", 1, 1)
    assert parse_run_name(spec, "p1-1-lc4-s1_2") == ("lc4", 1, 2)
    for other in ("p1-1-lc4", "p1-1-lc4_2", "p1-1-lc4-s2", "p1-1-lc4-s1_1"):
        assert parse_run_name(spec, other) is None, other
    seed_0, seed_1 = spec.runs()[2:]

    def run(name: str, status: Status) -> Run:
        return Run(name, *parse_run_name(spec, name), status, None, fresh=True)

    runs = [run("p1-1-lc4-s0", Status.SUCCESS), run("p1-1-lc4-s1", Status.FAILED)]
    view = PhaseRuns(spec, Baseline("h", {}, {}), runs, frozenset(r.name for r in runs))
    assert view.current(seed_0).name == "p1-1-lc4-s0"
    assert [r.name for r in view.of(seed_1)] == ["p1-1-lc4-s1"]
    # A failed seed is retried alone, under its own next attempt.
    assert view.next_name(seed_1) == "p1-1-lc4-s1_2" and view.next_name(seed_0) == "p1-1-lc4-s0_2"


def test_the_current_run_is_the_newest_fresh_success_and_names_are_never_reused(tmp_path):
    write_phase(tmp_path, "1.1", VALID)
    spec = load_phase("1.1", tmp_path)

    def run(name: str, status: Status, fresh: bool) -> Run:
        key, repeat, attempt = parse_run_name(spec, name)
        return Run(name, key, repeat, attempt, status, None, baseline="abcdef0123", fresh=fresh)

    runs = [
        run("p1-1-lc2", Status.SUCCESS, False),  # stale: never counts, even as the only success
        run("p1-1-lc2_2", Status.FAILED, True),
        run("p1-1-lc2_3", Status.SUCCESS, True),
        run("p1-1-lc2_4", Status.FAILED, True),  # a later failure does not hide the success
        run("p1-1-lc4", Status.SUCCESS, False),
    ]
    taken = frozenset({r.name for r in runs} | {"p1-1-lc4_2"})
    view = PhaseRuns(spec, Baseline("h", {}, {}), runs, taken)
    lc2, lc4 = spec.runs()
    assert view.current(lc2).name == "p1-1-lc2_3"
    assert [r.name for r in view.stale(lc2)] == ["p1-1-lc2"]
    assert view.current(lc4) is None and view.stale(lc4)[0].ran_on == "abcdef0"
    # p1-1-lc4_2 is taken (say, only DVC's queue history still knows it): the next is _3.
    assert view.next_name(lc4) == "p1-1-lc4_3"
    assert view.next_name(lc2) == "p1-1-lc2_5"


# ---- end to end: real `dvc exp run`, real Git ---------------------------------------------------

SWEEP = "train.max_steps=4"


def without(body: str, *experiments: str) -> str:
    """A phase file's text without the given experiments' lines."""
    return "".join(
        line
        for line in body.splitlines(keepends=True)
        if not any(line.strip().startswith(f"{e}:") for e in experiments)
    )


ONE_EXPERIMENT_1_2 = without(CHAIN_1_2, "aux5", "broken")


def tiny_phases(project: Path, *bodies: tuple[str, str]) -> None:
    for path in (project / "phases").glob("phase*.yaml"):
        path.unlink()
    for phase_id, body in bodies:
        write_phase(project / "phases", phase_id, body)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "tiny phases")


def decision(project: Path, phase_id: str) -> dict:
    return yaml.safe_load((project / "phases" / "decisions" / f"{phase_id}.yaml").read_text())


@pytest.mark.slow
def test_queue_status_is_read_from_dvc_itself(project):
    """DVC's queue as `dvc queue status` prints it, read in-process on a real queue."""
    assert queue_tasks(project) == [] and active_workers(project) == 0
    run_dvc(["exp", "run", "--queue", "-n", "p1-1-lc2", "-S", "model.latent_channels=2"], project)
    (task,) = queue_tasks(project)
    assert (task.name, task.status) == ("p1-1-lc2", "Queued")
    assert re.fullmatch("[0-9a-f]{7}", task.task)
    printed = run_dvc(["queue", "status"], project).stdout.splitlines()
    assert printed[1].split()[:2] == [task.task, "p1-1-lc2"] and printed[1].split()[-1] == "Queued"
    assert active_workers(project) == 0  # no worker started: the task waits
    assert "Worker status: 0 active" in printed[-1]
    assert queue_states(project) == {"p1-1-lc2": TaskState("p1-1-lc2", task.task, Status.QUEUED)}


@pytest.mark.slow
def test_redecided_phase_gets_a_fresh_sweep_of_the_next_phase(project):
    """The issue's scenario: decide 1.1, run 1.2, revert 1.1, decide it differently, queue 1.2."""
    tiny_phases(project, ("1.1", VALID), ("1.2", ONE_EXPERIMENT_1_2))
    aeselect(project, "queue", "1.1", "--set", SWEEP)
    run = aeselect(project, "run", "1.1", "-j", "2")  # no --set: the queued sweep's is kept
    assert f"recorded --set {SWEEP}" in run.stderr
    assert "p1-1-lc2: already queued" in run.stdout and "p1-1-lc4: success" in run.stdout
    sweep_head = git(project, "rev-parse", "HEAD").strip()
    aeselect(project, "promote", "1.1")
    first = decision(project, "1.1")
    assert first["sweep_set"] == {"train.max_steps": 4}  # a shorter sweep is not stale
    assert first["baseline_commit"] == sweep_head
    revs = {c["experiment"]: c["experiment_rev"] for c in first["candidates"]}
    assert set(revs) == {"p1-1-lc2", "p1-1-lc4"} and first["experiment_rev"] in revs.values()
    decided_lc = first["selected"]["model.latent_channels"]
    other = f"p1-1-lc{6 - decided_lc}"  # lc2 <-> lc4

    aeselect(project, "run", "1.2", "--set", SWEEP)
    on_first = git(project, "rev-parse", "--short=7", "HEAD").strip()
    git(project, "revert", "--no-edit", "HEAD")
    # Reverted: 1.1's runs match HEAD's params again, so 1.1 can be decided the other way.
    aeselect(project, "promote", "1.1", "--pick", other, "--why", "smaller latent")
    second = decision(project, "1.1")
    assert second["winner"] == other and second["baseline_commit"] == sweep_head
    assert yaml.safe_load((project / "params.yaml").read_text())["model"]["latent_channels"] == (
        6 - decided_lc
    )

    # 1.2's run trained on the first decision's latent_channels: stale, never used.
    status = aeselect(project, "status", "1.2").stdout
    assert re.search(rf"p1-2-aux0 +stale \(ran on {on_first}\)", status), status
    refused = aeselect(project, "promote", "1.2", check=False)
    assert refused.returncode == 2
    assert f"p1-2-aux0 (stale: ran on {on_first})" in refused.stderr
    aeselect(project, "compare", "1.2")
    table = (project / "phases" / "reports" / "1.2" / "metrics.csv").read_text()
    assert "Stale" in table and "mse" not in table.splitlines()[0]  # no metrics of a stale run

    queued = aeselect(project, "queue", "1.2", "--set", SWEEP).stdout
    assert "already success" not in queued
    assert f"p1-2-aux0_2: queued (p1-2-aux0 is stale: it ran on {on_first})" in queued
    status = aeselect(project, "status", "1.2").stdout
    assert re.search(r"p1-2-aux0_2 +queued", status), status
    assert "p1-2-aux0_2: already queued" in aeselect(project, "queue", "1.2").stdout


@pytest.mark.slow
def test_failed_run_is_fixed_and_run_again(tmp_path):
    """No images yet: the drained run fails, and so would its retry. Images committed: both are
    stale (data/raw, a prepare dep, changed), the queued retry leaves DVC's queue, and `phase
    run` runs the experiment again."""
    project = make_project(
        tmp_path / "project", TINY | {"data.source": "folder", "data.root": "data/raw"}
    )
    tiny_phases(project, ("1.1", without(VALID, "lc4")))
    aeselect(project, "queue", "1.1")
    drained = aeselect(project, "drain", "1.1", check=False)  # what a SLURM job runs
    assert drained.returncode == 1 and "FAILED p1-1-lc2" in drained.stderr
    status = aeselect(project, "status", "1.1", check=False).stdout
    assert re.search(r"p1-1-lc2 +failed  log: hpc/logs/phase1_1-local\d+-p1-1-lc2.log", status)
    kept = aeselect(project, "queue", "1.1", "--no-retry").stdout
    assert "p1-1-lc2: already failed; not queued again" in kept
    retried = aeselect(project, "queue", "1.1").stdout
    assert "p1-1-lc2_2: queued (again: p1-1-lc2 failed)" in retried
    status = aeselect(project, "status", "1.1").stdout
    assert re.search(r"p1-1-lc2 +failed, superseded by p1-1-lc2_2  log: ", status), status

    rng = np.random.default_rng(0)
    for i in range(10):
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(project / "data" / "raw" / f"img{i}.png")
    failed_on = git(project, "rev-parse", "--short=7", "HEAD").strip()
    git(project, "add", "data/raw")
    git(project, "commit", "-q", "-m", "add images")

    rerun = aeselect(project, "run", "1.1").stdout
    assert f"p1-1-lc2_2: removed from DVC's queue (stale: queued on {failed_on})" in rerun
    assert f"p1-1-lc2_3: queued (p1-1-lc2_2 is stale: it ran on {failed_on})" in rerun
    assert "p1-1-lc2_3: success" in rerun
    # A drainer's claim record on the same name that is older than the run never overrides it.
    claim = {"name": "p1-1-lc2_3", "overrides": {}, "status": "failed", "log": "x.log"}
    claim |= {"claimed_at": "2000-01-01T00:00:00"}
    (project / DRAIN_DIR).mkdir(parents=True, exist_ok=True)
    (project / DRAIN_DIR / "p1-1-lc2_3.json").write_text(json.dumps(claim))
    status = aeselect(project, "status", "1.1").stdout
    stale = rf"p1-1-lc2 +stale \(ran on {failed_on}\): data/raw changed since the run\n"
    assert re.search(stale, status), status
    assert re.search(r"p1-1-lc2_3 +success\n", status), status
    aeselect(project, "promote", "1.1")
    assert decision(project, "1.1")["winner"] == "p1-1-lc2_3"
