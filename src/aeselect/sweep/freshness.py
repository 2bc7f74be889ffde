"""Whether a run's pipeline is today's, as precisely as DVC knows it: for every stage of HEAD's
dvc.yaml, the stage's definition and the deps DVC recorded for the run (the dvc.lock of its
experiment commit) against what HEAD's files give.

So code that no stage depends on (the SLURM glue, the report, the CLI) never makes a run stale,
while a change to any stage's dep or to its dvc.yaml entry does. A dep that another stage
outputs is not compared: its producer's deps decide. A run with no dvc.lock of its own (queued,
running, failed) is judged by the commit it was queued on, hashed the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from aeselect.dvc import stage_deps
from aeselect.git import GitObject, read_objects
from aeselect.sweep.spec import PhaseError

PIPELINE_FILE = "dvc.yaml"
LOCK_FILE = "dvc.lock"
# libyaml's loader where PyYAML has it: a phase's dvc.lock files are read on every status.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Pipeline:
    """What one commit's results depend on: each stage's dvc.yaml entry, the md5 of each
    Git-tracked dep as dvc.lock records it, and the Git tree of each dep holding DVC-tracked
    data (whose .dvc files pin it)."""

    stages: dict[str, Any]
    hashes: dict[str, str | None]
    trees: dict[str, str | None]

    def changed_in(self, run: Pipeline) -> list[str]:
        """What of this pipeline (HEAD's) `run` had otherwise: `dvc.yaml stage NAME` for a
        stage defined otherwise (or not at all), else each dep path that hashed otherwise."""
        names = list(dict.fromkeys([*self.stages, *run.stages]))
        changed = [
            f"{PIPELINE_FILE} stage {name}"
            for name in names
            if self.stages.get(name) != run.stages.get(name)
        ]
        changed += [p for p, md5 in self.hashes.items() if run.hashes.get(p, "") != md5]
        return changed + [p for p, oid in self.trees.items() if run.trees.get(p, "") != oid]


def stale_deps(repo: Path, head: str, commits: dict[str, bool]) -> dict[str, list[str]]:
    """For each commit, what changed from it to `head` that a stage depends on ([]: nothing).

    `commits[c]` is True for an experiment commit, whose dvc.lock DVC wrote when the run
    finished: its deps' hashes are read from there. Any other commit is hashed like HEAD.
    """
    deps = stage_deps(repo, head)
    tracked = list(dict.fromkeys(p for stage in deps.values() for p in stage.tracked))
    wanted = {head: False} | commits
    names = [f"{c}:{path}" for c in wanted for path in (PIPELINE_FILE, LOCK_FILE, *tracked)]
    objects = read_objects(repo, names)
    today = _pipeline(objects, head, tracked, _hashes(deps.values()))
    changed = {}
    for commit, from_lock in commits.items():
        if commit == head:
            changed[commit] = []
            continue
        if from_lock:
            hashes = _locked_hashes(objects[f"{commit}:{LOCK_FILE}"], commit)
        else:
            hashes = _hashes(stage_deps(repo, commit).values())
        changed[commit] = today.changed_in(_pipeline(objects, commit, tracked, hashes))
    return changed


def _hashes(stages: Iterable[Any]) -> dict[str, str | None]:
    return {path: md5 for stage in stages for path, md5 in stage.source.items()}


def _pipeline(
    objects: dict[str, GitObject | None],
    commit: str,
    tracked: list[str],
    hashes: dict[str, str | None],
) -> Pipeline:
    pipeline = objects[f"{commit}:{PIPELINE_FILE}"]
    stages = (_yaml(pipeline, commit, PIPELINE_FILE) or {}).get("stages") or {}
    trees = {p: (o.oid if (o := objects[f"{commit}:{p}"]) else None) for p in tracked}
    return Pipeline(stages, hashes, trees)


def _locked_hashes(lock: GitObject | None, commit: str) -> dict[str, str | None]:
    """Each dep's md5 as DVC recorded it for the run ({} without a dvc.lock: nothing matches)."""
    stages = (_yaml(lock, commit, LOCK_FILE) or {}).get("stages") or {}
    return {
        dep["path"]: dep.get("md5") for stage in stages.values() for dep in stage.get("deps") or []
    }


def _yaml(found: GitObject | None, commit: str, path: str) -> dict[str, Any] | None:
    if found is None:
        return None
    try:
        return _parsed(found.content)
    except yaml.YAMLError as err:
        raise PhaseError(f"{path} at {commit[:7]} is not valid YAML: {err}") from None


@cache
def _parsed(content: bytes) -> Any:
    """One parse per distinct file (most runs of a phase share one dvc.yaml); never mutated."""
    return yaml.load(content, Loader=LOADER)
