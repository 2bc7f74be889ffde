"""The metric names phase files are checked against are exactly what the stages write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, write_pngs

from aeselect import stages
from aeselect.config import apply_overrides, flatten, from_dict
from aeselect.sweep.metric_names import (
    EVALUATE_METRICS,
    PROBE_METRICS,
    TRAIN_METRICS,
    is_stage_metric,
    matches,
)

# Synthetic scenes have masks (segmentation); a folder without masks gets edges. The folder run
# trains a VAE, so the two runs together write every optional metric.
RUNS = {
    "synthetic-ae": {},
    "folder-vae": {"data.source": "folder", "model.variational": True, "loss.kl_weight": 0.001},
}


def written(stage: str) -> set[str]:
    return set(flatten(json.loads(Path(f"results/{stage}/metrics.json").read_text())))


@pytest.mark.slow
def test_metric_names_match_what_the_stages_write(tmp_path, monkeypatch):
    seen = {"train": set(), "evaluate": set(), "probe": set()}
    for name, overrides in RUNS.items():
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        write_pngs(Path("data/raw/images"), 12)
        cfg = from_dict(apply_overrides({}, {**TINY, **overrides}))
        stages.run_prepare(cfg)
        stages.run_train(cfg)
        stages.run_evaluate(cfg)
        stages.run_probe(cfg)
        for stage in seen:
            seen[stage] |= written(stage)
    declared_by_stage = {
        "train": TRAIN_METRICS,
        "evaluate": EVALUATE_METRICS,
        "probe": PROBE_METRICS,
    }
    for stage, declared in declared_by_stage.items():
        unknown = sorted(key for key in seen[stage] if not is_stage_metric(key))
        assert not unknown, (
            f"the {stage} stage writes metrics that src/aeselect/sweep/metric_names.py "
            f"lacks (phase files could not rank by them); add to {stage.upper()}_METRICS: {unknown}"
        )
        never = [name for name in declared if not any(matches(name, key) for key in seen[stage])]
        assert not never, (
            f"src/aeselect/sweep/metric_names.py lists {stage} metrics that the stage no longer "
            f"writes (a phase ranking by one would fail after every run); remove: {never}"
        )


def test_names_with_a_channel_index_match_digits_only():
    assert is_stage_metric("latent.channel_mean.12")
    assert not is_stage_metric("latent.channel_mean.x")
    assert not is_stage_metric("latent.channel_mean.")
    assert is_stage_metric("cost.params") and not is_stage_metric("cost.param")
