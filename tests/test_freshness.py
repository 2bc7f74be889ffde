"""Freshness from the stage deps, with a real run: a commit no stage depends on leaves it fresh,
a change to any stage's dep (train's or evaluate's alone) or to a stage's dvc.yaml entry makes
it stale, and `phase status` names what changed. The phase commands read the experiments of
the commits they derive from only, as `dvc exp show -A` lists them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import git, write_pngs
from test_phase_runs import tiny_phases, without
from test_phases import VALID, aeselect

from aeselect.dvc import open_repo, queue_tasks, run_dvc, stage_deps
from aeselect.sweep.freshness import stale_deps
from aeselect.sweep.runs import exp_show


def commit_edit(project: Path, message: str, *edits: tuple[str, str, str]) -> str:
    """Replace `old` by `new` once in each file (failing if absent), commit; the short id."""
    for path, old, new in edits:
        file = project / path
        text = file.read_text()
        assert old in text, f"{path} lacks {old!r}"
        file.write_text(text.replace(old, new, 1))
    git(project, "commit", "-q", "-am", message)
    return git(project, "rev-parse", "--short=7", "HEAD").strip()


def experiments_by_baseline(shown: list[dict[str, Any]]) -> dict[str, Any]:
    return {entry["rev"]: entry["experiments"] for entry in shown if entry.get("experiments")}


def status_line(project: Path, name: str) -> str:
    status = aeselect(project, "status", "1.1").stdout
    return next(line for line in status.splitlines() if line.split()[0] == name)


@pytest.mark.slow
def test_only_a_change_to_a_stage_dep_or_definition_makes_a_run_stale(project):
    tiny_phases(project, ("1.1", without(VALID, "lc4")))
    ran_on = git(project, "rev-parse", "--short=7", "HEAD").strip()
    aeselect(project, "run", "1.1")
    assert re.fullmatch(r"p1-1-lc2 +success", status_line(project, "p1-1-lc2"))

    # No stage depends on the SLURM glue or the report; dvc.yaml's comments are no definition.
    commit_edit(
        project,
        "outside the pipeline",
        ("src/aeselect/cluster/slurm.py", '"""', '"""Edited. '),
        ("src/aeselect/phases/report.py", '"""', '"""Edited. '),
        ("dvc.yaml", "# prepare -> train", "# edited: prepare -> train"),
    )
    assert re.fullmatch(r"p1-1-lc2 +success", status_line(project, "p1-1-lc2"))

    # One line of a train dep: stale, naming it; reverted, the run counts again.
    commit_edit(project, "train dep", ("src/aeselect/training/loss.py", '"""', '"""Edited. '))
    line = status_line(project, "p1-1-lc2")
    assert line.endswith(f"stale (ran on {ran_on}): src/aeselect/training changed since the run")
    git(project, "revert", "--no-edit", "HEAD")
    assert re.fullmatch(r"p1-1-lc2 +success", status_line(project, "p1-1-lc2"))

    # A dep of evaluate alone (train's deps are untouched): stale too.
    commit_edit(project, "evaluate dep", ("src/aeselect/evaluation/gates.py", '"""', '"""x. '))
    line = status_line(project, "p1-1-lc2")
    assert line.endswith("src/aeselect/evaluation changed since the run"), line
    git(project, "revert", "--no-edit", "HEAD")

    # A stage's definition: one more dep of evaluate, every file as it was.
    commit_edit(
        project,
        "evaluate definition",
        (
            "dvc.yaml",
            "      - src/aeselect/evaluation\n",
            "      - src/aeselect/evaluation\n      - src/aeselect/sweep/metric_names.py\n",
        ),
    )
    line = status_line(project, "p1-1-lc2")
    changed = "dvc.yaml stage evaluate, src/aeselect/sweep/metric_names.py changed since the run"
    assert line.endswith(changed), line

    # The stale run is never used: queueing again runs the phase under a new name.
    queued = aeselect(project, "queue", "1.1").stdout
    assert f"p1-1-lc2_2: queued (p1-1-lc2 is stale: it ran on {ran_on})" in queued

    # A finished run on an older commit, a queued one on HEAD, history in between: exactly what
    # `dvc exp show -A` lists, read from those two commits alone.
    every = json.loads(run_dvc(["exp", "show", "--json", "-A", "--no-fetch"], project).stdout)
    assert len(experiments_by_baseline(every)) == 2
    assert {t.name: t.status for t in queue_tasks(project)}["p1-1-lc2_2"] == "Queued"
    assert experiments_by_baseline(exp_show(project)) == experiments_by_baseline(every)


def test_head_deps_are_hashed_from_git_as_dvc_hashes_the_workspace(project):
    """DVC's md5s of a commit's deps, from Git's objects, equal DVC's own of a checkout; outputs
    of other stages are left out, `dvc add`ed data compares by its Git tree, and neither an
    uncommitted edit nor a file no stage depends on counts."""
    write_pngs(project / "data" / "raw" / "images", 2)
    run_dvc(["add", "-q", "data/raw/images"], project)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "images")
    added = git(project, "rev-parse", "HEAD").strip()
    (project / "src" / "aeselect" / "model" / "__pycache__").mkdir(exist_ok=True)
    (project / "src" / "aeselect" / "model" / "__pycache__" / "x.pyc").write_bytes(b"ignored")

    deps = stage_deps(project, added)
    assert deps["prepare"].tracked == ("data/raw",) and "data/raw" not in deps["prepare"].source
    assert not {"data/prepared", "models/best.pt"} & set(deps["evaluate"].source)
    with open_repo(project) as workspace:  # DVC hashing the checkout itself
        hashed = {
            (stage.name, dep.def_path): dep.get_hash().value
            for stage in workspace.index.stages
            for dep in stage.deps
            if dep.def_path in deps[stage.name].source  # a .dvc file has no deps
        }
    assert hashed == {(n, p): md5 for n, stage in deps.items() for p, md5 in stage.source.items()}

    (project / "src" / "aeselect" / "training" / "loss.py").write_text("uncommitted")
    assert stale_deps(project, added, {added: False}) == {added: []}
    git(project, "checkout", "--", "src")
    write_pngs(project / "data" / "raw" / "images", 3)  # other pixels, one more image
    run_dvc(["add", "-q", "data/raw/images"], project)
    commit_edit(project, "new image, cluster", ("src/aeselect/cluster/slurm.py", '"""', '"""x'))
    head = git(project, "rev-parse", "HEAD").strip()
    assert stale_deps(project, head, {added: False, head: False}) == {added: ["data/raw"], head: []}
