"""Promotion: the winner's selected keys into params.yaml, the decision into phases/decisions/,
both in one Git commit that touches nothing else.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ruamel.yaml import YAML

from aeselect.config import PARAMS_FILE, EvaluateConfig, apply_overrides, from_dict, read_yaml
from aeselect.evaluation.gates import gate_bounds
from aeselect.git import git
from aeselect.paths import EXPORT_PATH
from aeselect.phases.decide import LEFT_EARLY, Ranking, column, rank
from aeselect.phases.noise import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    RESAMPLES,
    SECONDARY_PER_IMAGE,
    PhaseResults,
    gather,
    seed_spread_column,
)
from aeselect.sweep.names import parse_run_name
from aeselect.sweep.queue import dirty_paths
from aeselect.sweep.spec import DECISIONS_DIR, PhaseError, PhaseSpec, all_phases
from aeselect.sweep.status import Status

# Columns every decision file and report shows, beside the rule's own.
HEADLINE = [
    "mse",
    "psnr",
    "psnr_pooled",
    "ssim",
    "edge_f1",
    "hf_psnr",
    "kld",
    "aux_pixel_acc",
    "aux_miou",
    "latent.shape",
    "cost.params",
    "images_per_s",
    "train_time_s",
    "gates.pass_all",
]
HANDOFF_FILE = EXPORT_PATH.as_posix()


def decision_path(phase_id: str, repo: Path) -> Path:
    return repo / DECISIONS_DIR / f"{phase_id}.yaml"


def read_decision(phase_id: str, repo: Path) -> dict[str, Any] | None:
    path = decision_path(phase_id, repo)
    return yaml.safe_load(path.read_text()) if path.exists() else None


def require_decided(spec: PhaseSpec, repo: Path) -> None:
    if spec.requires and read_decision(spec.requires, repo) is None:
        raise PhaseError(
            f"phase {spec.id} requires phase {spec.requires}'s decision, and "
            f"{DECISIONS_DIR}/{spec.requires}.yaml does not exist: run and promote "
            f"{spec.requires} first (`aeselect phase run {spec.requires}`, then "
            f"`aeselect phase promote {spec.requires}`)"
        )


def set_params(text: str, values: dict[str, Any]) -> str:
    """params.yaml text with `values` (dotted keys) set, comments and layout kept.

    ruamel's round trip is what `dvc exp run -S` edits params with; unchanged lines stay byte-equal.
    """
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096
    document = yaml_rt.load(text)
    for dotted, value in values.items():
        node = document
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    out = io.StringIO()
    yaml_rt.dump(document, out)
    return out.getvalue()


def _plain(value: Any) -> Any:
    """YAML-friendly scalars (numpy/pandas types and NaN out)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _summary(row: pd.Series, spec: PhaseSpec) -> dict[str, Any]:
    primary = column(spec.decide.primary)
    keys = [primary, seed_spread_column(primary)]
    keys += [column(c) for c in spec.decide.tie_breakers] + HEADLINE
    return {k: _plain(row[k]) for k in dict.fromkeys(keys) if k in row.index}


def _listing(results: pd.DataFrame) -> dict[str, str]:
    """Each run (`collect_results` rows) that has no successful fresh attempt, with what it has
    instead."""
    listing = {}
    for _, row in results[~results["state"].isin((Status.SUCCESS.label, *LEFT_EARLY))].iterrows():
        state = row["state"].lower()
        if row["state"] == Status.STALE.label:
            state = f"stale: ran on {row['stale_on']}"
        listing[row["experiment"]] = state
    return listing


def _versus_best(row: pd.Series) -> dict[str, Any]:
    """The candidate's difference from the best in the primary metric, with its 95% interval."""
    interval = [_plain(row["delta_low"]), _plain(row["delta_high"])]
    return {
        "difference_from_best": _plain(row["delta"]),
        "interval_95": None if interval[0] is None else interval,
        "versus_best": row["vs_best"],
    }


def _versus_lowest(row: pd.Series) -> dict[str, Any]:
    """Each secondary metric's difference from its lowest candidate, with its 95% interval."""
    return {
        f"{metric}_vs_lowest": {
            "difference": _plain(row[f"{metric}.delta"]),
            "interval_95": [
                _plain(row[f"{metric}.delta_low"]),
                _plain(row[f"{metric}.delta_high"]),
            ],
        }
        for metric in SECONDARY_PER_IMAGE
        if _plain(row.get(f"{metric}.delta")) is not None
    }


def _picked(spec: PhaseSpec, phase: PhaseResults, pick: str) -> pd.Series:
    """The experiment `--pick` names, by its name (`p1-1-lc8`: its current fresh run) or by the
    name of a current run of it (`p1-1-lc8_2`; with `repeats`, `p1-1-lc8-s1`); it must have
    succeeded on today's baseline."""
    bases = {spec.experiment_name(key): key for key in spec.experiments}
    parsed = parse_run_name(spec, pick)
    key = bases.get(pick) or (parsed[0] if parsed else None)
    if key is None:
        names = ", ".join(bases)
        raise PhaseError(f"--pick {pick}: not an experiment of phase {spec.id} ({names})")
    row = phase.experiments.set_index("key").loc[key]
    own = phase.runs[phase.runs["key"] == key]
    if row["state"] != Status.SUCCESS.label or (
        pick not in bases and pick not in set(own["experiment"])
    ):
        current = ", ".join(own["experiment"])
        state = ", ".join(f"{n}: {s}" for n, s in _listing(own).items())
        raise PhaseError(
            f"--pick {pick}: it has no successful fresh run ({state or f'its run is {current}'})"
        )
    return row


def promote(
    repo: Path,
    spec: PhaseSpec,
    sweep: dict[str, Any],
    *,
    pick: str | None = None,
    why: str | None = None,
    gathered: PhaseResults | None = None,
) -> dict[str, Any]:
    """Write the decision and commit it; refuses rather than guess or lose work.

    Only fresh runs count (`gather`, `collect_results`): each ran with params.yaml at HEAD, its
    experiment's set and the sweep's --set (`sweep`), on HEAD's code and pipeline. `gathered` is
    what `compare` gathered just before, for the same HEAD and `sweep` (the demo's compare, then
    promote): reading DVC again would give the same runs ~10 s later.
    """
    require_promotable(repo, spec)
    phase = gathered if gathered is not None else gather(repo, spec, sweep)
    unfinished = _listing(phase.runs)
    if unfinished and pick is None:
        listing = ", ".join(f"{n} ({s})" for n, s in unfinished.items())
        raise PhaseError(
            f"phase {spec.id}: not every experiment has a successful run on today's baseline: "
            f"{listing}. Run them (`aeselect phase run {spec.id}` queues what is missing, "
            "stale or failed), or choose with --pick NAME --why '...'"
        )
    ranking = rank(
        phase.experiments, spec.decide, phase.per_image, phase.no_interval, phase.secondary
    )
    if not ranking.winner and pick is None:
        raise PhaseError(
            f"phase {spec.id}: no candidate may be promoted: {ranking.reason}. Change the "
            "candidates or the requirement, or choose with --pick NAME --why '...' (recorded)"
        )
    winner, override = ranking.winner, None
    if pick is not None:
        winner, override = _override(spec, phase, ranking, pick, why)
    row = ranking.table.set_index("experiment").loc[winner]
    selected = {key: spec.experiments[row["key"]][key] for key in spec.selects}
    write_params(repo, spec, winner, row, selected)
    decision = {
        "phase": spec.id,
        "title": spec.title,
        "decided": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "winner": winner,
        "experiment_rev": _plain(row["rev"]),
        "baseline_commit": _plain(row["baseline"]),  # the HEAD the winning run ran on
        "sweep_set": sweep,
        "selected": selected,
        "override": override,
        "rule": _rule(spec),
        "verdict": ranking.verdict,
        "rationale": (f"picked by hand: {why}; the rule's order was: " if override else "")
        + ranking.reason,
        "noise": _noise(spec, phase, ranking),
        "metrics": _summary(row, spec),
        "candidates": _candidates(spec, phase.runs, ranking)
        + [{"experiment": n, "state": s} for n, s in unfinished.items()],
    }
    return commit_decision(repo, spec, decision, row)


def require_promotable(repo: Path, spec: PhaseSpec) -> None:
    """Refuse to mix the user's params.yaml edits into the commit, or to decide a phase twice."""
    if dirty_paths(repo, (PARAMS_FILE,)):
        raise PhaseError(
            f"{PARAMS_FILE} has uncommitted changes; commit or stash them first "
            "(promotion writes params.yaml and must not mix your edits into its commit)"
        )
    if decision_path(spec.id, repo).exists():
        raise PhaseError(
            f"phase {spec.id} is already decided ({DECISIONS_DIR}/{spec.id}.yaml); "
            "`git revert` that commit to decide again"
        )


def _override(
    spec: PhaseSpec, phase: PhaseResults, ranking: Ranking, pick: str, why: str | None
) -> tuple[str, dict[str, str]]:
    """`--pick` with its `--why`: the picked experiment, and what the decision records of it."""
    row = _picked(spec, phase, pick)
    if not why:
        raise PhaseError("--pick needs --why '...': the decision file records the reason")
    ranked = ranking.table.set_index("experiment").loc[row["experiment"]]
    return row["experiment"], {
        "picked": row["experiment"],
        "rule_winner": ranking.winner or None,
        "why": why,
        "fails_requirements": _plain(ranked.get("excluded")) or None,
    }


def write_params(
    repo: Path, spec: PhaseSpec, winner: str, row: pd.Series, selected: dict[str, Any]
) -> None:
    """Set the selected keys in params.yaml, after checking that the promoted file is valid and
    holds exactly what the winning run recorded."""
    params_file = repo / PARAMS_FILE
    new_text = set_params(params_file.read_text(), selected)
    written = from_dict(yaml.safe_load(new_text)).flat()  # the promoted file must be valid
    differing = {
        k: (_plain(row[f"params.{k}"]), written[k])
        for k in selected
        if row[f"params.{k}"] != written[k]
    }
    if differing:
        listing = "; ".join(
            f"{k}: the run recorded {a!r}, params.yaml would get {b!r}"
            for k, (a, b) in differing.items()
        )
        raise PhaseError(
            f"phase {spec.id}: {winner} did not run with what promotion writes: {listing}"
        )
    params_file.write_text(new_text)


def _rule(spec: PhaseSpec) -> dict[str, Any]:
    return {
        "metric": column(spec.decide.primary),
        "direction": spec.decide.primary.direction,
        "tolerance": spec.decide.tolerance,
        "tie_breakers": [c.describe() for c in spec.decide.tie_breakers],
        "requirements": [r.describe() for r in spec.decide.requirements],
    }


def _noise(spec: PhaseSpec, phase: PhaseResults, ranking: Ranking) -> dict[str, Any]:
    """How the differences from the best were judged: the bootstrap's settings and evidence."""
    return {
        "method": "paired bootstrap over the val images of "
        f"{column(spec.decide.primary)}, minus the best's",
        "best": ranking.best,
        "val_images": None if phase.per_image is None else len(phase.per_image),
        "resamples": RESAMPLES,
        "seed": BOOTSTRAP_SEED,
        "confidence": CONFIDENCE,
        "training_seeds": spec.repeats,
        "no_interval": phase.no_interval or None,
    }


def _candidates(spec: PhaseSpec, runs: pd.DataFrame, ranking: Ranking) -> list[dict[str, Any]]:
    """Every ranked experiment: its rank, runs, selected params, difference from the best and
    headline metrics."""
    return [
        {
            "experiment": r["experiment"],
            "rank": int(r["rank"]),
            "tied_with_best": bool(r["tied"]),
            "experiment_rev": _plain(r["rev"]),
            "baseline_commit": _plain(r["baseline"]),
            "params": {k: _plain(r.get(f"params.{k}")) for k in spec.selects},
            "excluded": _plain(r.get("excluded")) or None,
        }
        | _versus_best(r)
        | _summary(r, spec)
        | _versus_lowest(r)
        | _seed_runs(runs, r["key"], spec)
        for _, r in ranking.table.iterrows()
    ]


def commit_decision(
    repo: Path, spec: PhaseSpec, decision: dict[str, Any], row: pd.Series
) -> dict[str, Any]:
    """Write the decision (and after the last phase, final.yaml) and commit it with params.yaml;
    returns the decision with its commit and message."""
    path = decision_path(spec.id, repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(decision, sort_keys=False, width=100))
    committed = [PARAMS_FILE, str(path.relative_to(repo))]
    if spec.id == last_phase_id(repo):
        final = final_summary(repo, decision, row)
        final_path = repo / DECISIONS_DIR / "final.yaml"
        final_path.write_text(yaml.safe_dump(final, sort_keys=False, width=100))
        committed.append(str(final_path.relative_to(repo)))
    settings = " ".join(f"{k.split('.')[-1]}={v}" for k, v in decision["selected"].items())
    primary = decision["rule"]["metric"]
    message = (
        f"phase {spec.id}: {settings or decision['winner']} "
        f"({primary} {row[primary]:.4g}, {decision['verdict']})"
    )
    git(repo, "add", "--", *committed)
    git(repo, "commit", "-q", "-m", message, "--", *committed)
    decision["commit"] = git(repo, "rev-parse", "--short", "HEAD").strip()
    decision["commit_message"] = message
    return decision


def _seed_runs(runs: pd.DataFrame, key: str, spec: PhaseSpec) -> dict[str, Any]:
    """With `repeats`, each seed's run and rev (the experiment's own rev is its seed 0's)."""
    if spec.repeats == 1:
        return {}
    mine = runs[runs["key"] == key]
    return {"runs": {str(r["experiment"]): _plain(r["rev"]) for _, r in mine.iterrows()}}


def last_phase_id(repo: Path) -> str:
    return all_phases(repo / "phases")[-1].id


def final_summary(repo: Path, decision: dict[str, Any], row: pd.Series) -> dict[str, Any]:
    """What Phase 2 needs: architecture, checkpoint and how to get it, latent shape, metrics."""
    params = read_yaml(repo / PARAMS_FILE)
    cfg = from_dict(params)
    at_512 = from_dict(apply_overrides(params, {"data.image_size": 512}))
    rev = decision["experiment_rev"]
    metrics = decision["metrics"]
    return {
        "phase": "1",
        "decided": decision["decided"],
        "architecture": cfg.to_dict()["model"] | {"channel_schedule": cfg.model.channel_schedule()},
        "losses": cfg.to_dict()["loss"],
        "latent_shape_hwc_at_512": "x".join(map(str, at_512.latent_shape)),
        "latent_shape_hwc_trained": "x".join(map(str, cfg.latent_shape)),
        "trained_image_size": cfg.data.image_size,
        "checkpoint": {
            "experiment": decision["winner"],
            "rev": rev,
            "path": HANDOFF_FILE,
            "get": f"dvc get . {HANDOFF_FILE} --rev {rev} -o autoencoder.pt",
            "python": f"aeselect.load_autoencoder(rev='{rev}')",
        },
        "metrics": metrics,
        "success_criteria": success_criteria(cfg.evaluate, row),
        "success_criteria_met": _plain(row.get("gates.pass_all")) is True,
    }


def success_criteria(cfg: EvaluateConfig, row: pd.Series) -> dict[str, dict[str, Any]]:
    """Each gate's bounds and the winner's values, and whether the evaluate stage passed it.

    "met" is the run's own `gates.pass_*`: the bounds are compared once, in the evaluate stage.
    """
    return {
        gate: {
            "target": ", ".join(map(str, bounds)),
            "values": {bound.metric: _plain(row.get(bound.metric)) for bound in bounds},
            "met": _plain(row.get(f"gates.pass_{gate}")) is True,
        }
        for gate, bounds in gate_bounds(cfg).items()
    }
