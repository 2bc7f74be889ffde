"""DVC's queue: its tasks' states, read where `dvc queue status` reads them (it has no JSON).

A worker killed with SIGKILL leaves its task "Running" forever (dvc 3.67.1): such a task is
Stuck here, told by its recorded pid.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from aeselect.dvc import queue_tasks
from aeselect.sweep.status import Status

RUN_DIR = Path(".dvc/tmp/exps/run")


@dataclass(frozen=True)
class TaskState:
    name: str
    task: str  # DVC's short task id
    status: Status
    log: str = ""  # set for drained tasks; DVC's queue keeps its logs by task id
    note: str = ""  # a budget rung's word on a drained task: "at step 50" for a pruned one

    def log_path(self, repo: Path) -> Path | None:
        if self.log:
            return repo / self.log
        matches = sorted((repo / RUN_DIR).glob(f"{self.task}*/{self.task}*.out"))
        return matches[0] if matches else None


def queue_states(repo: Path) -> dict[str, TaskState]:
    """Name -> state of the tasks in DVC's queue, Running tasks whose process is gone as Stuck."""
    states: dict[str, TaskState] = {}
    for task, name, word in queue_tasks(repo):
        status = Status(word.lower())  # DVC writes it capitalised
        if status == Status.RUNNING and not _task_alive(repo, task):
            status = Status.STUCK
        states.setdefault(name, TaskState(name, task, status))
    return states


def _task_alive(repo: Path, task: str) -> bool:
    """A Running task whose recorded pid is gone was killed (SIGKILL) and will never finish."""
    infos = sorted((repo / RUN_DIR).glob(f"{task}*/{task}*.json"))
    if not infos:
        return True  # not started by the executor yet
    pid = json.loads(infos[0].read_text()).get("pid")
    if pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
