"""The `evaluate` stage: judge the best checkpoint the way Phase 2 needs it judged.

Reconstruction (MSE, PSNR with data range 1 as the mean per image and pooled over the set, SSIM,
MAE and the per-image PSNR spread), spatial detail (edge F1, high-frequency PSNR), the auxiliary
task, the latent (shape, compression, per-channel statistics, diffusion scale factor, KLD,
smoothness), cost (parameters, encode and decode throughput, peak memory) and the success gates
(`gates.py`), all logged with dvclive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from dvclive import Live

from aeselect.config import Config, EvaluateConfig
from aeselect.data.dataset import PreparedData
from aeselect.evaluation.gates import success_gates
from aeselect.model import Autoencoder, count_parameters
from aeselect.model.checkpoint import load_checkpoint, model_from_checkpoint
from aeselect.paths import (
    LATENT_CHANNELS_NAME,
    PER_IMAGE_CSV,
    RECONSTRUCTIONS_NAME,
    TRAIN_METRICS,
)
from aeselect.runtime import Runtime, select_runtime
from aeselect.scoring import metrics
from aeselect.scoring.images import latent_channel_grid, reconstruction_grid
from aeselect.scoring.per_image import PER_IMAGE_METRICS, score_batch, write_per_image
from aeselect.scoring.validation import ValBatch, val_batches


class ValScores(NamedTuple):
    """What one pass over the val split gives: per-image columns (CPU) and set-level scores."""

    columns: dict[str, torch.Tensor]
    aux: dict[str, float]
    kld: torch.Tensor | None  # (N,), variational models only
    latents: torch.Tensor  # (N, C, h, w) on the CPU
    first: ValBatch  # the first batch: sample images, smoothness and cost probes


def _read_train_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the train stage first")
    return json.loads(path.read_text())


@torch.no_grad()
def evaluate(cfg: Config, data: PreparedData, checkpoint: Path, live: Live) -> dict[str, Any]:
    """Metrics and the latent scale factor from fp32 outputs on every device (`Runtime.fp32`, no
    autocast, default layout), as the hand-off encodes, though training may have run in bf16."""
    with select_runtime(cfg.train).fp32() as runtime:
        return _evaluate(cfg, data, checkpoint, live, runtime)


def _evaluate(
    cfg: Config, data: PreparedData, checkpoint: Path, live: Live, runtime: Runtime
) -> dict[str, Any]:
    model, trained_cfg = model_from_checkpoint(load_checkpoint(checkpoint))
    model = model.to(runtime.device)
    scores = score_val_set(model, data, cfg.evaluate.batch_size, runtime)
    summary: dict[str, Any] = {
        name: float(values.mean()) for name, values in scores.columns.items()
    }
    summary["psnr_pooled"] = metrics.pooled_psnr(scores.columns["mse"])
    summary |= {f"psnr_{k}": v for k, v in metrics.percentiles(scores.columns["psnr"]).items()}
    summary |= scores.aux
    if scores.kld is not None:
        summary["kld"] = float(scores.kld.mean())
    summary["latent"] = latent_summary(trained_cfg, scores.latents)
    summary["smoothness"] = smoothness(model, scores.first, cfg.seed)
    summary["cost"] = cost(model, scores.first.images, runtime)
    summary["gates"] = _gates(summary, cfg.evaluate)
    _log_nested(live, summary)
    _log_pictures(live, scores.first, cfg.evaluate.num_sample_images)
    write_per_image(data, scores.columns, PER_IMAGE_CSV)
    return summary


def score_val_set(
    model: Autoencoder, data: PreparedData, batch_size: int, runtime: Runtime
) -> ValScores:
    """Every PER_IMAGE_METRICS column, the auxiliary scores, KLD and latents of the val split."""
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in PER_IMAGE_METRICS}
    kld: list[torch.Tensor] = []
    latents: list[torch.Tensor] = []
    aux = metrics.AuxScore(data.aux_classes, data.aux_task, runtime.device)
    first: ValBatch | None = None
    for batch in val_batches(model, data, batch_size, runtime):
        for name, values in score_batch(batch.images, batch.reconstruction).items():
            columns[name].append(values)
        aux.update(batch.out.aux_logits, batch.targets)
        if batch.out.posterior is not None:
            kld.append(batch.out.posterior.kl())
        latents.append(batch.out.latent.cpu())
        if first is None:
            first = batch
    return ValScores(
        {name: torch.cat(values).cpu() for name, values in columns.items()},
        aux.compute(),
        torch.cat(kld) if kld else None,
        torch.cat(latents),
        first,
    )


def latent_summary(trained_cfg: Config, latents: torch.Tensor) -> dict[str, Any]:
    """What a diffusion model trained on these latents sees: shape, compression, statistics."""
    h, w, c = trained_cfg.latent_shape
    stats = metrics.latent_statistics(latents, trained_cfg.data.image_size)
    return {
        "shape": f"{h}x{w}x{c}",
        "height": h,
        "width": w,
        "channels": c,
        "elements_per_image": stats["elements_per_image"],
        "compression_ratio": stats["compression_ratio"],
        "std": stats["std"],
        "scale_factor": stats["scale_factor"],
        "channel_mean": dict(enumerate(stats["channel_mean"])),
        "channel_std": dict(enumerate(stats["channel_std"])),
    }


def smoothness(model: Autoencoder, batch: ValBatch, seed: int) -> dict[str, float]:
    """Decode latent midpoints of neighbouring val images, and latents with 10% noise added."""
    latent = batch.out.latent
    if len(latent) < 2:
        return {}
    detour = metrics.interpolation_quality(model.decode, latent[:-1], latent[1:])
    drop = metrics.noise_robustness(model.decode, latent, batch.images, rel_sigma=0.1, seed=seed)
    return {"interpolation_detour": float(detour.mean()), "noise_psnr_drop_db": float(drop.mean())}


def cost(model: Autoencoder, images: torch.Tensor, runtime: Runtime) -> dict[str, float]:
    """Parameters, encode and decode throughput and peak memory: fixed costs, not per image."""
    latent = model.encode(images)
    with metrics.peak_memory(runtime.device) as peak:
        model.decode(model.encode(images))
    repeats = 2 if runtime.device.type == "cpu" else 20  # a fixed cost: keep it small here
    return {
        "params": count_parameters(model),
        "encode_images_per_s": metrics.measure_throughput(
            model.encode, images, repeats, runtime.device
        ),
        "decode_images_per_s": metrics.measure_throughput(
            model.decode, latent, repeats, runtime.device
        ),
        "peak_memory_mb": peak.bytes / 2**20,
    }


def _gates(summary: dict[str, Any], cfg: EvaluateConfig) -> dict[str, Any]:
    # Stability is a property of training: the train stage logs it, the gate here reads it.
    stability = _read_train_summary(TRAIN_METRICS).get("stability", {})
    return success_gates(
        {
            "mse": summary["mse"],
            "psnr": summary["psnr"],
            "latent.compression_ratio": summary["latent"]["compression_ratio"],
            "stability.max_spike_ratio": stability.get("max_spike_ratio", math.nan),
            "stability.nonfinite_count": stability.get("nonfinite_count", 0),
        },
        cfg,
    )


def _log_pictures(live: Live, batch: ValBatch, count: int) -> None:
    originals, reconstructions = batch.images[:count], batch.reconstruction[:count]
    live.log_image(RECONSTRUCTIONS_NAME, reconstruction_grid(originals, reconstructions))
    live.log_image(LATENT_CHANNELS_NAME, latent_channel_grid(batch.out.latent[0]))


def _log_nested(live: Live, values: dict[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _log_nested(live, value, f"{prefix}{key}/")
        else:
            live.log_metric(f"{prefix}{key}", value, plot=False)
