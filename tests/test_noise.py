"""Noise-aware ranking: the paired bootstrap, ties within the noise, and means over seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_phases import REPEATED, write_phase

from aeselect.phases.decide import describe_difference, rank
from aeselect.phases.noise import RESAMPLES, PhaseResults, mean_over_seeds, paired_bootstrap
from aeselect.phases.report import DIFFERENCE, display_table, noise_note
from aeselect.sweep.spec import Criterion, DecisionRule, load_phase

PATHS = [f"val/img{i:03d}.png" for i in range(64)]


def per_image(values: np.ndarray) -> pd.Series:
    return pd.Series(values, index=pd.Index(PATHS, name="path"))


def mse_like(seed: int) -> np.ndarray:
    """Per-image MSEs as a reconstruction gives them: positive, skewed, image to image."""
    return np.random.default_rng(seed).lognormal(mean=math.log(0.05), sigma=0.4, size=len(PATHS))


def test_a_clear_difference_has_an_interval_that_excludes_zero():
    best = mse_like(0)
    worse = best * 1.10 + np.random.default_rng(1).normal(0, 0.001, len(PATHS))
    difference = paired_bootstrap(per_image(best), per_image(worse))
    assert difference.value == pytest.approx(float(np.mean(worse - best)))
    assert 0 < difference.low < difference.value < difference.high
    assert not difference.includes_zero


def test_noise_of_the_same_distribution_is_a_tie():
    best = mse_like(0)
    jitter = np.random.default_rng(2).normal(0, 0.01, len(PATHS))
    same = best + (jitter - jitter.mean())  # per-image noise, no difference on average
    difference = paired_bootstrap(per_image(best), per_image(same))
    assert difference.low < 0 < difference.high
    assert difference.includes_zero


def test_pairs_by_image_path_whatever_the_row_order_and_is_deterministic():
    best, other = per_image(mse_like(0)), per_image(mse_like(3))
    by_psnr = other.sort_values()  # per_image.csv is sorted by PSNR, not by path
    first = paired_bootstrap(best, other)
    assert paired_bootstrap(best, by_psnr) == first
    assert paired_bootstrap(best.sample(frac=1, random_state=4), by_psnr) == first
    assert paired_bootstrap(best, other, seed=1) != first  # the seed is what fixes the draw
    assert paired_bootstrap(best, other, seed=1).value == first.value
    # Unpaired, the images' own spread would swamp the difference: pairing must be by path.
    assert first.high - first.low < 0.5 * (other.std() + best.std())
    with pytest.raises(ValueError, match="same, unique images"):
        paired_bootstrap(best, other.iloc[1:])


def test_seeds_are_resampled_too_so_training_noise_is_not_taken_for_a_difference():
    base = per_image(mse_like(0))
    jitter = np.random.default_rng(5).normal(0, 0.0002, (len(PATHS), 3))
    # A training seed moves every image of its run together, by more than the 0.002 between these.
    best = pd.DataFrame({s: base + shift for s, shift in enumerate((-0.004, 0.0, 0.004))})
    other = (
        pd.DataFrame({s: base + 0.002 + shift for s, shift in enumerate((0.004, -0.004, 0.0))})
        + jitter
    )
    over_images = paired_bootstrap(best.mean(axis=1), other.mean(axis=1))
    assert not over_images.includes_zero  # the seed means alone look clearly different...
    over_seeds_too = paired_bootstrap(best, other)
    assert over_seeds_too.value == pytest.approx(over_images.value)
    assert over_seeds_too.includes_zero  # ...but another draw of seeds could reverse them
    # One seed per side is the plain paired bootstrap over images.
    assert paired_bootstrap(best[[0]], other[[0]]) == paired_bootstrap(best[0], other[0])


RULE = DecisionRule(Criterion("mse", "min"), 0.0, (Criterion("cost.params", "min"),))


def experiments(**columns: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = pd.DataFrame(columns, index=pd.Index(PATHS, name="path"))
    rows = pd.DataFrame(
        [
            {"experiment": name, "state": "Success", "mse": values.mean(), "cost.params": i}
            for i, (name, values) in enumerate(columns.items())
        ]
    )
    return rows, table


def test_rank_calls_noise_a_tie_and_lets_the_tie_breakers_pick():
    best = mse_like(0)
    jitter = np.random.default_rng(2).normal(0, 0.01, len(PATHS))
    rows, table = experiments(
        big=best - 0.0005 + (jitter - jitter.mean()),  # best mean, by less than the noise
        small=best,  # fewer params than big would need...
        far=best * 1.5,
    )
    rows["cost.params"] = [900, 100, 10]  # ...and "far" has the fewest, but is clearly worse
    ranking = rank(rows, RULE, table)
    assert ranking.best == "big"
    assert ranking.verdict == "tie-break"
    assert ranking.winner == "small"
    assert list(ranking.table["experiment"]) == ["small", "big", "far"]
    assert list(ranking.table["vs_best"]) == ["noise", "best", "worse"]
    assert ranking.reason.startswith("no candidate is better than the noise among 2 of 3")
    assert "picked by tie-breakers" in ranking.reason
    small = ranking.table.iloc[0]
    assert small["delta_low"] < 0 < small["delta_high"]
    assert describe_difference(small) in ranking.reason  # each difference with its interval
    assert describe_difference(small).startswith("+0.0005 [")


def test_rank_calls_a_difference_beyond_the_noise_clear():
    best = mse_like(0)
    rows, table = experiments(a=best, b=best * 1.2, c=best * 1.3)
    ranking = rank(rows, RULE, table)
    assert (ranking.verdict, ranking.winner) == ("clear", "a")
    assert ranking.reason.startswith("a is clearly better")
    assert (ranking.table["delta_low"].iloc[1:] > 0).all()


def test_without_per_image_values_the_tolerance_alone_decides_and_says_so():
    rows, _ = experiments(a=mse_like(0), b=mse_like(0) * 1.01)
    ranking = rank(rows, RULE, None, "cost.params has no per-image values, so no interval exists")
    assert ranking.verdict == "clear"  # tolerance 0: any difference counts
    assert "no interval exists" in ranking.reason
    assert describe_difference(ranking.table.iloc[1]).endswith("(no interval)")
    assert math.isnan(ranking.table["delta_low"].iloc[1])


def test_mean_over_seeds_averages_metrics_keeps_params_and_flags_a_failed_seed(tmp_path):
    write_phase(tmp_path, "1.1", REPEATED)
    spec = load_phase("1.1", tmp_path)
    runs = pd.DataFrame(
        [
            {
                "experiment": run.name,
                "key": run.key,
                "repeat": run.repeat,
                "state": "Failed" if run.name == "p1-1-lc4-s1" else "Success",
                "rev": f"rev-{run.name}",
                "params.model.latent_channels": run.params["model.latent_channels"],
                "params.train.seed": run.params["train.seed"],
                "mse": 0.01 * (run.repeat + 1),
                "latent.shape": "4x4x2",
                "cost.params": 1000,
                "gates.pass_all": run.repeat == 0,
            }
            for run in spec.runs()
        ]
    )
    merged = mean_over_seeds(runs, spec, "mse").set_index("experiment")
    assert list(merged.index) == ["p1-1-lc2", "p1-1-lc4"]
    lc2 = merged.loc["p1-1-lc2"]
    assert lc2["mse"] == pytest.approx(0.015)
    assert lc2["mse.seed_std"] == pytest.approx(np.std([0.01, 0.02], ddof=1))
    assert lc2["params.model.latent_channels"] == 2 and lc2["latent.shape"] == "4x4x2"
    assert str(lc2["cost.params"]) == "1000"  # equal in every seed: kept as it is, not 1000.0
    # A gate passes only if it passes in every seed (not "half passed").
    assert isinstance(lc2["gates.pass_all"], np.bool_) and not lc2["gates.pass_all"]
    assert lc2["rev"] == "rev-p1-1-lc2-s0"  # seed 0's run stands for the experiment
    assert merged.loc["p1-1-lc4", "state"] == "Failed"  # one failed seed: not comparable
    assert RESAMPLES >= 1000


def test_the_report_says_when_no_interval_exists(tmp_path):
    write_phase(tmp_path, "1.1", REPEATED)
    spec = load_phase("1.1", tmp_path)
    rows, _ = experiments(**{"p1-1-lc2": mse_like(0), "p1-1-lc4": mse_like(0) * 1.2})
    why = (
        "images_per_s has no per-image values (per_image.csv has mse, psnr), so no interval exists"
    )
    ranking = rank(rows, RULE, None, why)
    phase = PhaseResults(rows, rows, None, why)
    note = " ".join(noise_note(spec, phase, ranking))
    assert f"No interval: {why}; ties are judged by the 0% tolerance alone" in note
    assert "under 2 training seeds" in note
    shown = display_table(spec, ranking.table)
    assert list(shown[DIFFERENCE]) == [
        "(the best)",
        f"{0.2 * mse_like(0).mean():+.3g} (no interval)",
    ]
