"""`phase compare`: a phase's experiments side by side, ranked, written to phases/reports/<id>/."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from aeselect import paths
from aeselect.dvc import read_output, read_output_dir
from aeselect.phases.decide import (
    VERDICTS,
    Ranking,
    column,
    describe_difference,
    describe_versus_lowest,
    rank,
)
from aeselect.phases.noise import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    RESAMPLES,
    SECONDARY_PER_IMAGE,
    PhaseResults,
    gather,
    seed_spread_column,
)
from aeselect.phases.promote import HEADLINE, read_decision
from aeselect.scoring.layout import GRID_PADDING, grid_column, tile_box
from aeselect.sweep.spec import REPEAT_SEED_KEY, REPORTS_DIR, PhaseSpec
from aeselect.sweep.status import Status

RECONSTRUCTIONS = paths.RECONSTRUCTIONS.as_posix()
PROBE_SAMPLES = paths.PROBE_SAMPLES.as_posix()
VAL_CURVES_DIR = paths.VAL_CURVES_DIR.as_posix()
DIFFERENCE = "Δ vs best [95% CI]"
VERSUS_LOWEST = "Δ vs lowest [95% CI]"  # after a secondary metric's name: probe.loss Δ vs ...


@dataclass
class Comparison:
    phase: PhaseResults
    ranking: Ranking | None
    report_dir: Path


def val_curves(repo: Path, done: pd.DataFrame) -> pd.DataFrame:
    """Per-evaluation val metrics of every experiment (dvclive's TSVs read at each exp's rev)."""
    frames = []
    for _, row in done.iterrows():
        for tsv in read_output_dir(repo, VAL_CURVES_DIR, row["rev"]).values():
            frame = pd.read_csv(io.BytesIO(tsv), sep="\t")
            metric = frame.columns[-1]
            frames.append(
                frame.rename(columns={metric: "value"}).assign(
                    experiment=row["experiment"], metric=metric
                )
            )
    if not frames:
        return pd.DataFrame(columns=["experiment", "metric", "step", "value"])
    return pd.concat(frames)[["experiment", "metric", "step", "value"]]


def side_by_side(repo: Path, done: pd.DataFrame, image_size: int) -> Image.Image | None:
    """Originals, then each experiment's reconstructions of the same val images, one column each
    (every column is a tile with GRID_PADDING on both sides)."""
    columns: list[Image.Image] = []
    for i, (_, row) in enumerate(done.iterrows()):
        grid = Image.open(io.BytesIO(read_output(repo, RECONSTRUCTIONS, row["rev"]))).convert("RGB")
        columns += [grid_column(grid, col, image_size) for col in ([0, 1] if i == 0 else [1])]
    if not columns:
        return None
    out = Image.new("RGB", (sum(c.width for c in columns), max(c.height for c in columns)), "white")
    x = 0
    for c in columns:
        out.paste(c, (x, 0))
        x += c.width
    return out


def probe_samples(repo: Path, done: pd.DataFrame) -> Image.Image | None:
    """Each experiment's decoded probe samples (one row of the same seeded draws), one row per
    experiment in the reconstructions' column order: what its latent gives a denoiser to learn."""
    rows = [
        Image.open(io.BytesIO(read_output(repo, PROBE_SAMPLES, rev))).convert("RGB")
        for rev in done["rev"]
    ]
    if not rows:
        return None
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height
    return out


def _label(row: pd.Series) -> str:
    """A chart point's name: the experiment, marked when a requirement excludes it."""
    excluded = row.get("vs_best") == "excluded"
    return f"{row['experiment']} (excluded)" if excluded else str(row["experiment"])


def render_chart(
    datapoints: list[dict], template: str, x: str, y: str, title: str, out: Path
) -> None:
    """A DVC plot template filled by dvc-render, rendered to PNG with no browser or network.

    The HTML of `dvc plots diff` loads Vega from a CDN and stays blank offline (GPU clusters);
    vl-convert bundles the Vega-Lite engine, so the report's charts are plain images.
    """
    import vl_convert
    from dvc_render.vega import VegaRenderer

    spec = VegaRenderer(datapoints, out.stem, template=template, x=x, y=y, title=title)
    filled = json.dumps(spec.get_filled_template())
    out.with_suffix(".vl.json").write_text(filled)
    out.write_bytes(vl_convert.vegalite_to_png(filled, scale=2))


def charts(table: pd.DataFrame, curves: pd.DataFrame, report_dir: Path) -> None:
    """Val curves overlaid, and the two Pareto views: quality against latent size, and
    reconstruction against the probe's diffusability (excluded candidates marked)."""
    for metric, title in (("mse", "val MSE (lower is better)"), ("psnr", "val PSNR, dB")):
        rows = curves[curves["metric"] == metric]
        points = [
            {"rev": r.experiment, "step": int(r.step), metric: float(r.value)}
            for r in rows.itertuples()
        ]
        if points:
            render_chart(points, "linear", "step", metric, title, report_dir / f"val_{metric}.png")
    views = [
        ("latent.elements_per_image", "latent elements per image", "psnr", "PSNR dB", "pareto"),
        (
            "probe.loss",
            "probe loss (easier to diffuse: left)",
            "psnr_pooled",
            "psnr_pooled dB",
            "tradeoff",
        ),
    ]
    titles = {
        "pareto": "quality vs latent size (up and left is better)",
        "tradeoff": "reconstruction vs diffusability (up and left is better)",
    }
    for x_key, x, y_key, y, name in views:
        if not {x_key, y_key} <= set(table.columns):
            continue
        points = [
            {"rev": _label(r), x: float(r[x_key]), y: float(r[y_key])} for _, r in table.iterrows()
        ]
        render_chart(points, "scatter", x, y, titles[name], report_dir / f"{name}.png")


def detail_zoom(grid: Image.Image, image_size: int, factor: int = 4) -> Image.Image:
    """The busiest quarter of the first image, enlarged: fine detail is where blur shows."""
    import numpy as np
    import torch

    from aeselect.imageops import sobel_magnitude

    original = torch.from_numpy(
        np.asarray(grid.crop(tile_box(0, 0, image_size)), dtype=np.float32) / 255
    ).permute(2, 0, 1)[None]
    half = image_size // 2
    energy = sobel_magnitude(original)[0]
    corners = [(y, x) for y in (0, half) for x in (0, half)]
    y, x = max(corners, key=lambda c: float(energy[c[0] : c[0] + half, c[1] : c[1] + half].sum()))
    width = image_size + 2 * GRID_PADDING  # one column of side_by_side, padding both sides
    columns = grid.width // width
    tiles = [
        grid.crop(
            (
                c * width + GRID_PADDING + x,
                GRID_PADDING + y,
                c * width + GRID_PADDING + x + half,
                GRID_PADDING + y + half,
            )
        )
        for c in range(columns)
    ]
    size = half * factor
    out = Image.new("RGB", (columns * (size + GRID_PADDING), size), "white")
    for i, tile in enumerate(tiles):
        out.paste(tile.resize((size, size), Image.NEAREST), (i * (size + GRID_PADDING), 0))
    return out


def compare(repo: Path, spec: PhaseSpec, sweep: dict[str, Any]) -> Comparison:
    """Rank the phase's fresh runs (`gather`, `collect_results`) and write its report."""
    phase = gather(repo, spec, sweep)
    results = phase.experiments
    report_dir = repo / REPORTS_DIR / spec.id
    report_dir.mkdir(parents=True, exist_ok=True)
    done = results[results["state"] == Status.SUCCESS.label]
    ranking = (
        rank(results, spec.decide, phase.per_image, phase.no_interval, phase.secondary)
        if len(done)
        else None
    )
    ordered = ranking.table if ranking else results
    ordered.to_csv(report_dir / "metrics.csv", index=False)
    if spec.repeats > 1:
        phase.runs.to_csv(report_dir / "runs.csv", index=False)
    if ranking is not None:
        trained = ranking.table[ranking.table["state"] == Status.SUCCESS.label]  # not the pruned
        curves = val_curves(repo, trained)
        curves.to_csv(report_dir / "val_curves.csv", index=False)
        charts(trained, curves, report_dir)
        size = int(trained["params.data.image_size"].iloc[0])
        grid = side_by_side(repo, trained, size)
        if grid is not None:
            grid.save(report_dir / "reconstructions.png")
            detail_zoom(grid, size).save(report_dir / "zoom.png")
        samples = probe_samples(repo, trained)
        if samples is not None:
            samples.save(report_dir / "probe_samples.png")
    (report_dir / "report.md").write_text(render_markdown(repo, spec, phase, ranking))
    return Comparison(phase, ranking, report_dir)


def display_table(spec: PhaseSpec, table: pd.DataFrame) -> pd.DataFrame:
    """The table as `phase compare` prints it and report.md shows it: the selected params, the
    primary metric with its spread across seeds and its difference from the best (95% interval),
    the tie-breakers and the headline metrics."""
    primary = column(spec.decide.primary)
    shown = table.assign(
        **({DIFFERENCE: table.apply(describe_difference, axis=1)} if "delta" in table else {})
    )
    wanted = ["rank", "experiment", "state"] + [f"params.{k}" for k in spec.selects]
    wanted += [primary, seed_spread_column(primary), DIFFERENCE, "vs_best", "excluded"]
    wanted += [column(c) for c in spec.decide.tie_breakers]
    for metric in SECONDARY_PER_IMAGE:  # with its interval, tie-breaker or not
        if metric in table and metric != primary:
            name = f"{metric} {VERSUS_LOWEST}"
            shown[name] = table.apply(lambda row, m=metric: describe_versus_lowest(row, m), axis=1)
            at = wanted.index(metric) + 1 if metric in wanted else len(wanted)
            wanted[at:at] = [metric] * (metric not in wanted) + [name]
    wanted += HEADLINE
    return shown[[c for c in dict.fromkeys(wanted) if c in shown.columns]]


def noise_note(spec: PhaseSpec, phase: PhaseResults, ranking: Ranking) -> list[str]:
    """How to read the differences: what was resampled, and what counts as a tie."""
    primary = column(spec.decide.primary)
    if phase.per_image is None:
        lines = [
            f"{DIFFERENCE}: {primary} minus the best's ({ranking.best}). No interval: "
            f"{phase.no_interval}; ties are judged by the {spec.decide.tolerance:.0%} tolerance "
            "alone."
        ]
    else:
        lines = [
            f"{DIFFERENCE}: {primary} minus the best's ({ranking.best}), the mean over the "
            f"{len(phase.per_image)} val images of the per-image difference; the interval is a "
            f"paired bootstrap over those images ({RESAMPLES} resamples, seed {BOOTSTRAP_SEED}, "
            f"{CONFIDENCE:.0%}). A candidate whose interval contains 0 (`noise`), or that is "
            f"within {spec.decide.tolerance:.0%} of the best (`tolerance`), is tied with it; ties "
            "go to the tie-breakers."
        ]
    if spec.repeats == 1:
        lines += [
            "",
            "The interval covers which val images were drawn, not the training's own noise: one "
            f"run per experiment cannot show how far another `{REPEAT_SEED_KEY}` would move it "
            "(`repeats: N` in the phase file runs N seeds and shows their spread).",
        ]
    else:
        lines += [
            "",
            f"Each experiment ran under {spec.repeats} training seeds (`{REPEAT_SEED_KEY}` 0 to "
            f"{spec.repeats - 1}; same data and split): its metrics and per-image values are "
            f"means over the seeds, `{seed_spread_column(primary)}` the std of {primary} across "
            "them, and the bootstrap resamples each experiment's seeds along with the images (a "
            "seed shifts a whole run, which resampling images cannot see). `runs.csv` lists every "
            "run; curves and reconstructions show seed 0.",
        ]
    return lines


def render_markdown(
    repo: Path, spec: PhaseSpec, phase: PhaseResults, ranking: Ranking | None
) -> str:
    """report.md: the rule, the ranking, the verdict, the decision if one was made, the figures."""
    table = ranking.table if ranking else phase.experiments
    lines = _ranking_section(spec, display_table(spec, table))
    if ranking:
        lines += _verdict_section(spec, phase, ranking)
    decision = read_decision(spec.id, repo)
    if decision:
        lines += [
            "## Decision",
            "",
            f"Promoted **{decision['winner']}**: "
            + ", ".join(f"`{k}={v}`" for k, v in decision["selected"].items())
            + f" (commit message: phase {spec.id}).",
            "",
        ]
    trained = table[table["state"] == Status.SUCCESS.label]  # with images: not the pruned
    order = ", ".join(trained["experiment"]) if ranking else ""
    succeeded = phase.runs.loc[phase.runs["state"] == Status.SUCCESS.label, "experiment"]
    lines += _figures_section(spec, order, " ".join(succeeded))
    return "\n".join(lines)


def _ranking_section(spec: PhaseSpec, shown: pd.DataFrame) -> list[str]:
    rule = spec.decide
    breakers = ", ".join(c.describe() for c in rule.tie_breakers)
    return [
        f"# Phase {spec.id}: {spec.title}",
        "",
        f"Selects: {', '.join(f'`{k}`' for k in spec.selects) or 'nothing (final training)'}. "
        + (
            "Requirements (a candidate failing one is excluded): "
            + ", ".join(r.describe() for r in rule.requirements)
            + ". "
            if rule.requirements
            else ""
        )
        + f"Rule: {rule.primary.describe()}, ties within the noise or {rule.tolerance:.0%}"
        + (f", then {breakers}" if rule.tie_breakers else "")
        + ".",
        "",
        "## Ranking",
        "",
        shown.to_markdown(index=False, floatfmt=".4g") if len(shown) else "(no experiments yet)",
        "",
    ]


def _verdict_section(spec: PhaseSpec, phase: PhaseResults, ranking: Ranking) -> list[str]:
    return [
        f"## Verdict: {ranking.verdict}",
        "",
        f"{ranking.winner or 'No winner'}: {VERDICTS[ranking.verdict]}.",
        "",
        ranking.reason + ".",
        "",
        *noise_note(spec, phase, ranking),
        "",
    ]


def _figures_section(spec: PhaseSpec, order: str, succeeded: str) -> list[str]:
    """The reconstructions, the zoom, the charts, and how to see them interactively."""
    return [
        "## Reconstructions",
        "",
        f"Same val images: the originals, then one column per experiment ({order}).",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "Fine detail, 4x: the busiest quarter of the first image, same column order.",
        "",
        "![detail](zoom.png)",
        "",
        "Decoded samples of each experiment's diffusability probe (`probe_samples.png` of the",
        f"probe stage, the same seeded draws), one row per experiment ({order}). At demo scale",
        "they are rough; what matters is which latent gives the denoiser structure to learn.",
        "",
        "![probe samples](probe_samples.png)",
        "",
        "## Curves and the trade-offs",
        "",
        "![val MSE](val_mse.png) ![val PSNR](val_psnr.png)",
        "",
        "Quality against latent size, and reconstruction against `probe.loss` (how hard the",
        "latent is to diffuse: 1.0 = no structure found): a candidate a requirement excludes",
        "is marked `(excluded)`.",
        "",
        "![quality vs latent size](pareto.png) ![reconstruction vs diffusability](tradeoff.png)",
        "",
        "Numbers: `metrics.csv` (final metrics, ranked), `val_curves.csv` (every evaluation).",
        "Charts are DVC plot templates rendered offline (`*.vl.json` are their Vega-Lite specs).",
        "Interactive (needs network for Vega):",
        "",
        f"    dvc plots diff {succeeded} -o {REPORTS_DIR}/{spec.id}/plots",
        "",
    ]
