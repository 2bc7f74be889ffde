"""`phase compare`: a phase's experiments side by side, ranked, written to phases/reports/<id>/."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image

from aeselect.phases.decide import Ranking, column, rank
from aeselect.phases.experiments import collect_results, queue_states
from aeselect.phases.promote import HEADLINE, read_decision
from aeselect.phases.spec import REPORTS_DIR, PhaseSpec

RECONSTRUCTIONS = "results/evaluate/plots/images/reconstructions.png"
VAL_CURVES_DIR = "results/train/plots/metrics/val"
GRID_PADDING = 2  # torchvision make_grid's padding in evaluation/images.py


@dataclass
class Comparison:
    results: pd.DataFrame
    ranking: Ranking | None
    report_dir: Path


def phase_results(repo: Path, spec: PhaseSpec) -> pd.DataFrame:
    """collect_results, with queue states (Queued/Running/Stuck) overriding exp show's view."""
    results = collect_results(repo, spec)
    states = queue_states(repo)
    rows = []
    for name in spec.names():
        found = results[results["experiment"] == name] if len(results) else results
        row = found.iloc[0].to_dict() if len(found) else {"experiment": name, "state": "Missing"}
        if name in states and states[name].status not in ("Success",):
            row["state"] = states[name].status
        rows.append(row)
    return pd.DataFrame(rows)


def _open_output(repo: Path, path: str, rev: str) -> bytes:
    import dvc.api

    with dvc.api.open(path, repo=str(repo), rev=rev, mode="rb") as handle:
        return handle.read()


def val_curves(repo: Path, done: pd.DataFrame) -> pd.DataFrame:
    """Per-evaluation val metrics of every experiment (dvclive's TSVs read at each exp's rev)."""
    import dvc.api

    frames = []
    for _, row in done.iterrows():
        fs = dvc.api.DVCFileSystem(str(repo), rev=row["rev"])
        for tsv in fs.find(VAL_CURVES_DIR):
            frame = pd.read_csv(io.BytesIO(fs.read_bytes(tsv)), sep="\t")
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
    """Originals, then each experiment's reconstructions of the same val images, one column each."""
    columns: list[Image.Image] = []
    for i, (_, row) in enumerate(done.iterrows()):
        grid = Image.open(io.BytesIO(_open_output(repo, RECONSTRUCTIONS, row["rev"]))).convert(
            "RGB"
        )
        step = image_size + GRID_PADDING
        for col in [0, 1] if i == 0 else [1]:
            columns.append(
                grid.crop((col * step, 0, col * step + step + GRID_PADDING, grid.height))
            )
    if not columns:
        return None
    out = Image.new("RGB", (sum(c.width for c in columns), max(c.height for c in columns)), "white")
    x = 0
    for c in columns:
        out.paste(c, (x, 0))
        x += c.width
    return out


def compare(repo: Path, spec: PhaseSpec) -> Comparison:
    results = phase_results(repo, spec)
    report_dir = repo / REPORTS_DIR / spec.id
    report_dir.mkdir(parents=True, exist_ok=True)
    done = results[results["state"] == "Success"]
    ranking = rank(results, spec.decide) if len(done) else None
    ordered = ranking.table if ranking else results
    ordered.to_csv(report_dir / "metrics.csv", index=False)
    if ranking is not None:
        val_curves(repo, ranking.table).to_csv(report_dir / "val_curves.csv", index=False)
        size = int(ranking.table["params.data.image_size"].iloc[0])
        grid = side_by_side(repo, ranking.table, size)
        if grid is not None:
            grid.save(report_dir / "reconstructions.png")
    (report_dir / "report.md").write_text(render_markdown(repo, spec, results, ranking))
    return Comparison(results, ranking, report_dir)


def display_columns(spec: PhaseSpec, frame: pd.DataFrame) -> list[str]:
    wanted = ["experiment", "state"] + [f"params.{k}" for k in spec.selects]
    wanted += [column(c) for c in (spec.decide.primary, *spec.decide.tie_breakers)] + HEADLINE
    return [c for c in dict.fromkeys(wanted) if c in frame.columns]


def render_markdown(
    repo: Path, spec: PhaseSpec, results: pd.DataFrame, ranking: Ranking | None
) -> str:
    table = ranking.table if ranking else results
    shown = (
        table[["rank", *display_columns(spec, table)]]
        if ranking
        else table[display_columns(spec, table)]
    )
    decision = read_decision(spec.id, repo)
    names = " ".join(results.loc[results["state"] == "Success", "experiment"])
    lines = [
        f"# Phase {spec.id}: {spec.title}",
        "",
        f"Selects: {', '.join(f'`{k}`' for k in spec.selects) or 'nothing (final training)'}. "
        f"Rule: {spec.decide.primary.describe()}, ties within {spec.decide.tolerance:.0%}"
        + (
            f", then {', '.join(c.describe() for c in spec.decide.tie_breakers)}"
            if spec.decide.tie_breakers
            else ""
        )
        + ".",
        "",
        "## Ranking",
        "",
        shown.to_markdown(index=False, floatfmt=".4g") if len(shown) else "(no experiments yet)",
        "",
    ]
    if ranking:
        lines += ["## Why", "", ranking.reason + ".", ""]
    if decision:
        lines += [
            "## Decision",
            "",
            f"Promoted **{decision['winner']}**: "
            + ", ".join(f"`{k}={v}`" for k, v in decision["selected"].items())
            + f" (commit message: phase {spec.id}).",
            "",
        ]
    lines += [
        "## Reconstructions",
        "",
        "Same val images: the originals, then one column per experiment in rank order.",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "## Curves",
        "",
        "Per-evaluation val metrics of every experiment: `val_curves.csv`. Interactive curves:",
        "",
        f"    dvc plots diff {names} -o {REPORTS_DIR}/{spec.id}/plots",
        "",
    ]
    return "\n".join(lines)
