"""The probe stage's work: encode both splits with the frozen autoencoder (the hand-off's scaled
latents), train the denoiser on the train latents, score it on the val latents, measure the
high-frequency energy of the val latents and images, and decode a few of its samples."""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

import pandas as pd
import torch
from dvclive import Live
from torchvision.utils import make_grid

from aeselect.config import ProbeConfig
from aeselect.data.dataset import CacheDataset, PreparedData, make_loader, to_model_input
from aeselect.envvars import THREADS_ENV
from aeselect.handoff import PhaseTwoAutoencoder
from aeselect.paths import PROBE_PER_IMAGE_CSV, PROBE_SAMPLES_NAME
from aeselect.probe.denoiser import CPU, sample, score, train_probe
from aeselect.probe.spectrum import downsampled, high_frequency_share
from aeselect.scoring.images import to_pil
from aeselect.scoring.layout import GRID_PADDING

PER_IMAGE_KEY = "path"  # the column compare pairs two candidates' rows by, as in evaluate's CSV


class EncodedSplit(NamedTuple):
    latents: torch.Tensor  # (N, C, h, w) scaled latents
    image_hf_energy: torch.Tensor  # (N,) of the images at the latent's resolution


def encode_split(
    autoencoder: PhaseTwoAutoencoder,
    data: PreparedData,
    split: str,
    batch_size: int,
    limit: int | None = None,
) -> EncodedSplit:
    """The split's first `limit` images (all without one), encoded."""
    dataset = CacheDataset(data.images, data.targets, data.split_indices(split)[:limit])
    latents, shares = [], []
    for raw_images, raw_targets in make_loader(dataset, batch_size=batch_size):
        images, _ = to_model_input(raw_images, raw_targets, CPU)
        latent = autoencoder.encode(images)
        latents.append(latent)
        shares.append(high_frequency_share(downsampled(images, latent.shape[-2:])))
    return EncodedSplit(torch.cat(latents), torch.cat(shares))


def run_probe(
    cfg: ProbeConfig, data: PreparedData, autoencoder: PhaseTwoAutoencoder, live: Live
) -> dict[str, Any]:
    """Log probe.loss (with its standard error over val images), the train loss, the probe's
    wall time, latent.hf_energy and image.hf_energy; write the per-image CSV and the samples.
    Runs on the threads the cluster glue gives each experiment (THREADS_ENV), as training does:
    more threads than free cores make this small net's steps over ten times slower."""
    threads = int(os.environ.get(THREADS_ENV) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    # Encoding all 1,920 demo train images took half the stage; 512 latents give the same
    # probe.loss within its standard error (README, "The probe").
    train = encode_split(autoencoder, data, "train", cfg.batch_size, cfg.train_images)
    val = encode_split(autoencoder, data, "val", cfg.batch_size)
    probe, train_loss = train_probe(cfg, train.latents)
    per_image = score(probe, val.latents, cfg).mean(dim=1)
    samples = autoencoder.decode(sample(probe, cfg, tuple(val.latents.shape[-2:])))
    summary = {
        "probe": {
            "loss": float(per_image.mean()),
            "loss_se": float(per_image.std() / len(per_image) ** 0.5),
            "train_loss": train_loss,
            "time_s": time.perf_counter() - started,
        },
        "latent": {"hf_energy": float(high_frequency_share(val.latents).mean())},
        "image": {"hf_energy": float(val.image_hf_energy.mean())},
    }
    for section, values in summary.items():
        for key, value in values.items():
            live.log_metric(f"{section}/{key}", value, plot=False)
    grid = make_grid(samples, nrow=min(8, len(samples)), padding=GRID_PADDING, pad_value=1.0)
    live.log_image(PROBE_SAMPLES_NAME, to_pil(grid))
    paths = data.manifest.set_index("index").loc[data.split_indices("val"), "path"]
    table = pd.DataFrame({PER_IMAGE_KEY: paths.to_numpy(), "probe.loss": per_image.numpy()})
    table.sort_values("probe.loss", ascending=False).to_csv(PROBE_PER_IMAGE_CSV, index=False)
    return summary
