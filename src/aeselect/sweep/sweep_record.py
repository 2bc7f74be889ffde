"""A phase's sweep --set as its last `phase queue` in this clone recorded it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aeselect.sweep.spec import PhaseSpec

SWEEPS_DIR = Path(".dvc/tmp/aeselect-sweeps")


def sweep_path(repo: Path, spec: PhaseSpec) -> Path:
    return repo / SWEEPS_DIR / f"{spec.id}.json"


def record_sweep(repo: Path, spec: PhaseSpec, sweep: dict[str, Any]) -> None:
    """Remember the sweep's --set: compare, promote and later queues read it back."""
    path = sweep_path(repo, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"set": sweep}, indent=1))


def recorded_sweep(repo: Path, spec: PhaseSpec) -> dict[str, Any]:
    """The --set of the phase's last `phase queue` in this clone ({} if never queued here)."""
    path = sweep_path(repo, spec)
    return json.loads(path.read_text())["set"] if path.exists() else {}
