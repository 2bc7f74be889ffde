"""The drainer's claim records (aeselect.cluster.claims), read as task states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aeselect.sweep.status import Status
from aeselect.sweep.tasks import TaskState

DRAIN_DIR = Path(".dvc/tmp/aeselect-drain")


def claim_records(repo: Path) -> dict[str, dict[str, Any]]:
    """The drainer's claims (aeselect.cluster.drain) by experiment name, as written."""
    return {
        record["name"]: record
        for record in (json.loads(p.read_text()) for p in sorted((repo / DRAIN_DIR).glob("*.json")))
    }


def claim_state(record: dict[str, Any]) -> TaskState:
    status = Status(record["status"])
    note = {
        Status.PRUNED: f"at step {record.get('pruned_at')}",
        Status.PAUSED: f"at its rung {record.get('rung')}",
        Status.EXCLUDED: f"untrained: {record.get('excluded')}",
    }.get(status, "")
    if status in (Status.CLAIMED, Status.INTERRUPTED):
        status = Status.QUEUED
    return TaskState(record["name"], "", status, record["log"], note)
