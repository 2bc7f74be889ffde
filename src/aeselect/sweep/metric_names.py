"""The metrics a phase may rank by: the keys the train and evaluate stages write to their
`metrics.json` (and the probe stage), dotted as `compare` flattens them (`cost.params`, `val.mse`).

Phase files are checked against these names when they load, so a misspelt metric fails before any
run instead of after all of them. The lists live here, with their one reader, rather than in the
stage code, so that editing them re-runs no DVC stage; tests/test_metric_names.py runs the stages
and fails, naming the difference, when what they write and these lists disagree either way.
"""

from __future__ import annotations

import re

CHANNEL = "<channel>"  # one key per latent channel: 0, 1, ...

TRAIN_METRICS = (
    "step",
    "lr",
    "loss.total",
    "loss.mse",
    "loss.l1",
    "loss.kl",  # variational models only
    "loss.aux_ce",
    "val.mse",
    "val.psnr",
    "val.kld",  # variational models only
    "val.aux_pixel_acc",
    "val.aux_miou",  # with masks (segmentation)
    "val.aux_f1",  # without masks (edges)
    "best.val_mse",
    "best.step",
    "train_time_s",
    "images_per_s",
    "device",
    "stability.nonfinite_count",
    "stability.max_spike_ratio",
    "stability.val_still_improving",
)
EVALUATE_METRICS = (
    "mse",
    "mae",
    "psnr",
    "psnr_pooled",
    "ssim",
    "edge_f1",
    "hf_psnr",
    "psnr_p5",
    "psnr_p50",
    "psnr_p95",
    "kld",  # variational models only
    "aux_pixel_acc",
    "aux_miou",  # with masks (segmentation)
    "aux_f1",  # without masks (edges)
    "latent.shape",
    "latent.height",
    "latent.width",
    "latent.channels",
    "latent.elements_per_image",
    "latent.compression_ratio",
    "latent.std",
    "latent.scale_factor",
    f"latent.channel_mean.{CHANNEL}",
    f"latent.channel_std.{CHANNEL}",
    "smoothness.interpolation_detour",  # with at least 2 val images
    "smoothness.noise_psnr_drop_db",
    "cost.params",
    "cost.encode_images_per_s",
    "cost.decode_images_per_s",
    "cost.peak_memory_mb",
    "gates.pass_mse",
    "gates.pass_psnr",
    "gates.pass_latent_size",
    "gates.pass_stability",
    "gates.pass_all",
)
PROBE_METRICS = (
    "probe.loss",  # per val image too (results/probe/per_image.csv)
    "probe.loss_se",
    "probe.train_loss",
    "probe.time_s",
    "latent.hf_energy",
    "image.hf_energy",
)
STAGE_METRICS = tuple(dict.fromkeys(EVALUATE_METRICS + TRAIN_METRICS + PROBE_METRICS))


def matches(name: str, key: str) -> bool:
    """Whether metrics.json key `key` is the metric `name` (one with CHANNEL: any channel)."""
    return re.fullmatch(re.escape(name).replace(re.escape(CHANNEL), r"\d+"), key) is not None


def is_stage_metric(key: str) -> bool:
    return any(matches(name, key) for name in STAGE_METRICS)
