"""Claim records: which experiments a clone's drainer took out of DVC's queue (or a shared
phase's plan gave it), and how each ended. The file is the source of truth once written;
`phase status`, `queue` and `compare` read them as they read DVC's queue."""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aeselect.dvc import run_dvc
from aeselect.sweep.claim_states import DRAIN_DIR, claim_records
from aeselect.sweep.names import parse_run_name
from aeselect.sweep.runs import canonical_params, load_phase_runs
from aeselect.sweep.spec import PhaseSpec
from aeselect.sweep.status import Status
from aeselect.sweep.sweep_record import recorded_sweep
from aeselect.sweep.tasks import queue_states


@dataclass
class Claim:
    """One experiment taken from DVC's queue; its file is the source of truth once written."""

    name: str
    overrides: dict[str, Any]
    status: Status = Status.CLAIMED
    log: str = ""
    jobs: list[str] = field(default_factory=list)
    returncode: int | None = None
    # What `phase status`/`compare` judge the run by while DVC's queue no longer lists it:
    baseline: str = ""  # HEAD when claimed; the run is `dvc exp run --temp` on HEAD
    params: dict[str, Any] = field(default_factory=dict)  # its canonical params
    claimed_at: str = ""  # local time, as `dvc exp show` stamps runs: a newer DVC record wins
    # A run of a plan shared between jobs (aeselect.cluster.share): its plan, and in the user's
    # clone what its shared claim says (the job and node that ran it, results on the remotes).
    plan: str = ""
    job: str = ""
    node: str = ""
    pushed: bool = False
    # With a phase `budget:` (aeselect.cluster.rungs): rungs reached, where it was pruned, and
    # whether `--unprune` let it go on to the end.
    rung: int = 0
    pruned_at: int | None = None
    unpruned: bool = False
    excluded: str = ""  # the requirement its params fail: left out before it trained

    def path(self, repo: Path) -> Path:
        return repo / DRAIN_DIR / f"{self.name}.json"

    def save(self, repo: Path) -> None:
        path = self.path(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)


def read_claims(repo: Path, spec: PhaseSpec) -> dict[str, Claim]:
    """The claims on this phase's runs, whichever attempt (`p1-1-lc8`, `p1-1-lc8_2`, ...)."""
    return {
        name: Claim(**record)
        for name, record in claim_records(repo).items()
        if parse_run_name(spec, name) is not None
    }


def claim_queued(repo: Path, spec: PhaseSpec, claims: dict[str, Claim]) -> set[str]:
    """Move the phase's fresh Queued tasks from DVC's queue into claims (record first, then
    remove); returns the names of the phase's fresh runs. A stale task (queued on other params
    or code: it could never count) stays unclaimed."""
    view = load_phase_runs(repo, spec, recorded_sweep(repo, spec))
    head_params = canonical_params(view.baseline.params) or {}
    fresh = {run.name: run for run in view.runs if run.fresh}
    in_dvc = queue_states(repo)  # only tasks still there have a task id to remove
    for name, run in fresh.items():
        if name not in in_dvc or in_dvc[name].status != Status.QUEUED:
            continue
        if name not in claims:
            overrides = {k: v for k, v in run.params.items() if head_params.get(k) != v}
            claims[name] = Claim(
                name,
                overrides,
                baseline=view.baseline.commit,
                params=run.params,
                claimed_at=dt.datetime.now().isoformat(timespec="seconds"),
            )
            claims[name].save(repo)
        run_dvc(["queue", "remove", name], cwd=repo)
    return set(fresh)
