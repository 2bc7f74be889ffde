"""Surviving time limits and preemption: stop cleanly on a signal, resume bit-identically.

SLURM warns a job (`--signal=B:USR1@...`) before SIGTERM and SIGKILL. On SIGUSR1 or SIGTERM the
train loop finishes its current logging window, snapshots everything a continuation needs (model,
optimiser, step, histories, the dvclive directory and the checkpoints) under
`$AESELECT_RESUME_DIR/<key>/`, and exits with envvars.PREEMPTED_EXIT_CODE. DVC 3 has no
checkpoints of its own, so the key is derived from what determines the run (resolved config +
prepared data): the same experiment, requeued, finds its snapshot; any other experiment never does.

A snapshot is one dict (a `torch.load(weights_only=True)` file): the model's and the optimiser's
state dicts under "model" and "optimizer", beside every field of TrainState. `TrainState.snapshot`
writes it and `TrainState.resume` reads it back, field for field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from aeselect.config import Config
from aeselect.envvars import PIDFILE_ENV, RESUME_DIR_ENV

STATE_FILE = "state.pt"


Snapshot = dict[str, Any]  # see the module docstring


@dataclass
class TrainState:
    """What a training run carries from step to step besides the weights and the optimiser: all
    that a resumed run needs to continue as if it had never stopped."""

    step: int = 0  # steps done; the next one trains on batch `step`
    best_val_mse: float = math.inf
    best_step: int = -1  # the step of best.pt; -1 before the first validation
    loss_history: list[float] = field(default_factory=list)  # total loss of every step so far
    val_history: list[float] = field(default_factory=list)  # val MSE of every validation so far
    train_seconds: float = 0.0  # training time of every segment so far, validations excluded

    def snapshot(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
        """The resume snapshot at this state."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()} | asdict(self)

    @classmethod
    def resume(
        cls, snapshot: Snapshot, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> TrainState:
        """Load the snapshot's weights and optimiser state into `model` and `optimizer`; its
        state. A snapshot without one of the fields is refused (KeyError), never defaulted."""
        model.load_state_dict(snapshot["model"])
        optimizer.load_state_dict(snapshot["optimizer"])
        return cls(**{name.name: snapshot[name.name] for name in fields(cls)})


class Preempted(Exception):
    """Training stopped on request after saving a resume snapshot."""


class StopRequest:
    """Set by SIGUSR1/SIGTERM; the loop polls it at log boundaries (no work inside the handler).

    `announce`: write this pid to the drainer's pidfile (rank 0 only, when there are several).
    """

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM),
        *,
        announce: bool = True,
    ):
        self.requested: int | None = None
        for signum in signals:
            signal.signal(signum, self._handle)
        pidfile = os.environ.get(PIDFILE_ENV)
        if pidfile and announce:  # where a drainer forwards its stop request, now it is handled
            Path(pidfile).write_text(str(os.getpid()))

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signum

    @property
    def reason(self) -> str:
        """Why the run stops, for its log: this process's signal, or one sent to another rank."""
        return f"on signal {self.requested or 'to another rank'}"


def resume_key(cfg: Config, prepared_dir: Path) -> str:
    digest = hashlib.sha256(json.dumps(cfg.trained_dict(), sort_keys=True).encode())
    for name in ("meta.json", "manifest.csv"):
        digest.update((prepared_dir / name).read_bytes())
    return digest.hexdigest()[:20]


def snapshot_dir(cfg: Config, prepared_dir: Path) -> Path | None:
    """Where this run's snapshot lives, or None when resuming is not configured."""
    root = os.environ.get(RESUME_DIR_ENV)
    return Path(root) / resume_key(cfg, prepared_dir) if root else None


def save_snapshot(directory: Path, snapshot: Snapshot, outputs: list[Path]) -> None:
    """`snapshot` and copies of `outputs` (folders) in `directory`. Written to a sibling temp dir,
    then swapped in: a kill mid-save keeps the previous snapshot."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(snapshot, tmp / STATE_FILE)
    for output in outputs:
        if output.exists():
            shutil.copytree(output, tmp / output.name)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def restore_snapshot(directory: Path | None, outputs: list[Path]) -> Snapshot | None:
    """Put the snapshot's outputs back in place and return it, or None if there is none."""
    snapshot = load_snapshot_state(directory)
    if snapshot is not None:
        for output in outputs:
            shutil.rmtree(output, ignore_errors=True)
            if (directory / output.name).exists():
                shutil.copytree(directory / output.name, output)
    return snapshot


def load_snapshot_state(directory: Path | None) -> Snapshot | None:
    """The snapshot alone, outputs left where they are: what ranks other than 0 resume from."""
    if directory is None or not (directory / STATE_FILE).exists():
        return None
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)


def discard_snapshot(directory: Path | None) -> None:
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
