"""The per-image scores of the val split: what evaluate writes to `per_image.csv` and a budget
rung writes for its pruning step, one definition for both, so a rung's values mean what the
decision's do."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from aeselect.data.dataset import PreparedData
from aeselect.paths import PER_IMAGE_PAIRING_KEY as PAIRING_KEY
from aeselect.scoring import metrics

# The per-image columns: (original, clamped reconstruction) -> (N,).
PER_IMAGE_METRICS = {
    "mse": metrics.per_image_mse,
    "mae": metrics.per_image_mae,
    "psnr": metrics.per_image_psnr,
    "ssim": metrics.per_image_ssim,
    "edge_f1": metrics.edge_f1,
    "hf_psnr": metrics.high_frequency_psnr,
}


def score_batch(images: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every PER_IMAGE_METRICS column of one batch."""
    return {name: metric(images, reconstruction) for name, metric in PER_IMAGE_METRICS.items()}


def write_per_image(data: PreparedData, columns: dict[str, torch.Tensor], path: Path) -> None:
    """One row per val image, worst PSNR first, keyed by its path (PAIRING_KEY)."""
    table = pd.DataFrame(
        {PAIRING_KEY: data.manifest.set_index("index").loc[data.split_indices("val"), "path"]}
    )
    table = table.reset_index(drop=True).assign(**{k: v.numpy() for k, v in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    table.sort_values("psnr").to_csv(path, index=False)
