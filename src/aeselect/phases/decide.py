"""The decision rule: best primary metric, ties within a tolerance broken by secondary criteria."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from aeselect.phases.spec import Criterion, DecisionRule, PhaseError


@dataclass(frozen=True)
class Ranking:
    table: pd.DataFrame  # successful experiments, best first, with `rank` and `tied` columns
    winner: str
    reason: str


def column(criterion: Criterion) -> str:
    return criterion.key if criterion.source == "metric" else f"params.{criterion.key}"


def _sort_value(value, direction: str) -> float:
    """Ascending sort key: missing or NaN values sort last whatever the direction."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.inf
    number = float(value)
    return number if direction == "min" else -number


def rank(results: pd.DataFrame, rule: DecisionRule) -> Ranking:
    """Order the successful experiments by the rule and say why the first one wins."""
    done = results[results["state"] == "Success"].copy()
    primary = column(rule.primary)
    if done.empty:
        raise PhaseError("no successful experiment to rank")
    for criterion in (rule.primary, *rule.tie_breakers):
        if column(criterion) not in done.columns:
            raise PhaseError(f"decide: no experiment reports {column(criterion)!r}")
    values = done[primary].astype(float)
    best = values.min() if rule.primary.direction == "min" else values.max()
    if rule.primary.direction == "min":
        tied = values <= best * (1 + rule.tolerance)
    else:
        tied = values >= best * (1 - rule.tolerance)
    done["tied"] = tied.to_numpy()

    def order_key(row: pd.Series) -> tuple:
        """Tied rows first, by the tie-breakers; the rest after them by the primary metric."""
        by_primary = _sort_value(row[primary], rule.primary.direction)
        if not row["tied"]:
            return (1, by_primary)
        breakers = tuple(_sort_value(row[column(c)], c.direction) for c in rule.tie_breakers)
        return (0, *breakers, by_primary)

    order = sorted(range(len(done)), key=lambda i: order_key(done.iloc[i]))
    table = done.iloc[order].reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return Ranking(table, str(table.loc[0, "experiment"]), _reason(table, rule, best))


def _reason(table: pd.DataFrame, rule: DecisionRule, best: float) -> str:
    primary = column(rule.primary)
    winner = table.iloc[0]
    text = (
        f"{winner['experiment']} has {primary} {winner[primary]:.6g}; the best is {best:.6g}, "
        f"and {int(table['tied'].sum())} of {len(table)} experiments are within "
        f"{rule.tolerance:.0%} of it"
    )
    if table["tied"].sum() > 1 and rule.tie_breakers:
        breakers = ", then ".join(c.describe() for c in rule.tie_breakers)
        details = "; ".join(
            f"{row['experiment']}: "
            + ", ".join(f"{c.key}={row[column(c)]}" for c in rule.tie_breakers)
            for _, row in table[table["tied"]].iterrows()
        )
        text += f"; among those, ordered by {breakers} ({details})"
    return text
