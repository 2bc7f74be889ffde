"""Rung coordination inside the drainer: which claimed runs pause where, when a rung is judged,
and which runs go on.

A run with a `budget:` trains with AESELECT_RUNGS set to the rung steps it has not reached yet;
at each it writes its per-image val scores to its rung folder, saves its resume snapshot and
exits RUNG_EXIT_CODE (no DVC experiment, no run-cache entry: a paused run is never a result). Its
claim turns `paused`. When every live run of the phase has paused at rung k, the rung is judged
(phases.prune) once, the verdict written to the phase's rung book; pruned runs end `pruned`, the
others become runnable again and resume from their snapshots, bit-identical to a run that never
paused. A freed slot goes to any runnable run, so no slot idles while one could train.

Rungs are coordinated by the one drainer of a clone; a plan shared between clusters would need
the verdicts to travel with its claims, so `phase submit` refuses `budget:` with several clusters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from aeselect.cluster.claims import Claim, read_claims
from aeselect.envvars import RESUME_DIR_ENV, RUNG_DIR_ENV, RUNGS_ENV
from aeselect.paths import PER_IMAGE_PAIRING_KEY, RESUME_DIR
from aeselect.phases.prune import judge_rung
from aeselect.phases.rung_book import RUNGS_DIR, Standing, rung_book_path
from aeselect.sweep.names import parse_run_name
from aeselect.sweep.spec import Budget, PhaseError, PhaseSpec
from aeselect.sweep.status import Status

# Claims that take part in a rung: those still training toward the end, or there already.
ENDED = (Status.FAILED, Status.PRUNED, Status.EXCLUDED)


class RungBook:
    """The phase's rung verdicts (`<slug>.json`, one list of standings per judged rung) and the
    runs' rung scores (`<run name>/rung_<step>.csv`)."""

    def __init__(self, repo: Path, spec: PhaseSpec, budget: Budget):
        self.repo, self.spec, self.budget = repo, spec, budget
        self.path = rung_book_path(repo, spec)
        self.judged: dict[int, list[dict[str, Any]]] = (
            {int(k): v for k, v in json.loads(self.path.read_text()).items()}
            if self.path.exists()
            else {}
        )

    def steps(self, claim: Claim) -> tuple[int, ...]:
        """The run's rung steps, from its own train.max_steps and train.log_every."""
        return self.budget.steps(claim.params["train.max_steps"], claim.params["train.log_every"])

    def scores_dir(self, claim: Claim) -> Path:
        return self.repo / RUNGS_DIR / claim.name

    def prepare(self, claim: Claim) -> dict[str, str]:
        """The environment of the run's training: the rungs ahead of it, where its scores go, a
        resume folder (the job's, else the clone's) for the snapshot it pauses with."""
        env = {
            RESUME_DIR_ENV: os.environ.get(RESUME_DIR_ENV) or str(self.repo / RESUME_DIR),
            RUNG_DIR_ENV: str(self.scores_dir(claim)),
        }
        ahead = self.steps(claim)[claim.rung :]
        scores = self.next_scores(claim)
        if scores is not None:
            scores.unlink(missing_ok=True)
        if ahead:
            env[RUNGS_ENV] = ",".join(map(str, ahead))
        return env

    def next_scores(self, claim: Claim) -> Path | None:
        """Where the run's next rung scores go, None past its last rung. `dvc exp run` exits 255
        whatever its stage's code, so a run's rung pause is known by these scores existing
        (written just before its snapshot): start() removes any left by an earlier attempt."""
        steps = self.steps(claim)
        if claim.rung >= len(steps):
            return None
        return self.scores_dir(claim) / f"rung_{steps[claim.rung]}.csv"

    def reached_rung(self, claim: Claim) -> bool:
        scores = self.next_scores(claim)
        return scores is not None and scores.exists()

    def runnable(self, claim: Claim) -> bool:
        """A paused run may resume once its rung is judged and it was not pruned there."""
        return claim.status == Status.PAUSED and (claim.rung - 1) in self.judged

    def judge_ready(self, claims: list[Claim]) -> list[Standing]:
        """Judge the next rung if every live run has paused there (or finished); returns its
        standings, empty when no rung is ready. Pruned claims are marked and saved."""
        live = [c for c in claims if c.status not in ENDED]  # pruned earlier or failed: out
        training = [c for c in live if c.status != Status.SUCCESS]
        rung = min((c.rung for c in training), default=0) - 1
        if rung < 0 or rung in self.judged:
            return []
        if any(c.status != Status.PAUSED for c in training):
            return []
        # A finished run takes part with the scores it paused with; one that never paused there
        # (served whole by DVC's run cache: 1.2's ds3 is 1.1's winner) has none and stands aside.
        live = training + [c for c in live if c.status == Status.SUCCESS and c.rung > rung]
        by_key: dict[str, list[Claim]] = {}
        for claim in live:
            by_key.setdefault(parse_run_name(self.spec, claim.name)[0], []).append(claim)
        metric = self.spec.decide.primary.key
        scores, steps = {}, {}
        for key, seeds in by_key.items():
            step = self.steps(seeds[0])[rung]
            frames = [
                pd.read_csv(self.scores_dir(c) / f"rung_{step}.csv").set_index(
                    PER_IMAGE_PAIRING_KEY
                )[metric]
                for c in seeds
            ]
            scores[key] = pd.concat(frames, axis=1, ignore_index=True)
            steps[key] = step
        protected = {parse_run_name(self.spec, c.name)[0] for c in live if c.unpruned}
        standings = [
            dataclasses.replace(s, pruned=False) if s.experiment in protected else s
            for s in judge_rung(
                scores, steps, self.spec.decide, self.budget.prune, self.budget.allowance(rung)
            )
        ]
        self.judged[rung] = [s.to_dict() for s in standings]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({str(k): v for k, v in self.judged.items()}, indent=1))
        pruned = {s.experiment: s.step for s in standings if s.pruned}
        for key, seeds in by_key.items():
            for claim in seeds:
                if key in pruned and claim.status == Status.PAUSED:
                    claim.status, claim.pruned_at = Status.PRUNED, pruned[key]
                    claim.save(self.repo)
        return standings


def unprune(repo: Path, spec: PhaseSpec, names: list[str]) -> None:
    """Let pruned runs train to the end from their rung snapshots, never pruned again (the next
    drain of the phase resumes them)."""
    claims = read_claims(repo, spec)
    pruned = sorted(name for name, claim in claims.items() if claim.status == Status.PRUNED)
    for name in names:
        if name not in pruned:
            raise PhaseError(
                f"--unprune {name}: not a pruned run of phase {spec.id} (pruned: "
                f"{', '.join(pruned) or 'none'})"
            )
    for name in names:
        claim = claims[name]
        claim.status, claim.unpruned, claim.pruned_at = Status.PAUSED, True, None
        claim.save(repo)
