"""Is a difference between two candidates more than noise? A paired bootstrap over the val images.

A candidate's primary metric is a mean over the val images, and every candidate is scored on the
same images (evaluate writes one row per image to `per_image.csv`). The difference between two
candidates is therefore the mean of per-image differences, paired by image path; resampling the
images with replacement shows how much that mean would move on another draw of images like these.
With `repeats`, each experiment's values are means over its training seeds, and the bootstrap
resamples the seeds as well: a seed shifts a whole run, which resampling images cannot reveal.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aeselect.dvc import read_output
from aeselect.paths import PER_IMAGE_CSV, PROBE_PER_IMAGE_CSV
from aeselect.paths import PER_IMAGE_PAIRING_KEY as PAIRING_KEY
from aeselect.phases.rung_book import pruned_standings
from aeselect.sweep.results import collect_results
from aeselect.sweep.spec import PhaseSpec
from aeselect.sweep.status import Status

PER_IMAGE_FILE = PER_IMAGE_CSV.as_posix()
PROBE_PER_IMAGE_FILE = PROBE_PER_IMAGE_CSV.as_posix()
# Per-image metrics beside the primary whose differences get intervals too: the probe's, so that
# a tie-break on the latent's diffusability shows whether it is more than noise.
SECONDARY_PER_IMAGE = ("probe.loss",)
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
RUN_COLUMNS = (
    "experiment",
    "key",
    "repeat",
    "state",
    "rev",
    "baseline",
    "timestamp",
    "stale_on",
    "note",
)


@dataclass(frozen=True)
class Difference:
    """Candidate minus best in a mean over val images, with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    @property
    def includes_zero(self) -> bool:
        return self.low <= 0 <= self.high


def paired_bootstrap(
    best: pd.Series | pd.DataFrame,
    candidate: pd.Series | pd.DataFrame,
    *,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Difference:
    """`candidate - best` over the same images, with the percentile interval of its mean over
    `resamples` resamplings; deterministic in `seed`.

    Each side is indexed by image path, one column per training seed (a Series is one seed). The
    images are resampled once for both sides (paired); with several seeds each side's seeds are
    resampled too, so a difference that another seed would undo is not mistaken for a real one:
    a seed moves every image of a run together, which resampling images alone cannot see.
    """
    best, candidate = pd.DataFrame(best), pd.DataFrame(candidate)
    if best.index.has_duplicates or set(best.index) != set(candidate.index):
        raise ValueError("a paired bootstrap needs both sides scored on the same, unique images")
    best_values = best.sort_index().to_numpy(dtype=np.float64)  # (images, seeds)
    candidate_values = candidate.sort_index().to_numpy(dtype=np.float64)
    images = len(best_values)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, images, size=(resamples, images))

    def seed_means(values: np.ndarray) -> np.ndarray:
        """Per-image means over resampled seeds, (images, resamples): seed-count weights."""
        seeds = values.shape[1]
        drawn = rng.integers(0, seeds, size=(resamples, seeds))
        weights = (drawn[:, :, None] == np.arange(seeds)).sum(axis=1) / seeds
        return values @ weights.T

    differences = seed_means(candidate_values) - seed_means(best_values)
    means = np.take_along_axis(differences, picks.T, axis=0).mean(axis=0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    value = candidate_values.mean(axis=1) - best_values.mean(axis=1)
    return Difference(float(value.mean()), float(low), float(high))


@dataclass
class PhaseResults:
    """What compare and promote rank: the runs, the experiments, and the per-image evidence."""

    runs: pd.DataFrame  # one row per phase run, its current fresh attempt (collect_results)
    experiments: pd.DataFrame  # one row per experiment of the phase file, metrics over its seeds
    # The primary metric: rows = val image paths, columns = (experiment, seed).
    per_image: pd.DataFrame | None
    no_interval: str  # why per_image is None ("" when it is not)
    # SECONDARY_PER_IMAGE metrics per val image, laid out like per_image, where every
    # successful experiment has them.
    secondary: dict[str, pd.DataFrame] = field(default_factory=dict)


def seed_spread_column(metric: str) -> str:
    return f"{metric}.seed_std"


def mean_over_seeds(runs: pd.DataFrame, spec: PhaseSpec, primary: str) -> pd.DataFrame:
    """One row per experiment: numbers that differ between its seeds averaged (booleans: true in
    every seed), the rest from its first seed, whose run stands for it (rev, curves, images).
    An experiment is a Success only when every one of its seeds is. Without `repeats` the row
    is its one run's, named as that run (`p1-1-lc8_2` after a retry)."""
    rows = []
    for key, group in runs.sort_values("repeat", kind="stable").groupby("key", sort=False):
        row = group.iloc[0].drop("repeat").to_dict()
        if spec.repeats > 1:
            row["experiment"] = spec.experiment_name(str(key))
        unfinished = group[group["state"] != Status.SUCCESS.label]
        if len(unfinished):
            first = unfinished.iloc[0]
            rows.append(row | {c: first[c] for c in ("state", "stale_on") if c in first})
            continue
        for name in group.columns.difference(RUN_COLUMNS):
            values = list(group[name])
            kept = len(set(values)) == 1 or any(isinstance(v, str) for v in values)
            if name.startswith("params.") or kept:
                continue
            if all(isinstance(v, bool | np.bool_) for v in values):
                row[name] = all(values)
            else:
                row[name] = float(np.mean(values))
        if spec.repeats > 1 and primary in group:
            row[seed_spread_column(primary)] = float(group[primary].std())
        rows.append(row)
    order = {key: i for i, key in enumerate(spec.experiments)}
    frame = pd.DataFrame(rows).sort_values("key", key=lambda s: s.map(order))
    return frame.reset_index(drop=True)


def per_image_values(
    repo: Path, runs: pd.DataFrame, experiments: pd.DataFrame, metric: str
) -> tuple[pd.DataFrame | None, str]:
    """`metric` of every successful experiment per val image (evaluate's CSV, or the probe's for
    a probe metric), one column per (experiment, seed); or None and the reason no interval
    exists."""
    done = experiments.loc[experiments["state"] == Status.SUCCESS.label, "key"]
    if done.empty:
        return None, "no experiment succeeded, so no interval exists"
    source = PROBE_PER_IMAGE_FILE if metric.startswith("probe.") else PER_IMAGE_FILE
    columns: dict[str, pd.DataFrame] = {}
    for key in done:
        seeds = []
        for rev in runs.loc[runs["key"] == key, "rev"]:
            frame = pd.read_csv(io.BytesIO(read_output(repo, source, rev)))
            if metric not in frame.columns:
                return None, (
                    f"{metric} has no per-image values ({source} has "
                    f"{', '.join(c for c in frame.columns if c != PAIRING_KEY)}), so no "
                    "interval exists"
                )
            seeds.append(frame.set_index(PAIRING_KEY)[metric])
        name = experiments.loc[experiments["key"] == key, "experiment"].iloc[0]
        columns[name] = pd.concat(seeds, axis=1, ignore_index=True)
    table = pd.concat(columns, axis=1)  # one column per (experiment, seed), aligned by path
    if table.isna().any(axis=None):
        return None, "the runs were not evaluated on the same val images, so no interval exists"
    return table, ""


def _why_left(repo: Path, spec: PhaseSpec, experiments: pd.DataFrame) -> list[str]:
    """Why a budget-aware sweep's candidate ended before training to the end: pruned at a rung
    (on the evidence of the rung book), or excluded by its params before it trained."""
    pruned = pruned_standings(repo, spec)
    metric = spec.decide.primary.key
    reasons = []
    for _, row in experiments.iterrows():
        key, state = row["key"], row["state"]
        if state == Status.PRUNED.label and key in pruned:
            standing = pruned[key]
            reasons.append(f"pruned at step {standing.step}: {metric} {standing.evidence()}")
        elif state == Status.EXCLUDED.label:
            reasons.append(str(row.get("note", "")))
        else:
            reasons.append("")
    return reasons


def gather(repo: Path, spec: PhaseSpec, sweep: dict[str, Any]) -> PhaseResults:
    """The phase's fresh runs from DVC (`collect_results`: on today's baseline and the sweep's
    --set), averaged per experiment, with per-image values if they exist."""
    primary = spec.decide.primary
    runs = collect_results(repo, spec, sweep)
    experiments = mean_over_seeds(runs, spec, primary.key)
    experiments["left"] = _why_left(repo, spec, experiments)
    secondary = {}
    for metric in SECONDARY_PER_IMAGE:
        if metric != primary.key and metric in experiments.columns:
            values, _ = per_image_values(repo, runs, experiments, metric)
            if values is not None:
                secondary[metric] = values
    if primary.source == "param":
        why = f"{primary.key} is a param, so no interval exists"
        return PhaseResults(runs, experiments, None, why, secondary)
    per_image, why = per_image_values(repo, runs, experiments, primary.key)
    return PhaseResults(runs, experiments, per_image, why, secondary)
