"""The decision rule: candidates that fail a requirement are excluded; of the others, the best
primary metric; candidates within the noise or a tolerance of it are tied, and ties are broken by
secondary criteria."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from aeselect.config import apply_overrides, from_dict
from aeselect.phases.noise import paired_bootstrap
from aeselect.sweep.spec import PARAMS_METRICS, Criterion, DecisionRule, PhaseError
from aeselect.sweep.status import Status


@dataclass(frozen=True)
class Ranking:
    # Successful experiments, winner first, with `rank`, `tied`, `vs_best` and the difference from
    # the best in the primary metric: `delta` with its 95% interval `delta_low`..`delta_high`;
    # then the excluded ones (`excluded`: the requirement each fails, or where it was pruned).
    table: pd.DataFrame
    winner: str  # "" when every candidate is excluded
    reason: str
    verdict: str  # one of VERDICTS
    best: str  # the best by the primary metric alone


VERDICTS = {
    "clear": "better than every other candidate by more than the noise and the tolerance",
    "tie-break": "tied with the best within the noise or the tolerance; the tie-breakers picked it",
    "single": "the only successful experiment: nothing to compare",
    "excluded": "every candidate fails a requirement: nothing may be promoted but by --pick",
}
# Budget-aware sweeps: pruned at a rung, or never trained.
LEFT_EARLY = (Status.PRUNED.label, Status.EXCLUDED.label)
NO_INTERVAL = "no per-image values were given, so no interval exists"


def column(criterion: Criterion) -> str:
    return criterion.key if criterion.source == "metric" else f"params.{criterion.key}"


def describe_difference(row: pd.Series) -> str:
    """`+0.0012 [-0.0003, +0.0027]`: the difference from the best with its 95% interval."""
    if row["vs_best"] == "best":
        return "(the best)"
    if math.isnan(row["delta_low"]):
        return f"{row['delta']:+.3g} (no interval)"
    return f"{row['delta']:+.3g} [{row['delta_low']:+.3g}, {row['delta_high']:+.3g}]"


def describe_versus_lowest(row: pd.Series, metric: str) -> str:
    """`+0.012 [+0.004, +0.020]` from the candidate lowest in `metric`; "" where none was
    computed (no per-image values, or a candidate that did not train)."""
    value = row.get(f"{metric}.delta")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if value == 0 and row[f"{metric}.delta_low"] == row[f"{metric}.delta_high"] == 0:
        return "(the lowest)"
    return f"{value:+.3g} [{row[f'{metric}.delta_low']:+.3g}, {row[f'{metric}.delta_high']:+.3g}]"


def _sort_value(value, direction: str) -> float:
    """Ascending sort key: missing or NaN values sort last whatever the direction."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    number = float(value)
    return number if direction == "min" else -number


def row_params(row: pd.Series) -> dict[str, Any]:
    """A results row's params (its `params.*` columns), as plain values."""
    return {
        name.removeprefix("params."): value.item() if hasattr(value, "item") else value
        for name, value in row.items()
        if str(name).startswith("params.") and not pd.isna(value)
    }


def requirement_failures(
    rule: DecisionRule, params: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
) -> list[tuple[str, float]]:
    """Each failed requirement of a candidate in words (`latent.compression_ratio 12 fails
    latent.compression_ratio >= 24 (gate latent_size)`), with its relative shortfall. The bounds
    are its own params'. Without `metrics`, only the bounds its params decide (PARAMS_METRICS):
    such a candidate need not train at all."""
    cfg = from_dict(apply_overrides({}, params))
    failures = []
    for requirement in rule.requirements:
        for bound in requirement.bounds(cfg):
            if bound.metric in PARAMS_METRICS:
                value = float(PARAMS_METRICS[bound.metric](cfg))
            elif metrics is None:
                continue
            else:
                value = float(metrics.get(bound.metric, math.nan))
            if bound.holds(value):
                continue
            shortfall = abs(value - bound.limit) / (abs(bound.limit) or 1.0)
            why = f"{bound.metric} {value:.4g} fails {bound}"
            if requirement.gate:
                why += f" (gate {requirement.gate})"
            failures.append((why, math.inf if math.isnan(shortfall) else shortfall))
    return failures


def rank(
    results: pd.DataFrame,
    rule: DecisionRule,
    per_image: pd.DataFrame | None = None,
    no_interval: str = NO_INTERVAL,
    secondary: dict[str, pd.DataFrame] | None = None,
) -> Ranking:
    """Order the successful experiments by the rule and say why the first one wins.

    A candidate that fails a requirement is excluded: it is listed last, with what it fails,
    and can neither win nor tie; so is one that left a budget-aware sweep early (`left` says
    where: pruned at a rung, or excluded by its params before training). Of
    the others, a candidate is tied with the best when its difference is within the tolerance
    or, given `per_image` (the primary metric per val image, columns (experiment, seed) or one
    column per experiment), when the paired bootstrap's 95% interval of the difference contains
    zero: then it is noise, not a ranking. Each `secondary` metric (per val image, laid out
    like `per_image`) gets its difference from its lowest candidate, with its interval.
    """
    done = results[results["state"] == Status.SUCCESS.label].copy()
    primary = column(rule.primary)
    if done.empty:
        raise PhaseError("no successful experiment to rank")
    for criterion in (rule.primary, *rule.tie_breakers):
        if column(criterion) not in done.columns:
            raise PhaseError(f"decide: no experiment reports {column(criterion)!r}")
    failures = {i: requirement_failures(rule, row_params(row), row) for i, row in done.iterrows()}
    done["excluded"] = [("; ".join(w for w, _ in failures[i])) for i in done.index]
    done["shortfall"] = [max((s for _, s in failures[i]), default=0.0) for i in done.index]
    pruned = _left_early(results)
    if (done["excluded"] != "").all():
        ranking = _all_excluded(done, pruned, rule)
        return replace(ranking, table=secondary_differences(ranking.table, secondary or {}))
    excluded = done[done["excluded"] != ""]
    done = done[done["excluded"] == ""]
    values = done[primary].astype(float)
    best_index = values.idxmin() if rule.primary.direction == "min" else values.idxmax()
    best, best_name = values[best_index], str(done.loc[best_index, "experiment"])
    within_tolerance = _within_tolerance(values, best, rule)
    done["delta"], done["delta_low"], done["delta_high"] = values - best, math.nan, math.nan
    noise = pd.Series(False, index=done.index)
    if per_image is not None:
        noise = _bootstrap_differences(done, best_index, per_image)
    done["tied"] = within_tolerance | noise
    vs_best = pd.Series("worse", index=done.index)
    vs_best = vs_best.mask(within_tolerance, "tolerance").mask(noise, "noise")
    vs_best[best_index] = "best"
    done["vs_best"] = vs_best
    table = _ordered(done, rule)
    verdict = "single" if len(table) == 1 else "clear" if table["tied"].sum() == 1 else "tie-break"
    reason = _reason(table, rule, verdict, best_name, "" if per_image is not None else no_interval)
    if len(excluded) or len(pruned):
        reason += ". Excluded: " + "; ".join(
            f"{row['experiment']} ({row['excluded']})"
            for frame in (excluded, pruned)
            for _, row in frame.iterrows()
        )
        table = _with_excluded(table, excluded, pruned, best, per_image, best_name, primary)
    table = secondary_differences(table, secondary or {})
    return Ranking(table, str(table.loc[0, "experiment"]), reason, verdict, best_name)


def _within_tolerance(values: pd.Series, best: float, rule: DecisionRule) -> pd.Series:
    if rule.primary.direction == "min":
        return values <= best * (1 + rule.tolerance)
    return values >= best * (1 - rule.tolerance)


def _left_early(results: pd.DataFrame) -> pd.DataFrame:
    """The candidates out of a budget-aware sweep before the end, saying where they left."""
    pruned = results[results["state"].isin(LEFT_EARLY)].copy()
    if len(pruned):
        pruned["excluded"] = pruned.get("left", pd.Series("", index=pruned.index))
        pruned["vs_best"] = pruned["state"].str.lower()  # pruned, or excluded (untrained)
    return pruned


def secondary_differences(table: pd.DataFrame, secondary: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """`<metric>.delta` (and `_low`, `_high`): each candidate's difference from the candidate
    lowest in that metric, with the paired bootstrap's 95% interval. A tie-break on probe.loss
    is then seen to be more than noise, or not."""
    for metric, values in secondary.items():
        if metric not in table:
            continue
        rows = table[table["experiment"].isin(values.columns.get_level_values(0))]
        if len(rows) < 2:
            continue
        lowest = str(rows.loc[rows[metric].astype(float).idxmin(), "experiment"])
        for index, name in rows["experiment"].items():
            d = paired_bootstrap(values[lowest], values[name])
            table.loc[index, [f"{metric}.delta", f"{metric}.delta_low", f"{metric}.delta_high"]] = (
                d.value,
                d.low,
                d.high,
            )
    return table


def _with_excluded(
    table: pd.DataFrame,
    excluded: pd.DataFrame,
    pruned: pd.DataFrame,
    best: float,
    per_image: pd.DataFrame | None,
    best_name: str,
    primary: str,
) -> pd.DataFrame:
    """The excluded candidates after the ranked ones, never tied, with their difference from the
    ranked best (and its interval, given per-image values); then the pruned ones."""
    frame = excluded.assign(tied=False, vs_best="excluded", delta_low=math.nan, delta_high=math.nan)
    frame["delta"] = frame[primary].astype(float) - best
    for index, name in frame["experiment"].items():
        if per_image is not None and name in per_image:
            d = paired_bootstrap(per_image[best_name], per_image[name])
            frame.loc[index, ["delta", "delta_low", "delta_high"]] = (d.value, d.low, d.high)
    out = pd.concat(
        [table.drop(columns="rank"), frame, pruned.assign(tied=False)],
        ignore_index=True,
    )
    out.insert(0, "rank", range(1, len(out) + 1))
    return out


def _all_excluded(done: pd.DataFrame, pruned: pd.DataFrame, rule: DecisionRule) -> Ranking:
    """Every successful candidate fails a requirement: no winner; the closest (the smallest
    relative shortfall) is named, for a `--pick` to consider."""
    table = done.sort_values("shortfall", kind="stable").assign(tied=False, vs_best="excluded")
    table = pd.concat([table, pruned.assign(tied=False)], ignore_index=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    for name in ("delta", "delta_low", "delta_high"):
        table[name] = math.nan
    closest = table.iloc[0]
    requirements = ", ".join(r.describe() for r in rule.requirements)
    reason = (
        f"every candidate fails a requirement ({requirements}); the closest is "
        f"{closest['experiment']}: {closest['excluded']}. "
        + "; ".join(f"{r['experiment']}: {r['excluded']}" for _, r in table.iloc[1:].iterrows())
    )
    return Ranking(table, "", reason.rstrip(". "), "excluded", "")


def _bootstrap_differences(
    done: pd.DataFrame, best_index: Hashable, per_image: pd.DataFrame
) -> pd.Series:
    """Fill each candidate's `delta` and its interval from the paired bootstrap against the best;
    returns which candidates are tied with it by the noise (their interval contains 0)."""
    best_name = done.loc[best_index, "experiment"]
    noise = pd.Series(False, index=done.index)
    for index, name in done["experiment"].items():
        if index == best_index:  # zero by definition (resampling its seeds twice would blur it)
            done.loc[index, ["delta_low", "delta_high"]] = 0.0
            continue
        difference = paired_bootstrap(per_image[best_name], per_image[name])
        done.loc[index, ["delta", "delta_low", "delta_high"]] = (
            difference.value,
            difference.low,
            difference.high,
        )
        noise[index] = difference.includes_zero
    return noise


def _ordered(done: pd.DataFrame, rule: DecisionRule) -> pd.DataFrame:
    """Tied rows first, by the tie-breakers; the rest after them by the primary metric; with
    `rank` from 1."""
    primary = column(rule.primary)

    def order_key(row: pd.Series) -> tuple:
        by_primary = _sort_value(row[primary], rule.primary.direction)
        if not row["tied"]:
            return (1, by_primary)
        breakers = tuple(_sort_value(row[column(c)], c.direction) for c in rule.tie_breakers)
        return (0, *breakers, by_primary)

    order = sorted(range(len(done)), key=lambda i: order_key(done.iloc[i]))
    table = done.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def _reason(
    table: pd.DataFrame, rule: DecisionRule, verdict: str, best: str, no_interval: str
) -> str:
    """The verdict in words, then every difference from the best with its interval."""
    primary = column(rule.primary)
    winner = table.iloc[0]
    best_value = float(table.set_index("experiment").loc[best, primary])
    if verdict == "single":
        return (
            f"{winner['experiment']} is the only successful experiment ({primary} "
            f"{winner[primary]:.6g}): there is nothing to compare it with"
        )
    bounds = []
    if not no_interval:
        bounds.append(
            "within the noise (the 95% bootstrap interval of the difference, paired by val "
            "image, contains 0)"
        )
    if rule.tolerance > 0:
        bounds.append(f"within {rule.tolerance:.0%} of it")
    tie = " or ".join(bounds) or "equal to it"
    tie += f" ({no_interval})" if no_interval else ""
    if verdict == "clear":
        text = (
            f"{winner['experiment']} is clearly better: it has the best {primary} "
            f"({best_value:.6g}), and no other candidate is {tie}"
        )
    else:
        tied = table[table["tied"]]
        text = f"no candidate is better than {'the tolerance' if no_interval else 'the noise'}"
        if len(tied) == len(table):
            text += ": both are" if len(table) == 2 else f": all {len(table)} are"
        else:
            text += f" among {len(tied)} of {len(table)}: {', '.join(tied['experiment'])} are"
        text += f" tied with the best {primary}, {best} ({best_value:.6g}), being {tie}; "
        if rule.tie_breakers:
            breakers = ", then ".join(c.describe() for c in rule.tie_breakers)
            details = "; ".join(
                f"{row['experiment']}: "
                + ", ".join(f"{c.key}={row[column(c)]}" for c in rule.tie_breakers)
                for _, row in tied.iterrows()
            )
            text += f"picked by tie-breakers, {breakers} ({details}): {winner['experiment']}"
        else:
            text += f"with no tie-breakers the best {primary} stands: {winner['experiment']}"
    differences = ", ".join(
        f"{row['experiment']} {describe_difference(row)}"
        for _, row in table.iterrows()
        if row["experiment"] != best
    )
    return text + f". {primary} minus the best's, with 95% intervals: {differences}"
