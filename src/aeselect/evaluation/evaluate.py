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
from typing import Any

import pandas as pd
import torch
from dvclive import Live

from aeselect.config import Config
from aeselect.data.dataset import PreparedData, make_loader, to_model_input
from aeselect.evaluation import metrics
from aeselect.evaluation.gates import success_gates
from aeselect.evaluation.images import latent_channel_grid, reconstruction_grid
from aeselect.runtime import Runtime, select_runtime
from aeselect.training.checkpoint import BEST, load_checkpoint, model_from_checkpoint
from aeselect.training.loop import TRAIN_LIVE_DIR

EVALUATE_LIVE_DIR = Path("results/evaluate")
PER_IMAGE_CSV = "per_image.csv"
PER_IMAGE_COLUMNS = ("mse", "mae", "psnr", "ssim", "edge_f1", "hf_psnr")


def _read_train_summary(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the train stage first")
    return json.loads(path.read_text())


@torch.no_grad()
def evaluate(cfg: Config, data: PreparedData, models_dir: Path, live: Live) -> dict[str, Any]:
    """Metrics and the latent scale factor from fp32 outputs on every device (`Runtime.fp32`),
    as the hand-off encodes, though training may have run under bf16 autocast."""
    runtime = select_runtime(cfg.train)
    with runtime.fp32():
        return _evaluate(cfg, data, models_dir, live, runtime)


def _evaluate(
    cfg: Config, data: PreparedData, models_dir: Path, live: Live, runtime: Runtime
) -> dict[str, Any]:
    checkpoint = load_checkpoint(models_dir / BEST)
    model, trained_cfg = model_from_checkpoint(checkpoint)
    model = model.to(runtime.device)
    image_size = trained_cfg.data.image_size

    per_image: dict[str, list[torch.Tensor]] = {name: [] for name in PER_IMAGE_COLUMNS}
    kld: list[torch.Tensor] = []
    latents: list[torch.Tensor] = []
    aux = metrics.AuxScore(data.aux_classes, data.aux_task, runtime.device)
    samples: tuple[torch.Tensor, ...] = ()
    loader = make_loader(data.dataset("val"), batch_size=cfg.evaluate.batch_size)
    for raw_images, raw_targets in loader:
        images, targets = to_model_input(raw_images, raw_targets, runtime.device)
        out = model(images)
        recon = out.reconstruction.clamp(0, 1)
        per_image["mse"].append(metrics.per_image_mse(images, recon))
        per_image["mae"].append(metrics.per_image_mae(images, recon))
        per_image["psnr"].append(metrics.per_image_psnr(images, recon))
        per_image["ssim"].append(metrics.per_image_ssim(images, recon))
        per_image["edge_f1"].append(metrics.edge_f1(images, recon))
        per_image["hf_psnr"].append(metrics.high_frequency_psnr(images, recon))
        aux.update(out.aux_logits, targets)
        if out.mean is not None:
            kld.append(metrics.gaussian_kld(out.mean, out.logvar))
        latents.append(out.latent.cpu())
        if not samples:
            samples = (images, recon, out.latent)
    columns = {name: torch.cat(values).cpu() for name, values in per_image.items()}
    all_latents = torch.cat(latents)

    summary: dict[str, Any] = {name: float(values.mean()) for name, values in columns.items()}
    summary["psnr_pooled"] = metrics.pooled_psnr(columns["mse"])
    summary |= {f"psnr_{k}": v for k, v in metrics.percentiles(columns["psnr"]).items()}
    summary |= aux.compute()
    if kld:
        summary["kld"] = float(torch.cat(kld).mean())

    h, w, c = trained_cfg.latent_shape
    stats = metrics.latent_statistics(all_latents, image_size)
    summary["latent"] = {
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
    summary["smoothness"] = _smoothness(model, samples, runtime.device, cfg.seed)
    summary["cost"] = _cost(model, samples[0], runtime)
    # Stability is a property of training: the train stage logs it, the gate here reads it.
    stability = _read_train_summary(TRAIN_LIVE_DIR / "metrics.json").get("stability", {})
    summary["gates"] = success_gates(
        {
            "mse": summary["mse"],
            "psnr": summary["psnr"],
            "latent.compression_ratio": stats["compression_ratio"],
            "stability.max_spike_ratio": stability.get("max_spike_ratio", math.nan),
            "stability.nonfinite_count": stability.get("nonfinite_count", 0),
        },
        cfg.evaluate,
    )

    _log_nested(live, summary)
    images, recon, latent = samples
    n = cfg.evaluate.num_sample_images
    live.log_image("reconstructions.png", reconstruction_grid(images[:n], recon[:n]))
    live.log_image("latent_channels.png", latent_channel_grid(latent[0]))
    table = pd.DataFrame(
        {"path": data.manifest.set_index("index").loc[data.split_indices("val"), "path"]}
    )
    table = table.reset_index(drop=True).assign(**{k: v.numpy() for k, v in columns.items()})
    table.sort_values("psnr").to_csv(EVALUATE_LIVE_DIR / PER_IMAGE_CSV, index=False)
    return summary


def _smoothness(model, samples, device: torch.device, seed: int) -> dict[str, float]:
    """Decode latent midpoints of neighbouring val images, and latents with 10% noise added."""
    images, _, latent = samples
    if len(latent) < 2:
        return {}
    detour = metrics.interpolation_quality(model.decode, latent[:-1], latent[1:])
    drop = metrics.noise_robustness(model.decode, latent, images, rel_sigma=0.1, seed=seed)
    return {"interpolation_detour": float(detour.mean()), "noise_psnr_drop_db": float(drop.mean())}


def _cost(model, images: torch.Tensor, runtime) -> dict[str, float]:
    latent = model.encode(images)
    with metrics.peak_memory(runtime.device) as peak:
        model.decode(model.encode(images))
    repeats = 2 if runtime.device.type == "cpu" else 20  # a fixed cost: keep it small here
    return {
        "params": metrics.count_parameters(model),
        "encode_images_per_s": metrics.measure_throughput(
            model.encode, images, repeats, runtime.device
        ),
        "decode_images_per_s": metrics.measure_throughput(
            model.decode, latent, repeats, runtime.device
        ),
        "peak_memory_mb": peak.bytes / 2**20,
    }


def _log_nested(live: Live, values: dict[str, Any], prefix: str = "") -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _log_nested(live, value, f"{prefix}{key}/")
        else:
            live.log_metric(f"{prefix}{key}", value, plot=False)
