"""Budget-aware sweeps: the phase file's `budget:`, the pruning rule at a rung, and a drained phase
that prunes a clear loser at its first rung and resumes the others, on real DVC runs."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, make_project
from test_phase_runs import tiny_phases
from test_phases import VALID, aeselect, write_phase
from test_resume import TIMING

from aeselect.cluster.claims import Claim
from aeselect.cluster.rungs import RungBook
from aeselect.dvc import run_dvc
from aeselect.envvars import THREADS_ENV
from aeselect.phases.prune import judge_rung
from aeselect.phases.rung_book import RUNGS_DIR
from aeselect.sweep.spec import Budget, PhaseError, load_phase
from aeselect.sweep.status import Status

WITH_BUDGET = VALID.replace("decide:", "budget: {rungs: [0.25, 0.5]}\n    decide:")


def test_budget_is_read_with_its_defaults(tmp_path):
    write_phase(tmp_path, "1.1", WITH_BUDGET)
    budget = load_phase("1.1", tmp_path).budget
    assert (budget.rungs, budget.prune, budget.slack) == ((0.25, 0.5), True, 0.0)
    write_phase(tmp_path, "1.1", VALID)
    assert load_phase("1.1", tmp_path).budget is None


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("[0.25]", r"budget: expected a mapping"),
        ("{rungs: []}", r"budget\.rungs: expected a non-empty list"),
        ("{rungs: [0.5, 0.25]}", r"budget\.rungs: fractions must increase"),
        (
            "{rungs: [1.0]}",
            r"budget\.rungs: 1\.0 is not a fraction of train\.max_steps in \(0, 1\)",
        ),
        ("{rungs: [true]}", r"budget\.rungs: True is not a fraction"),
        ("{rungs: [0.5], prune: yes please}", r"budget\.prune: must be true or false"),
        ("{rungs: [0.5], rung: 2}", r"budget: rung: unknown key; did you mean 'rungs'\?"),
        ("{rungs: [0.5], slack: -0.1}", r"budget\.slack: must be a relative tolerance in \[0, 1\)"),
        ("{rungs: [0.5], slack: true}", r"budget\.slack: must be a relative tolerance"),
    ],
)
def test_bad_budgets_name_the_file_and_key(tmp_path, budget, message):
    write_phase(tmp_path, "1.1", VALID.replace("decide:", f"budget: {budget}\n    decide:"))
    with pytest.raises(PhaseError, match=message) as error:
        load_phase("1.1", tmp_path)
    assert "phase1_1.yaml" in str(error.value)


def test_rungs_become_log_boundaries_and_collapsing_rungs_are_refused():
    assert Budget((0.25, 0.5), True).steps(1000, 25) == (250, 500)
    assert Budget((0.3, 0.6), True).steps(100, 8) == (32, 64)  # nearest multiple of log_every
    with pytest.raises(PhaseError, match=r"budget\.rungs: \[0\.1, 0\.12\] .* steps \[8, 8\]"):
        Budget((0.1, 0.12), True).steps(80, 8)
    with pytest.raises(PhaseError, match=r"strictly between 0 and 10"):
        Budget((0.1,), True).steps(10, 5)


def per_image(mean: float, images: int = 40, seeds: int = 1, spread: float = 0.002, seed: int = 0):
    """A candidate's per-image MSE at a rung: a shared image difficulty plus its own noise."""
    rng = np.random.default_rng(seed)
    difficulty = np.random.default_rng(99).uniform(0.01, 0.03, images)
    values = difficulty[:, None] + mean + rng.normal(0, spread, (images, seeds))
    return pd.DataFrame(values, index=[f"img{i}.png" for i in range(images)])


def rule(tmp_path, direction="min", tolerance=0.05):
    body = VALID.replace("direction: min", f"direction: {direction}")
    write_phase(tmp_path, "1.1", body.replace("tolerance: 0.05", f"tolerance: {tolerance}"))
    return load_phase("1.1", tmp_path).decide


def test_a_clear_loser_is_pruned_and_a_candidate_within_the_noise_never(tmp_path):
    scores = {
        "best": per_image(0.0, seed=1),
        "noise": per_image(0.0002, seed=2),  # 1% worse on average, well inside the noise
        "loser": per_image(0.01, seed=3),  # 50% worse, far outside the noise and tolerance
    }
    standings = {
        s.experiment: s for s in judge_rung(scores, dict.fromkeys(scores, 50), rule(tmp_path), True)
    }
    assert standings["loser"].pruned and standings["loser"].low > 0
    assert not standings["noise"].pruned and not standings["best"].pruned
    assert standings["best"].delta == 0 and standings["loser"].step == 50
    # With `prune: false` the same intervals are recorded, and nothing is pruned.
    dry = judge_rung(scores, dict.fromkeys(scores, 50), rule(tmp_path), False)
    assert not any(s.pruned for s in dry)
    assert [s.high for s in dry] == [standings[s.experiment].high for s in dry]


def test_worse_by_less_than_the_tolerance_is_never_pruned_however_sure(tmp_path):
    # 3% worse on every image, no noise at all: outside the interval, inside the 5% tolerance.
    best = per_image(0.0, spread=0.0)
    scores = {"best": best, "close": best * 1.03}
    standings = judge_rung(scores, dict.fromkeys(scores, 10), rule(tmp_path), True)
    assert standings[1].low > 0 and not standings[1].pruned
    standings = judge_rung(scores, dict.fromkeys(scores, 10), rule(tmp_path, tolerance=0.01), True)
    assert standings[1].pruned


def test_slack_spares_a_late_bloomer_early_and_less_so_later(tmp_path):
    # 7% worse on every image: beyond the 5% tolerance, within it plus slack 0.04 at rung 0.25
    # (5% + 3%), beyond it again at rung 0.75 (5% + 1%).
    best = per_image(0.0, spread=0.0)
    scores = {"best": best, "wide": best * 1.07}
    budget = Budget((0.25, 0.75), True, slack=0.04)
    at = [budget.allowance(0), budget.allowance(1)]
    assert at == pytest.approx([0.03, 0.01])
    judged = [judge_rung(scores, dict.fromkeys(scores, 10), rule(tmp_path), True, a) for a in at]
    assert [standings[1].pruned for standings in judged] == [False, True]
    assert judge_rung(scores, dict.fromkeys(scores, 10), rule(tmp_path), True)[1].pruned


def test_higher_is_better_prunes_the_low_side(tmp_path):
    scores = {"high": per_image(30.0, spread=0.1), "low": per_image(25.0, spread=0.1, seed=4)}
    standings = judge_rung(scores, dict.fromkeys(scores, 10), rule(tmp_path, "max"), True)
    assert [(s.experiment, s.pruned) for s in standings] == [("high", False), ("low", True)]


def test_with_repeats_a_seed_that_undoes_the_difference_keeps_the_candidate(tmp_path):
    """Per image the candidate is worse in both seeds' mean, but one of its seeds is as good as
    the best: resampling seeds (as compare does) keeps it in the race."""
    best = per_image(0.0, seeds=2, spread=0.0005, seed=5)
    shifted = per_image(0.0, seeds=2, spread=0.0005, seed=6)
    shifted[1] += 0.004  # one seed 20% worse, the other as good as the best
    scores = {"best": best, "candidate": shifted}
    standings = judge_rung(scores, dict.fromkeys(scores, 10), rule(tmp_path), True)
    assert not standings[1].pruned and standings[1].low <= 0.001
    single = {"best": best[[0]], "candidate": shifted[[1]]}
    assert judge_rung(single, dict.fromkeys(single, 10), rule(tmp_path), True)[1].pruned


def test_a_diverged_candidate_is_pruned_without_an_interval(tmp_path):
    scores = {"ok": per_image(0.0), "nan": per_image(0.0) * np.nan}
    standings = judge_rung(scores, dict.fromkeys(scores, 10), rule(tmp_path), True)
    assert standings[0].experiment == "ok" and standings[1].pruned
    assert np.isnan(standings[1].value)


def test_a_run_that_finished_without_pausing_does_not_hold_up_the_rung(tmp_path):
    # 1.2's ds3 has 1.1's winner's params: DVC's run cache serves it whole, it never pauses.
    write_phase(tmp_path, "1.1", WITH_BUDGET)
    spec = load_phase("1.1", tmp_path)
    params = {"train.max_steps": 24, "train.log_every": 6}
    cached = Claim("p1-1-lc2", {}, status=Status.SUCCESS, params=params)
    paused = Claim("p1-1-lc4", {}, status=Status.PAUSED, params=params, rung=1)
    book = RungBook(tmp_path, spec, spec.budget)
    scores = tmp_path / RUNGS_DIR / "p1-1-lc4" / "rung_6.csv"
    scores.parent.mkdir(parents=True)
    pd.DataFrame({"path": ["a.png", "b.png"], "mse": [0.01, 0.02]}).to_csv(scores, index=False)
    standings = book.judge_ready([cached, paused])
    assert [(s.experiment, s.step, s.pruned) for s in standings] == [("lc4", 6, False)]
    assert book.runnable(paused)


BUDGETED = """\
    id: "1.1"
    title: budget
    requires: null
    selects: [train.lr, model.latent_channels]
    budget: {rungs: [0.25, 0.5]}
    experiments:
      good: {train.lr: 0.002, model.latent_channels: 2}
      close: {train.lr: 0.00201, model.latent_channels: 2}
      hot: {train.lr: 0.05, model.latent_channels: 2}  # diverges early: 5x the val MSE at step 6
      big: {train.lr: 0.002, model.latent_channels: 4}  # a 4x4x4 latent: compression 48
    decide:
      metric: mse
      direction: min
      tolerance: 0.05
      requirements: [{metric: latent.compression_ratio, min: 60}]
"""
GOOD = ["-S", "train.lr=0.002", "-S", "model.latent_channels=2"]
STEPS = {"train.max_steps": 24, "train.eval_every": 6, "train.log_every": 6}


def exp_metrics(project, name: str) -> dict:
    shown = json.loads(run_dvc(["exp", "show", "--json", "--no-fetch"], cwd=project).stdout)
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for run in experiment["revs"]:
                if run.get("name") == name:
                    return run["data"]["metrics"]["results/train/metrics.json"]["data"]
    raise AssertionError(f"no experiment {name}")


@pytest.mark.slow
def test_a_drained_phase_prunes_the_clear_loser_at_its_first_rung(tmp_path):
    project = make_project(tmp_path / "project", TINY | STEPS)
    tiny_phases(project, ("1.1", BUDGETED))
    aeselect(project, "queue", "1.1")
    drained = aeselect(project, "drain", "1.1", "-j", "2")
    log = drained.stderr
    assert re.search(r"rung: hot at step 6: .*: pruned", log), log
    assert re.search(r"rung: close at step 6: .*: goes on", log), log
    assert "p1-1-hot: pruned at step 6" in log
    big = "latent.compression_ratio 48 fails latent.compression_ratio >= 60"
    assert f"p1-1-big: excluded, untrained: {big}" in log  # known from its params: never ran

    status = aeselect(project, "status", "1.1").stdout
    assert re.search(r"p1-1-hot +pruned at step 6\n", status), status
    assert re.search(r"p1-1-good +success\n", status) and re.search(r"p1-1-close +success", status)
    assert re.search(rf"p1-1-big +excluded untrained: {big}\n", status), status
    compared = aeselect(project, "compare", "1.1").stdout
    hot = re.search(
        r"\n *\d+ +p1-1-hot +Pruned .*pruned at step 6: mse [0-9.]+, \+[0-9.]+ \[", compared
    )
    assert hot, compared
    assert re.search(r"p1-1-big +Excluded .*untrained: latent", compared), compared
    # A pruned run never became a DVC experiment, so nothing can serve it as a finished training.
    names = run_dvc(["exp", "ls", "--name-only"], cwd=project).stdout.split()
    assert sorted(names) == ["p1-1-close", "p1-1-good"]
    # The survivors, paused at steps 6 and 12 and resumed, end as a run that never paused
    # (on the thread count the drainer gave them: cores / -j).
    straight = run_dvc(
        ["exp", "run", "--temp", "-f", "-n", "straight", *GOOD],
        cwd=project,
        env={THREADS_ENV: str(max(1, len(os.sched_getaffinity(0)) // 2))},
    )
    assert "resumed" not in straight.stdout
    good, plain = exp_metrics(project, "p1-1-good"), exp_metrics(project, "straight")
    assert {k: v for k, v in good.items() if k not in TIMING} == {
        k: v for k, v in plain.items() if k not in TIMING
    }

    unpruned = aeselect(project, "drain", "1.1", "--unprune", "p1-1-hot")
    assert "p1-1-hot: success" in unpruned.stderr, unpruned.stderr
    log = (project / "hpc/logs").glob("phase1_1-*-p1-1-hot.log")
    assert "resumed at step 6" in "".join(p.read_text() for p in log)
    assert exp_metrics(project, "p1-1-hot")["step"] == STEPS["train.max_steps"]
