"""Phases: phase-file validation, the decision rule, params edits, a real two-phase chain."""

from __future__ import annotations

import json
import math
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, git

from aeselect.config import EvaluateConfig
from aeselect.demo import decision_summary
from aeselect.dvc import exp_run_command, run_dvc
from aeselect.phases.decide import rank
from aeselect.phases.promote import set_params, success_criteria
from aeselect.sweep.runs import experiment_params
from aeselect.sweep.spec import Criterion, DecisionRule, PhaseError, all_phases, load_phase

SHIPPED = ROOT / "phases"


def write_phase(directory: Path, phase_id: str, body: str) -> Path:
    path = directory / f"phase{phase_id.replace('.', '_')}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


VALID = """\
    id: "1.1"
    title: t
    requires: null
    selects: [model.latent_channels]
    experiments:
      lc2: {model.latent_channels: 2}
      lc4: {model.latent_channels: 4}
    decide: {metric: mse, direction: min, tolerance: 0.05, tie_breakers: []}
"""


def test_shipped_phases_follow_the_plan():
    phases = {spec.id: spec for spec in all_phases(SHIPPED)}
    assert [len(phases[i].experiments) for i in ("1.1", "1.2", "1.3", "1.4", "1.5")] == [
        5,
        3,
        2,
        3,
        1,
    ]
    assert [phases[i].requires for i in ("1.1", "1.2", "1.3", "1.4", "1.5")] == [
        None,
        "1.1",
        "1.2",
        "1.3",
        "1.4",
    ]
    steps = sorted(p["model.downsampling_steps"] for p in phases["1.2"].experiments.values())
    assert steps == [3, 4, 5]  # 512px -> 64, 32, 16
    assert phases["1.1"].experiment_name("lc8-bc16") == "p1-1-lc8-bc16"
    assert {p["model.variational"] for p in phases["1.3"].experiments.values()} == {True, False}


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "lc4: {model.latent_channels: 4}",
            "lc4: {model.latent_chanels: 4}",
            r"experiments\.lc4: 'model\.latent_chanels' is not a params\.yaml key",
        ),
        (
            "lc4: {model.latent_channels: 4}",
            "lc4: {train.lr: 0.1}",
            r"experiments\.lc4: does not set 'model\.latent_channels', which this phase selects",
        ),
        (
            "selects: [model.latent_channels]",
            "selects: [model.width]",
            r"selects 'model\.width', which is not a params\.yaml key",
        ),
        ("lc4:", "LC_4:", r"experiments\.LC_4: names use a-z"),
        (
            "lc4: {model.latent_channels: 4}",
            "lc4: {model.latent_channels: 0}",
            r"experiments\.lc4: model\.latent_channels: must be >= 1",
        ),
        ('id: "1.1"', 'id: "1.2"', r"id is '1\.2' but the file name says 1\.1"),
        ("direction: min", "direction: down", r"decide\.direction: must be min or max"),
        (
            "tolerance: 0.05",
            "tolerence: 0.05",
            r"decide: tolerence: unknown key; did you mean 'tolerance'\?",
        ),
        (
            "metric: mse",
            "metric: mes",
            r"decide\.metric: mes: unknown metric of the train/evaluate stages; did you mean 'mse'",
        ),
        (
            "tie_breakers: []",
            "tie_breakers: [{metric: cost.param, direction: min}]",
            r"decide\.tie_breakers\[0\]\.metric: cost\.param: unknown metric.*'cost\.params'",
        ),
        (
            "tie_breakers: []",
            "tie_breakers: [{metric: cost.params, direction: min, weight: 2}]",
            r"decide\.tie_breakers\[0\]: weight: unknown key",
        ),
        (
            "lc4: {model.latent_channels: 4}",
            "lc2: {model.latent_channels: 4}",
            r"experiments\.lc2: given twice, at lines 6 and 7",
        ),
        (
            "requires: null",
            'requires: "1.0"',
            r"requires: phase 1\.0 has no file .*phase1_0\.yaml \(phase files here: phase1_1\)",
        ),
        ("requires: null", 'requires: "1.1"', r"requires: a phase cannot require itself"),
        ("metric: mse, ", "", r"decide: missing key .metric."),
        (
            "lc4: {model.latent_channels: 4}",
            "lc4: {model.latent_channels: 4, train.lr: 0.01}",
            r"experiments\.lc4: sets 'train\.lr', which this phase does not select",
        ),
        ("title: t", "title: t\n    repeat: 3", r"phase1_1.yaml: repeat: unknown key"),
    ],
)
def test_phase_file_errors_name_the_file_and_key(tmp_path, old, new, message):
    path = write_phase(tmp_path, "1.1", VALID.replace(old, new))
    with pytest.raises(PhaseError, match=message) as err:
        load_phase("1.1", tmp_path)
    assert str(path) in str(err.value)


def test_missing_phase_file_lists_the_known_ones(tmp_path):
    write_phase(tmp_path, "1.1", VALID)
    with pytest.raises(PhaseError, match=r"no such phase file \(phase files here: phase1_1\)"):
        load_phase("1.7", tmp_path)


def test_extra_sets_apply_to_every_experiment_but_never_override_one(tmp_path):
    write_phase(tmp_path, "1.1", VALID)
    spec = load_phase("1.1", tmp_path)
    lc2 = spec.runs()[0]
    assert experiment_params(spec, lc2, {"train.max_steps": 9}) == {
        "model.latent_channels": 2,
        "train.max_steps": 9,
    }
    with pytest.raises(PhaseError, match="run 'p1-1-lc2' sets this itself"):
        experiment_params(spec, lc2, {"model.latent_channels": 8})
    sets = {"model.variational": True, "loss.kl_weight": 0.001}
    assert exp_run_command("p1-1-lc2", sets, queue=True) == [
        "exp",
        "run",
        "--queue",
        "-n",
        "p1-1-lc2",
        "-S",
        "model.variational=true",
        "-S",
        "loss.kl_weight=0.001",
    ]


def test_repeats_run_each_experiment_under_its_own_training_seeds(tmp_path):
    write_phase(tmp_path, "1.1", VALID.replace("selects:", "repeats: 3\n    selects:"))
    spec = load_phase("1.1", tmp_path)
    runs = spec.runs()
    assert [r.name for r in runs[:3]] == ["p1-1-lc2-s0", "p1-1-lc2-s1", "p1-1-lc2-s2"]
    assert [(r.key, r.repeat, r.params["train.seed"]) for r in runs[3:]] == [
        ("lc4", 0, 0),
        ("lc4", 1, 1),
        ("lc4", 2, 2),
    ]
    assert spec.names()["p1-1-lc4-s2"] == "lc4"
    assert experiment_params(spec, runs[4], {"train.max_steps": 9}) == {
        "model.latent_channels": 4,
        "train.seed": 1,
        "train.max_steps": 9,
    }
    with pytest.raises(PhaseError, match="run 'p1-1-lc2-s0' sets this itself"):
        experiment_params(spec, runs[0], {"train.seed": 5})
    # Without repeats the names and params are the experiment's own.
    write_phase(tmp_path, "1.1", VALID)
    assert [r.name for r in load_phase("1.1", tmp_path).runs()] == ["p1-1-lc2", "p1-1-lc4"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            VALID.replace("selects:", "repeats: 0\n    selects:"),
            r"repeats must be a whole number >= 1",
        ),
        (
            VALID.replace("selects:", "repeats: two\n    selects:"),
            r"repeats must be a whole number",
        ),
        (
            VALID.replace("selects:", "repeats: 2\n    selects:").replace(
                "lc4: {model.latent_channels: 4}", "lc4: {model.latent_channels: 4, train.seed: 3}"
            ),
            r"experiments\.lc4: sets 'train\.seed', which `repeats: 2` sets for each run",
        ),
    ],
)
def test_bad_repeats_name_the_file_and_key(tmp_path, body, message):
    path = write_phase(tmp_path, "1.1", body)
    with pytest.raises(PhaseError, match=message) as err:
        load_phase("1.1", tmp_path)
    assert str(path) in str(err.value)


def results(**rows) -> pd.DataFrame:
    return pd.DataFrame(
        [{"experiment": name, "state": "Success", **values} for name, values in rows.items()]
    )


RULE = DecisionRule(
    primary=Criterion("mse", "min"),
    tolerance=0.05,
    tie_breakers=(Criterion("cost.params", "min"), Criterion("images_per_s", "max")),
)


def test_rule_breaks_ties_within_tolerance_by_secondary_metrics():
    frame = results(
        big={"mse": 0.0100, "cost.params": 900, "images_per_s": 10.0},
        small={"mse": 0.0104, "cost.params": 100, "images_per_s": 30.0},  # within 5%: tied
        small_slow={"mse": 0.0102, "cost.params": 100, "images_per_s": 20.0},
        tiny={"mse": 0.0200, "cost.params": 10, "images_per_s": 99.0},  # fewest params, far worse
        failed_exp={"mse": 0.0001, "cost.params": 1, "images_per_s": 1.0},
    )
    frame.loc[frame["experiment"] == "failed_exp", "state"] = "Failed"
    ranking = rank(frame, RULE)
    assert list(ranking.table["experiment"]) == ["small", "small_slow", "big", "tiny"]
    assert ranking.winner == "small"
    assert list(ranking.table["tied"]) == [True, True, True, False]
    assert ranking.verdict == "tie-break"
    assert "no candidate is better than the tolerance among 3 of 4" in ranking.reason


def test_rule_without_ties_takes_the_best_and_orders_the_rest_by_the_metric():
    frame = results(
        a={"mse": 0.3, "cost.params": 1, "images_per_s": 1.0},
        b={"mse": 0.1, "cost.params": 9, "images_per_s": 1.0},
        c={"mse": 0.2, "cost.params": 5, "images_per_s": 1.0},
    )
    assert list(rank(frame, RULE).table["experiment"]) == ["b", "c", "a"]


def test_rule_on_a_param_and_missing_values():
    rule = DecisionRule(
        Criterion("mse", "min"), 0.1, (Criterion("model.variational", "min", "param"),)
    )
    frame = results(
        vae={"mse": 0.100, "params.model.variational": True},
        ae={"mse": 0.105, "params.model.variational": False},
        nan={"mse": math.nan, "params.model.variational": False},
    )
    assert list(rank(frame, rule).table["experiment"]) == ["ae", "vae", "nan"]


def test_set_params_changes_only_the_selected_lines():
    original = (ROOT / "params.yaml").read_text()
    changed = set_params(original, {"model.latent_channels": 16, "loss.kl_weight": 0.001})
    old_lines, new_lines = original.splitlines(), changed.splitlines()
    assert len(old_lines) == len(new_lines)
    differing = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in differing] == [
        "latent_channels: 16",
        "kl_weight: 0.001",
    ]
    assert set_params(original, {}) == original
    assert yaml.safe_load(changed)["model"]["latent_channels"] == 16


def test_final_success_criteria_are_the_gates_that_evaluate_wrote():
    # The winner's row as compare reads it: mse exactly at its bound (inclusive: passed), no
    # stability result at all (NaN: not met), numpy and Python booleans mixed.
    row = pd.Series(
        {
            "mse": 0.01,
            "gates.pass_mse": np.True_,
            "psnr": 29.0,
            "gates.pass_psnr": False,
            "latent.compression_ratio": 48.0,
            "gates.pass_latent_size": True,
            "gates.pass_stability": math.nan,
        }
    )
    criteria = success_criteria(EvaluateConfig(max_mse=0.01, min_psnr=30.0), row)
    assert criteria["mse"] == {"target": "mse <= 0.01", "values": {"mse": 0.01}, "met": True}
    assert criteria["psnr"] == {"target": "psnr >= 30", "values": {"psnr": 29.0}, "met": False}
    assert criteria["latent_size"]["met"] is True
    assert criteria["stability"] == {
        "target": "stability.nonfinite_count <= 0, stability.max_spike_ratio <= 3",
        "values": {"stability.nonfinite_count": None, "stability.max_spike_ratio": None},
        "met": False,
    }
    yaml.safe_dump(criteria)  # plain values only: it goes into final.yaml


# ---- end to end: real `dvc exp run --queue`, real queue workers, real Git commits ----------


def aeselect(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["python", "-m", "aeselect", "phase", *args, "--repo", str(repo)],
        capture_output=True,
        text=True,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"aeselect phase {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        )
    return result


CHAIN_1_1 = VALID
CHAIN_1_2 = """\
    id: "1.2"
    title: second
    requires: "1.1"
    selects: [loss.aux_weight, data.source]
    experiments:
      aux0: {loss.aux_weight: 0.0, data.source: synthetic}
      aux5: {loss.aux_weight: 0.5, data.source: synthetic}
      broken: {loss.aux_weight: 0.2, data.source: folder}  # data/raw/images does not exist
    decide:
      metric: mse
      direction: min
      tolerance: 0.0
      tie_breakers: [{metric: aux_pixel_acc, direction: max}]
"""


@pytest.mark.slow
def test_two_phases_chain_through_queue_run_compare_promote(project):
    for path in (project / "phases").glob("phase*.yaml"):
        path.unlink()
    write_phase(project / "phases", "1.1", CHAIN_1_1)
    write_phase(project / "phases", "1.2", CHAIN_1_2)
    # Neither candidate's value: promoting either one must change params.yaml.
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("latent_channels: 4", "latent_channels: 8", 1))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "tiny phases")

    # 1.2 needs 1.1's decision first.
    refused = aeselect(project, "queue", "1.2", check=False)
    assert refused.returncode == 2
    assert "requires phase 1.1's decision" in refused.stderr

    # A dirty params.yaml would be snapshotted silently: refused unless --allow-dirty.
    clean = params.read_text()
    params.write_text(clean.replace("seed: 0", "seed: 1"))
    refused = aeselect(project, "queue", "1.1", check=False)
    assert refused.returncode == 2 and "params.yaml" in refused.stderr
    params.write_text(clean)

    dry = aeselect(project, "queue", "1.1", "--dry-run").stdout
    assert "dvc exp run --queue -n p1-1-lc2 -S model.latent_channels=2" in dry
    aeselect(project, "queue", "1.1")
    again = aeselect(project, "queue", "1.1").stdout
    assert "p1-1-lc2: already queued" in again  # never clobbers an existing name
    # exp show lists queued experiments like finished ones; promotion must not be fooled.
    early = aeselect(project, "promote", "1.1", check=False)
    assert early.returncode == 2 and "p1-1-lc2 (queued)" in early.stderr

    run = aeselect(project, "run", "1.1", "-j", "2")
    assert "p1-1-lc4: success" in run.stdout
    status = aeselect(project, "status", "1.1").stdout
    assert status.count("success") == 2

    compared = aeselect(project, "compare", "1.1").stdout
    assert "verdict: " in compared and "Δ vs best [95% CI]" in compared
    report = project / "phases" / "reports" / "1.1"
    pictures = {"reconstructions.png", "zoom.png", "val_mse.png", "val_psnr.png", "pareto.png"}
    assert {"metrics.csv", "val_curves.csv", "report.md", *pictures} <= {
        p.name for p in report.iterdir()
    }
    markdown = (report / "report.md").read_text()
    assert all(f"({name})" in markdown for name in pictures)  # every picture is on the page
    assert "p1-1-lc2" in markdown and "## Verdict: " in markdown
    curves = pd.read_csv(report / "val_curves.csv")
    assert set(curves["experiment"]) == {"p1-1-lc2", "p1-1-lc4"}
    assert {"mse", "psnr"} <= set(curves["metric"])
    assert set(pd.read_csv(report / "metrics.csv")["experiment"]) == {"p1-1-lc2", "p1-1-lc4"}

    before = git(project, "rev-parse", "HEAD").strip()
    promoted = aeselect(project, "promote", "1.1").stdout
    decision = yaml.safe_load((project / "phases" / "decisions" / "1.1.yaml").read_text())
    winner_lc = decision["selected"]["model.latent_channels"]
    assert decision["winner"] == f"p1-1-lc{winner_lc}"
    assert decision["baseline_commit"] == before
    assert {c["experiment"] for c in decision["candidates"]} == {"p1-1-lc2", "p1-1-lc4"}
    message = git(project, "log", "-1", "--format=%s").strip()
    assert message.startswith(f"phase 1.1: latent_channels={winner_lc} (mse ")
    assert message in promoted
    changed = git(project, "diff", "--name-only", "HEAD~1", "HEAD").split()
    assert sorted(changed) == ["params.yaml", "phases/decisions/1.1.yaml"]
    assert yaml.safe_load(params.read_text())["model"]["latent_channels"] == winner_lc
    assert not git(project, "status", "--porcelain", "--", "params.yaml")

    # 1.2 runs on top of the promoted value; one experiment fails, the others still finish.
    run = aeselect(project, "run", "1.2", "-j", "2", check=False)
    assert run.returncode == 1
    status = aeselect(project, "status", "1.2", check=False)
    assert status.returncode == 1
    failed_line = next(line for line in status.stdout.splitlines() if "p1-2-broken" in line)
    assert "failed" in failed_line and "log: hpc/logs/phase1_2-local" in failed_line
    log = project / failed_line.split("log: ")[1].strip()
    assert "data/raw/images does not exist" in log.read_text()

    aeselect(project, "compare", "1.2")
    compared = pd.read_csv(project / "phases" / "reports" / "1.2" / "metrics.csv")
    assert set(compared["params.model.latent_channels"]) == {winner_lc}

    refused = aeselect(project, "promote", "1.2", check=False)
    assert refused.returncode == 2 and "p1-2-broken (failed)" in refused.stderr
    assert git(project, "log", "-1", "--format=%s").strip() == message  # nothing committed

    params.write_text(clean.replace("seed: 0", "seed: 7"))
    refused = aeselect(project, "promote", "1.2", "--pick", "p1-2-aux5", "--why", "x", check=False)
    assert "params.yaml has uncommitted changes" in refused.stderr
    assert "seed: 7" in params.read_text()  # the user's edit is still there
    git(project, "checkout", "--", "params.yaml")

    aeselect(project, "promote", "1.2", "--pick", "p1-2-aux5", "--why", "keeps the layout")
    decision = yaml.safe_load((project / "phases" / "decisions" / "1.2.yaml").read_text())
    assert decision["override"]["picked"] == "p1-2-aux5"
    assert decision["override"]["why"] == "keeps the layout"
    assert yaml.safe_load(params.read_text())["loss"]["aux_weight"] == 0.5
    final = yaml.safe_load((project / "phases" / "decisions" / "final.yaml").read_text())
    assert final["latent_shape_hwc_at_512"] == f"64x64x{winner_lc}"
    assert final["checkpoint"]["rev"] == decision["experiment_rev"]
    assert set(final["success_criteria"]) == {"mse", "psnr", "latent_size", "stability"}
    assert final["success_criteria_met"] is decision["metrics"]["gates.pass_all"]
    assert "psnr_pooled" in final["metrics"]
    shown = aeselect(project, "show").stdout
    assert "Phase 1 is complete" in shown


REPEATED = """\
    id: "1.1"
    title: seeds
    requires: null
    selects: [model.latent_channels]
    repeats: 2
    experiments:
      lc2: {model.latent_channels: 2}
      lc4: {model.latent_channels: 4}
    decide:
      metric: mse
      direction: min
      tolerance: 0.0
      tie_breakers: [{metric: cost.params, direction: min}]
"""


@pytest.mark.slow
def test_repeats_vary_training_only_and_the_report_shows_intervals(project):
    for path in (project / "phases").glob("phase*.yaml"):
        path.unlink()
    write_phase(project / "phases", "1.1", REPEATED)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "repeated phase")
    aeselect(project, "run", "1.1", "-j", "2")

    # The training seed changes the training, not the data: every run trained on the same
    # data/prepared (one content hash in DVC's records), and the two seeds' metrics differ.
    runs = {}
    for baseline in json.loads(run_dvc(["exp", "show", "--json"], cwd=project).stdout):
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            runs[exp["name"]] = data
    assert set(runs) == {"p1-1-lc2-s0", "p1-1-lc2-s1", "p1-1-lc4-s0", "p1-1-lc4-s1"}
    assert len({d["deps"]["data/prepared"]["hash"] for d in runs.values()}) == 1
    seeds = {n: d["params"]["params.yaml"]["data"]["train"]["seed"] for n, d in runs.items()}
    assert seeds == {"p1-1-lc2-s0": 0, "p1-1-lc2-s1": 1, "p1-1-lc4-s0": 0, "p1-1-lc4-s1": 1}

    def mse(name: str) -> float:
        return runs[name]["metrics"]["results/evaluate/metrics.json"]["data"]["mse"]

    assert mse("p1-1-lc2-s0") != mse("p1-1-lc2-s1")

    compared = aeselect(project, "compare", "1.1").stdout
    assert "Δ vs best [95% CI]" in compared and "verdict: " in compared
    report = project / "phases" / "reports" / "1.1"
    markdown = (report / "report.md").read_text()
    print(markdown.split("## Reconstructions")[0])  # the excerpt the issue asks for (-s)
    assert "| Δ vs best [95% CI]" in markdown and "mse.seed_std" in markdown
    assert "## Verdict: " in markdown and "paired bootstrap over those images" in markdown
    assert "under 2 training seeds" in markdown
    table = pd.read_csv(report / "metrics.csv").set_index("experiment")
    assert list(table.index) in (["p1-1-lc2", "p1-1-lc4"], ["p1-1-lc4", "p1-1-lc2"])
    assert table.loc["p1-1-lc2", "mse"] == pytest.approx(
        (mse("p1-1-lc2-s0") + mse("p1-1-lc2-s1")) / 2
    )
    loser = table[table["vs_best"] != "best"].iloc[0]  # the winner of a tie-break may not be it
    assert loser["delta_low"] <= loser["delta"] <= loser["delta_high"]
    assert f"[{loser['delta_low']:+.3g}, {loser['delta_high']:+.3g}]" in markdown
    assert len(pd.read_csv(report / "runs.csv")) == 4

    aeselect(project, "promote", "1.1")
    decision = yaml.safe_load((project / "phases" / "decisions" / "1.1.yaml").read_text())
    assert decision["verdict"] in ("clear", "tie-break")
    assert decision["noise"]["training_seeds"] == 2 and decision["noise"]["resamples"] >= 1000
    for candidate in decision["candidates"]:
        assert set(candidate["runs"]) == {
            f"{candidate['experiment']}-s0",
            f"{candidate['experiment']}-s1",
        }
        low, high = candidate["interval_95"]
        assert low <= candidate["difference_from_best"] <= high
    assert (
        decision["experiment_rev"] == decision["candidates"][0]["runs"][f"{decision['winner']}-s0"]
    )
    assert decision["verdict"] in git(project, "log", "-1", "--format=%s")
    expected = "clearly better" if decision["verdict"] == "clear" else "better than the noise"
    assert expected in decision["rationale"]
    # `make run`'s closing summary carries each decision's intervals
    line = decision_summary(decision)
    assert line.startswith(f"1.1 {decision['winner']} ({decision['verdict']}); mse vs best: ")
    assert f"{loser.name} {loser['delta']:+.3g} " in line
    assert f"[{loser['delta_low']:+.3g}, {loser['delta_high']:+.3g}] ({loser['vs_best']})" in line


def test_decision_summary_of_a_one_run_phase_names_the_winner_and_verdict_only():
    decision = {
        "phase": "1.5",
        "winner": "p1-5-final",
        "verdict": "single",
        "rule": {"metric": "mse"},
        "candidates": [
            {"experiment": "p1-5-final", "versus_best": "best", "difference_from_best": 0.0}
        ],
    }
    assert decision_summary(decision) == "1.5 p1-5-final (single)"
