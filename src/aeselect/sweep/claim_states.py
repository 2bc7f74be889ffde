"""The drainer's claim records (aeselect.cluster.claims), read as task states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aeselect.sweep.tasks import TaskState

DRAIN_DIR = Path(".dvc/tmp/aeselect-drain")


def claim_records(repo: Path) -> dict[str, dict[str, Any]]:
    """The drainer's claims (aeselect.cluster.drain) by experiment name, as written."""
    return {
        record["name"]: record
        for record in (json.loads(p.read_text()) for p in sorted((repo / DRAIN_DIR).glob("*.json")))
    }


def claim_state(record: dict[str, Any]) -> TaskState:
    status = {"claimed": "Queued", "interrupted": "Queued"}.get(record["status"])
    note = {
        "pruned": f"at step {record.get('pruned_at')}",
        "paused": f"at its rung {record.get('rung')}",
        "excluded": f"untrained: {record.get('excluded')}",
    }.get(record["status"], "")
    capitalized = record["status"].capitalize()
    return TaskState(record["name"], "", status or capitalized, record["log"], note)
