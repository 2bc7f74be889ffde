"""The rung book: what the pruning step decided at each budget rung of a phase, kept beside the
drainer's claims, so that status, compare, the report and the decision file show where and on
what evidence a candidate left."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from aeselect.sweep.claim_states import DRAIN_DIR
from aeselect.sweep.spec import PhaseSpec

RUNGS_DIR = DRAIN_DIR / "rungs"  # the rung book and each run's rung scores (cluster.rungs)


@dataclass(frozen=True)
class Standing:
    """One candidate at one rung: its mean primary metric and its difference from the best."""

    experiment: str  # the phase file's experiment key
    step: int
    value: float
    delta: float  # candidate minus best (0 for the best)
    low: float
    high: float
    pruned: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.experiment} at step {self.step}: {self.evidence()}"

    def evidence(self) -> str:
        interval = f"{self.delta:+.3g} [{self.low:+.3g}, {self.high:+.3g}]"
        return f"{self.value:.6g}, {interval} vs the best"


def rung_book_path(repo: Path, spec: PhaseSpec) -> Path:
    """The phase's judged rungs: rung index -> the standings there."""
    return repo / RUNGS_DIR / f"{spec.slug}.json"


def pruned_standings(repo: Path, spec: PhaseSpec) -> dict[str, Standing]:
    """Experiment key -> the standing at which it was pruned, from the rung book."""
    path = rung_book_path(repo, spec)
    judged = json.loads(path.read_text()) if path.exists() else {}
    return {
        standing["experiment"]: Standing(**standing)
        for standings in judged.values()
        for standing in standings
        if standing["pruned"]
    }
