"""Requirements in the decision rule: a candidate failing one is excluded (shown with the value
and the bound), every candidate excluded means no winner, and the phase file is validated."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import ROOT, TINY, git, make_project
from PIL import Image
from test_phase_runs import decision, tiny_phases
from test_phases import VALID, aeselect, write_phase

from aeselect.config import load_config
from aeselect.phases.decide import rank, requirement_failures, row_params
from aeselect.scoring.layout import GRID_PADDING
from aeselect.sweep.spec import PhaseError, all_phases, load_phase

GATED = VALID.replace("tie_breakers: []}", "tie_breakers: [], requirements: [{gate: latent_size}]}")


def rule(tmp_path, body=GATED):
    write_phase(tmp_path, "1.1", body)
    return load_phase("1.1", tmp_path).decide


def candidates(**rows: dict) -> pd.DataFrame:
    """Successful candidates at 64 px, 3 downsamplings: an 8x8 latent, compression 192 / C."""
    return pd.DataFrame(
        [
            {
                "experiment": name,
                "key": name,
                "state": "Success",
                "params.data.image_size": 64,
                "params.model.downsampling_steps": 3,
                "params.evaluate.min_compression_ratio": 24.0,
                "latent.compression_ratio": 192 / row["params.model.latent_channels"],
                **row,
            }
            for name, row in rows.items()
        ]
    )


def test_a_candidate_failing_the_latent_size_gate_is_excluded_with_value_and_bound(tmp_path):
    frame = candidates(
        lc16={"mse": 0.010, "params.model.latent_channels": 16},  # best mse, 12 < 24
        lc8={"mse": 0.013, "params.model.latent_channels": 8},
        lc4={"mse": 0.020, "params.model.latent_channels": 4},
    )
    ranking = rank(frame, rule(tmp_path))
    assert ranking.winner == "lc8" and ranking.best == "lc8" and ranking.verdict == "clear"
    assert list(ranking.table["experiment"]) == ["lc8", "lc4", "lc16"]
    lc16 = ranking.table.set_index("experiment").loc["lc16"]
    message = "latent.compression_ratio 12 fails latent.compression_ratio >= 24 (gate latent_size)"
    assert lc16["excluded"] == message and lc16["vs_best"] == "excluded" and not lc16["tied"]
    assert lc16["delta"] == pytest.approx(-0.003)  # better by mse, and still out
    assert f"Excluded: lc16 ({message})" in ranking.reason


def test_candidates_that_left_a_budget_sweep_early_say_how(tmp_path):
    frame = candidates(
        lc8={"mse": 0.013, "params.model.latent_channels": 8},
        lc4={"mse": float("nan"), "params.model.latent_channels": 4},
        lc16={"mse": float("nan"), "params.model.latent_channels": 16},
    )
    frame.loc[1, ["state", "left"]] = ("Pruned", "pruned at step 50: mse 0.02")
    frame.loc[2, ["state", "left"]] = ("Excluded", "untrained: latent.compression_ratio 12 fails")
    table = rank(frame, rule(tmp_path)).table.set_index("experiment")
    assert list(table["vs_best"]) == ["best", "pruned", "excluded"]
    assert table.loc["lc4", "excluded"] == "pruned at step 50: mse 0.02"


def test_the_bound_is_the_candidates_own_params_not_a_copy(tmp_path):
    frame = candidates(lc16={"mse": 0.01, "params.model.latent_channels": 16})
    frame["params.evaluate.min_compression_ratio"] = 12.0
    assert rank(frame, rule(tmp_path)).winner == "lc16"


def test_every_candidate_excluded_gives_no_winner_and_names_the_closest(tmp_path):
    frame = candidates(
        lc32={"mse": 0.01, "params.model.latent_channels": 32},  # 6: 75% short
        lc16={"mse": 0.02, "params.model.latent_channels": 16},  # 12: 50% short
    )
    ranking = rank(frame, rule(tmp_path))
    assert (ranking.winner, ranking.verdict) == ("", "excluded")
    assert list(ranking.table["experiment"]) == ["lc16", "lc32"]
    assert ranking.reason.startswith(
        "every candidate fails a requirement (gate latent_size); the closest is lc16: "
        "latent.compression_ratio 12 fails"
    )


def test_a_metric_requirement_and_params_only_failures(tmp_path):
    body = VALID.replace(
        "tie_breakers: []}",
        "tie_breakers: [], requirements: [{metric: psnr, min: 20}, {gate: latent_size}]}",
    )
    decide = rule(tmp_path, body)
    row = candidates(lc16={"mse": 0.01, "psnr": 19.5, "params.model.latent_channels": 16})
    row = row.iloc[0]
    assert [w for w, _ in requirement_failures(decide, row_params(row), row)] == [
        "psnr 19.5 fails psnr >= 20",
        "latent.compression_ratio 12 fails latent.compression_ratio >= 24 (gate latent_size)",
    ]
    # Before training only the size is known, from the params (a flat dict, as a claim has).
    flat = {"data.image_size": 64, "model.downsampling_steps": 3, "model.latent_channels": 16}
    assert len(requirement_failures(decide, flat)) == 1
    flat["model.latent_channels"] = 8
    assert requirement_failures(decide, flat) == []


@pytest.mark.parametrize(
    ("requirements", "message"),
    [
        ("[{gate: size}]", r"requirements\[0\]\.gate: size: unknown gate"),
        ("[{metric: msee, max: 0.1}]", r"requirements\[0\]\.metric: msee: unknown metric.*'mse'"),
        ("[{metric: mse, min: 0, max: 1}]", r"requirements\[0\]: give a metric with exactly one"),
        ("[{metric: mse}]", r"requirements\[0\]: give a metric with exactly one of min: or max:"),
        ("[{metric: mse, max: low}]", r"requirements\[0\]\.max: must be a number, got 'low'"),
        ("[{metric: mse, max: true}]", r"requirements\[0\]\.max: must be a number, got True"),
        ("[{metric: mse, max: .nan}]", r"requirements\[0\]\.max: must be a number, got nan"),
        ("[{metric: latent.shape, min: 2}]", r"\.metric: latent\.shape is text, not a number"),
        ("[{gate: latent_size, min: 3}]", r"requirements\[0\]: a gate takes its bounds"),
        ("[{metric: mse, maxx: 1}]", r"requirements\[0\]: maxx: unknown key; did you mean 'max'"),
        ("{gate: latent_size}", r"decide\.requirements: expected a list"),
    ],
)
def test_bad_requirements_name_the_file_and_key(tmp_path, requirements, message):
    body = VALID.replace("tie_breakers: []}", f"tie_breakers: [], requirements: {requirements}}}")
    with pytest.raises(PhaseError, match=message) as error:
        rule(tmp_path, body)
    assert "phase1_1.yaml: decide" in str(error.value)


@pytest.mark.slow
def test_on_real_runs_exclusion_refusal_and_a_recorded_override(tmp_path):
    project = make_project(tmp_path / "project", TINY)
    # 32 px, 3 downsamplings: a 4x4 latent, compression 96 for lc2 and 48 for lc4.
    strict = VALID.replace(
        "tie_breakers: []}",
        "tie_breakers: [], requirements: [{metric: latent.compression_ratio, min: 100}]}",
    )
    tiny_phases(project, ("1.1", strict))
    aeselect(project, "run", "1.1", "-j", "2")
    refused = aeselect(project, "promote", "1.1", check=False)
    assert refused.returncode == 2, refused.stderr
    assert "no candidate may be promoted: every candidate fails a requirement" in refused.stderr
    assert "the closest is p1-1-lc2: latent.compression_ratio 96 fails" in refused.stderr
    compared = aeselect(project, "compare", "1.1").stdout
    assert "verdict: excluded (no winner" in compared
    report = (project / "phases/reports/1.1/report.md").read_text()
    assert (
        "Requirements (a candidate failing one is excluded): latent.compression_ratio min 100"
        in report
    )

    picked = aeselect(project, "promote", "1.1", "--pick", "p1-1-lc2", "--why", "closest")
    assert "p1-1-lc2" in picked.stdout
    override = decision(project, "1.1")["override"]
    assert override["rule_winner"] is None and override["why"] == "closest"
    assert override["fails_requirements"].startswith("latent.compression_ratio 96 fails")
    git(project, "revert", "--no-edit", "HEAD")

    # A bound between the two: lc4 (48) is out though its MSE may be the best; lc2 wins.
    tiny_phases(project, ("1.1", strict.replace("min: 100", "min: 60")))
    aeselect(project, "promote", "1.1")
    decided = decision(project, "1.1")
    assert decided["winner"] == "p1-1-lc2" and decided["override"] is None
    lc4 = next(c for c in decided["candidates"] if c["experiment"] == "p1-1-lc4")
    assert lc4["excluded"] == "latent.compression_ratio 48 fails latent.compression_ratio >= 60"
    assert lc4["versus_best"] == "excluded"
    assert decided["rule"]["requirements"] == ["latent.compression_ratio min 60"]
    # probe.loss has its paired interval from the lower of the two, in the decision and table.
    versus = {c["experiment"]: c["probe.loss_vs_lowest"] for c in decided["candidates"]}
    lowest = min(versus, key=lambda name: versus[name]["difference"])
    assert versus[lowest] == {"difference": 0.0, "interval_95": [0.0, 0.0]}
    other = versus[({"p1-1-lc2", "p1-1-lc4"} - {lowest}).pop()]
    low, high = other["interval_95"]
    assert low <= other["difference"] <= high and high > 0
    compared = aeselect(project, "compare", "1.1").stdout
    assert "probe.loss Δ vs lowest [95% CI]" in compared and "(the lowest)" in compared
    # Both Pareto views, the excluded candidate marked; the probe's samples, one row each.
    report = project / "phases/reports/1.1"
    for view in ("pareto", "tradeoff"):
        chart = (report / f"{view}.vl.json").read_text()
        assert '"p1-1-lc4 (excluded)"' in chart
        # Vega-Lite reads a dot in a field name as a nested field: the chart would plot nothing.
        fields = [json.loads(chart)["encoding"][axis]["field"] for axis in ("x", "y")]
        assert not any("." in field for field in fields), fields
    row = TINY["data.image_size"] + 2 * GRID_PADDING  # one make_grid row of decoded samples
    assert Image.open(report / "probe_samples.png").height == 2 * row
    assert "![reconstruction vs diffusability](tradeoff.png)" in (report / "report.md").read_text()


def test_the_shipped_channel_and_resolution_sweeps_require_the_latent_size_gate():
    phases = {spec.id: spec for spec in all_phases(ROOT / "phases")}
    assert [r.gate for r in phases["1.1"].decide.requirements] == ["latent_size"]
    assert [r.gate for r in phases["1.2"].decide.requirements] == ["latent_size"]
    # At params.yaml's image size the widest 1.1 latent is out before it trains, by its params.
    base = load_config(ROOT / "params.yaml").flat()
    failing = {
        key
        for key, params in phases["1.1"].experiments.items()
        if requirement_failures(phases["1.1"].decide, base | params)
    }
    assert failing == {"lc16-bc16"}
