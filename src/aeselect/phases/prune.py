"""The pruning step at a budget rung: the decision's own evidence, applied early.

At a rung every live candidate has scored the val set per image on its current weights. The best
by the phase's primary metric stays; another candidate is pruned only when the whole 95% interval
of its paired-bootstrap difference from the best (phases.noise, seeds resampled with `repeats`, as
`compare` does) lies beyond the decision's tolerance. Raw-value rules (successive halving, ASHA)
drop the lower half whatever the noise; this one drops only what the final decision could not
pick either, so a candidate within the noise always goes on.
"""

from __future__ import annotations

import math

import pandas as pd

from aeselect.phases.noise import Difference, paired_bootstrap
from aeselect.phases.rung_book import Standing
from aeselect.sweep.spec import DecisionRule, PhaseError


def beyond_tolerance(
    difference: Difference, best: float, rule: DecisionRule, allowance: float = 0.0
) -> bool:
    """Whether the whole interval says worse than the best by more than the tolerance (plus a
    rung's allowance for the training still ahead)."""
    margin = abs(best) * (rule.tolerance + allowance)
    if rule.primary.direction == "min":
        return difference.low > margin
    return difference.high < -margin


def judge_rung(
    scores: dict[str, pd.DataFrame],
    steps: dict[str, int],
    rule: DecisionRule,
    prune: bool,
    allowance: float = 0.0,
) -> list[Standing]:
    """Each candidate's standing at a rung, best first.

    `scores`: experiment key -> its primary metric per val image at the rung (index: image path,
    one column per training seed); `steps`: the step each was scored at; `allowance`: the
    relative tolerance added at this rung (`Budget.allowance`). With `prune` False the
    intervals are computed and recorded, and nothing is pruned.
    """
    if not scores:
        raise PhaseError("a rung with no candidate to judge")
    means = {key: float(frame.to_numpy().mean()) for key, frame in scores.items()}
    finite = [key for key in means if not math.isnan(means[key])]
    if not finite:
        raise PhaseError(f"every candidate's rung scores are NaN: {', '.join(means)} diverged")
    pick = min if rule.primary.direction == "min" else max
    best = pick(finite, key=lambda key: means[key])
    standings = [Standing(best, steps[best], means[best], 0.0, 0.0, 0.0, False)]
    for key, frame in scores.items():
        if key == best:
            continue
        if key not in finite:  # diverged: no interval, and it cannot win
            nan = math.nan
            standings.append(Standing(key, steps[key], nan, nan, nan, nan, prune))
            continue
        difference = paired_bootstrap(scores[best], frame)
        pruned = prune and beyond_tolerance(difference, means[best], rule, allowance)
        standings.append(
            Standing(
                key,
                steps[key],
                means[key],
                difference.value,
                difference.low,
                difference.high,
                pruned,
            )
        )
    return standings
