"""The demo's selection claims at the demo's own scale: params.yaml, the phase files, SWEEP_STEPS.

Phase 1.1 at the fixed base width of params.yaml: more latent channels, lower val MSE, each
neighbouring pair (lc4 > lc8 > lc16 in MSE). Phase 1.2 at 1.1's best latent width: more downsampling
steps, higher val MSE, each neighbouring pair. Every claim must hold outside the paired bootstrap
interval that `phase compare` reports (aeselect.phases.noise.paired_bootstrap: the same val images
decide both sides, so per-image difficulty cancels). The sweeps train directly with the train
loop, without DVC, which adds nothing to what is measured here.

Before the block-PCA shortcut (model.pca_shortcut) the step lc4 -> lc8 did not hold: trained from
scratch for 300 steps both sat near 18.2 dB, within training-seed noise of each other, because
neither had learned enough to be limited by its latent. Started at the block PCA, each model is at
least as good as the best linear code of its size from the first step (README, "The block-PCA
shortcut").
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT

from aeselect.config import apply_overrides, from_dict, read_yaml
from aeselect.data.dataset import PreparedData, make_loader, to_model_input
from aeselect.data.prepare import prepare
from aeselect.demo import SWEEP_STEPS, sweep_schedule
from aeselect.model.checkpoint import load_checkpoint, model_from_checkpoint
from aeselect.paths import BEST_CHECKPOINT
from aeselect.phases.noise import paired_bootstrap
from aeselect.scoring.metrics import per_image_mse
from aeselect.stages import open_live
from aeselect.sweep.spec import load_phase
from aeselect.training.loop import train

pytestmark = pytest.mark.slow


def _val_mse(directory: Path, data: PreparedData) -> np.ndarray:
    """(N,) val MSE per image of the best checkpoint in `directory`."""
    model, _ = model_from_checkpoint(load_checkpoint(directory / BEST_CHECKPOINT.name))
    values = []
    with torch.no_grad():
        for raw_images, raw_targets in make_loader(data.dataset("val"), batch_size=64):
            images, _ = to_model_input(raw_images, raw_targets, torch.device("cpu"))
            values.append(per_image_mse(images, model(images).reconstruction.clamp(0, 1)))
    return torch.cat(values).numpy()


class Sweeps:
    """Trains each distinct config once (1.2's ds3 at 1.1's winner is that winner again)."""

    def __init__(self, tmp_path: Path, base: dict, data: PreparedData):
        self.tmp_path, self.base, self.data = tmp_path, base, data
        self.trained: dict[str, np.ndarray] = {}

    def val_mse(self, overrides: dict) -> np.ndarray:
        cfg = from_dict(apply_overrides(self.base, overrides))
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in self.trained:
            run = self.tmp_path / f"run{len(self.trained)}"
            with open_live(run / "live") as live:
                train(cfg, self.data, run / "models", live)
            self.trained[key] = _val_mse(run / "models", self.data)
        return self.trained[key]


def _assert_better(results: dict[str, np.ndarray], better: str, worse: str) -> None:
    """`better` has the lower mean val MSE, its 95% paired interval of the difference above 0."""
    paths = pd.RangeIndex(len(results[better]))  # both scored on the same val images, in order
    difference = paired_bootstrap(
        pd.Series(results[better], index=paths), pd.Series(results[worse], index=paths)
    )
    pooled = {name: float(values.mean()) for name, values in results.items()}
    assert difference.low > 0, f"{better} vs {worse}: pooled MSE {pooled}; {difference}"


def test_phase_1_1_and_1_2_orders_hold_outside_the_noise(tmp_path: Path) -> None:
    base = apply_overrides(read_yaml(ROOT / "params.yaml"), sweep_schedule(SWEEP_STEPS))
    prepare(from_dict(base), tmp_path / "prepared")
    sweeps = Sweeps(tmp_path, base, PreparedData.load(tmp_path / "prepared"))

    channel_sweep = load_phase("1.1", ROOT / "phases").experiments
    width = base["model"]["base_channels"]
    at_base = {
        name: overrides
        for name, overrides in channel_sweep.items()
        if overrides.get("model.base_channels", width) == width
    }
    assert len(at_base) >= 3
    # Most latent channels first: lowest MSE first.
    by_channels = sorted(at_base, key=lambda name: -at_base[name]["model.latent_channels"])
    channels = {name: sweeps.val_mse(at_base[name]) for name in by_channels}
    for wider, narrower in itertools.pairwise(by_channels):
        _assert_better(channels, wider, narrower)

    winner = at_base[by_channels[0]]
    step_sweep = load_phase("1.2", ROOT / "phases").experiments
    by_steps = sorted(step_sweep, key=lambda name: step_sweep[name]["model.downsampling_steps"])
    steps = {name: sweeps.val_mse(winner | step_sweep[name]) for name in by_steps}
    for fewer, more in itertools.pairwise(by_steps):
        _assert_better(steps, fewer, more)
