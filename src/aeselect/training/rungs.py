"""Budget rungs: a training pauses at given steps, scores the val set per image on its current
weights, and stops with its resume snapshot, so a drainer can prune clear losers at the rung and
resume the others exactly where they paused (the preemption path, so bit-identical to a run that
never paused).

The rungs are hardware-like, not params (env RUNGS_ENV, set by the drainer): a param would enter
the experiment's identity and DVC cache key, yet a pause changes nothing of what is trained. A
paused training exits RUNG_EXIT_CODE, a failure to DVC, so no experiment and no run-cache entry is
ever recorded for a run that did not reach `train.max_steps`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from aeselect.config import Config, ConfigError
from aeselect.envvars import RUNG_DIR_ENV, RUNGS_ENV
from aeselect.scoring.per_image import score_batch, write_per_image
from aeselect.scoring.validation import val_batches
from aeselect.training.resume import Preempted


class PausedAtRung(Preempted):
    """Training paused at a rung, its scores and resume snapshot written."""


@dataclass(frozen=True)
class RungPlan:
    steps: tuple[int, ...]  # where to pause, increasing, each a log boundary below max_steps
    directory: Path  # rung_<step>.csv go here

    def scores_path(self, step: int) -> Path:
        return self.directory / f"rung_{step}.csv"


def rung_plan(cfg: Config, snapshot: Path | None) -> RungPlan | None:
    """The rungs the environment asks for, checked against this run's config; None without."""
    raw = os.environ.get(RUNGS_ENV, "").strip()
    if not raw:
        return None
    try:
        steps = tuple(int(part) for part in raw.split(","))
    except ValueError:
        expected = "expected comma-separated steps, e.g. 50,100"
        raise ConfigError(f"{RUNGS_ENV}={raw!r}: {expected}") from None
    log_every, max_steps = cfg.train.log_every, cfg.train.max_steps
    for step in steps:
        if not 0 < step < max_steps or step % log_every:
            raise ConfigError(
                f"{RUNGS_ENV}: rung step {step} must lie in (0, train.max_steps={max_steps}) and "
                f"be a multiple of train.log_every={log_every} (a pause happens at a log boundary)"
            )
    if list(steps) != sorted(set(steps)):
        raise ConfigError(f"{RUNGS_ENV}={raw!r}: steps must increase")
    directory = os.environ.get(RUNG_DIR_ENV)
    if snapshot is None or not directory:
        raise ConfigError(
            f"{RUNGS_ENV} needs AESELECT_RESUME_DIR (a paused run resumes from its snapshot) and "
            f"{RUNG_DIR_ENV} (where its scores go); the drainer sets all three"
        )
    return RungPlan(steps, Path(directory))


@torch.no_grad()
def write_rung_scores(forward, data, cfg: Config, runtime, path: Path) -> None:
    """Every per-image score of the val split on the current weights, as evaluate defines them,
    in plain fp32 as evaluate runs."""
    forward.eval()
    columns: dict[str, list[torch.Tensor]] = {}
    with runtime.fp32() as fp32:
        for batch in val_batches(forward, data, cfg.evaluate.batch_size, fp32):
            for name, values in score_batch(batch.images, batch.reconstruction).items():
                columns.setdefault(name, []).append(values.cpu())
    forward.train()
    write_per_image(data, {k: torch.cat(v) for k, v in columns.items()}, path)
