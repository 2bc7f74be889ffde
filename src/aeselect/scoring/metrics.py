"""Metrics that rank candidate autoencoders for a latent diffusion model.

Conventions: images are float tensors (N, 3, H, W) in [0, 1], so every pixel-space metric uses
data range 1.0 (clamp reconstructions to [0, 1] first, as a saved image would be); latents are
(N, C, h, w); auxiliary targets are int64 (N, H, W) and auxiliary logits (N, K, H, W).
Image metrics return one value per image, (N,), so callers can concatenate over a validation
set and report means and `percentiles`; the worst images matter as much as the average.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.benchmark import Timer
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassJaccardIndex,
)
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from aeselect.imageops import EDGE_THRESHOLD, edge_map

__all__ = [
    "PSNR_CAP_DB",
    "AuxScore",
    "PeakMemory",
    "edge_f1",
    "high_frequency_psnr",
    "interpolation_quality",
    "latent_statistics",
    "measure_throughput",
    "noise_robustness",
    "peak_memory",
    "per_image_mae",
    "per_image_mse",
    "per_image_psnr",
    "per_image_ssim",
    "percentiles",
    "pooled_psnr",
    "training_stability",
]

# Identical images have infinite PSNR; a finite cap keeps means and percentiles usable.
# 100 dB is an MSE of 1e-10, far below what float32 images and any real decoder reach.
PSNR_CAP_DB = 100.0

Images = torch.Tensor
Decode = Callable[[torch.Tensor], torch.Tensor]


def per_image_mse(original: Images, reconstruction: Images) -> torch.Tensor:
    """(N,) mean squared error over channels and pixels."""
    return (reconstruction.float() - original.float()).square().flatten(1).mean(dim=1)


def per_image_mae(original: Images, reconstruction: Images) -> torch.Tensor:
    """(N,) mean absolute error over channels and pixels."""
    return (reconstruction.float() - original.float()).abs().flatten(1).mean(dim=1)


def per_image_psnr(original: Images, reconstruction: Images) -> torch.Tensor:
    """(N,) PSNR in dB for data range 1.0, capped at PSNR_CAP_DB (identical images)."""
    psnr = peak_signal_noise_ratio(
        reconstruction.float(), original.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return psnr.clamp(max=PSNR_CAP_DB)


def pooled_psnr(per_image_mse: torch.Tensor) -> float:
    """PSNR of the whole set, 10 log10(1 / MSE) over all its pixels, data range 1.0, capped.

    The images are of one size, so the mean of their MSEs is the MSE over all pixels: this is
    the PSNR of the `mse` evaluate reports. `psnr`, the mean of per-image PSNRs, averages log
    errors instead; it is never below this one (Jensen), and a few near-perfect images lift it
    where they barely move this one.
    """
    return float((-10 * per_image_mse.double().mean().log10()).clamp(max=PSNR_CAP_DB))


def per_image_ssim(original: Images, reconstruction: Images) -> torch.Tensor:
    """(N,) SSIM as in Wang et al. 2004, in torchmetrics' default form, data range 1.0.

    Gaussian window sigma 1.5 (11x11), K1 0.01, K2 0.03, averaged over channels and pixels, so
    values compare with published tables. Border windows are reflect-padded (torchmetrics), where
    Wang's reference code averages the inner windows only; the two differ on small images (by
    about 0.01 on 32 px test images) and converge as images grow.
    """
    return structural_similarity_index_measure(
        reconstruction.float(), original.float(), data_range=1.0, reduction="none"
    )


def percentiles(values: torch.Tensor, qs: Sequence[float] = (5, 50, 95)) -> dict[str, float]:
    """{"p5": ..., "p50": ..., "p95": ...} of per-image values (linear interpolation)."""
    q = torch.tensor([float(x) / 100.0 for x in qs], dtype=torch.float64)
    result = torch.quantile(values.detach().double().flatten().cpu(), q)
    return {f"p{x:g}": float(v) for x, v in zip(qs, result, strict=True)}


def edge_f1(
    original: Images,
    reconstruction: Images,
    threshold: float = EDGE_THRESHOLD,
    tolerance_px: int = 1,
) -> torch.Tensor:
    """(N,) F1 between the Sobel edge maps of `imageops.edge_map`, with a matching tolerance.

    Precision is the share of reconstruction edge pixels within `tolerance_px` (Chebyshev
    distance, i.e. a (2t+1)^2 square) of an original edge pixel; recall is the same with the
    roles swapped. The tolerance keeps a one-pixel shift from counting as a lost edge. The
    value is 1.0 when neither image has edges and 0.0 when only one of them has.
    """
    kernel = 2 * tolerance_px + 1
    edges_o = edge_map(original, threshold).unsqueeze(1).float()
    edges_r = edge_map(reconstruction, threshold).unsqueeze(1).float()
    near_o = F.max_pool2d(edges_o, kernel, stride=1, padding=tolerance_px)
    near_r = F.max_pool2d(edges_r, kernel, stride=1, padding=tolerance_px)
    count_o = edges_o.flatten(1).sum(dim=1)
    count_r = edges_r.flatten(1).sum(dim=1)
    precision = (edges_r * near_o).flatten(1).sum(dim=1) / count_r.clamp(min=1.0)
    recall = (edges_o * near_r).flatten(1).sum(dim=1) / count_o.clamp(min=1.0)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where((count_o + count_r) == 0, torch.ones_like(f1), f1)


def _high_pass(images: Images, sigma: float) -> torch.Tensor:
    """images - gaussian_blur(images); the kernel spans +-3 sigma, reflect padding."""
    size = 2 * math.ceil(3 * sigma) + 1
    images = images.float()
    return images - TF.gaussian_blur(images, kernel_size=[size, size], sigma=[sigma, sigma])


def high_frequency_psnr(
    original: Images, reconstruction: Images, sigma: float = 1.0
) -> torch.Tensor:
    """(N,) PSNR of the high-pass bands x - gaussian_blur(x, sigma), data range 1.0, capped.

    Plain PSNR cannot tell a blurred reconstruction from one with a slight colour shift of the
    same MSE; this one can, because a colour shift leaves the high-pass band untouched. The
    band lies in [-1, 1], but data range 1.0 keeps the dB scale that of plain PSNR.
    """
    return per_image_psnr(_high_pass(original, sigma), _high_pass(reconstruction, sigma))


class AuxScore:
    """Auxiliary-head quality accumulated over batches (dataset-level, not a mean of batch means).

    The prediction is the argmax class. "segmentation": pixel accuracy and mIoU, where mIoU
    averages over classes present in the prediction or the target only (torchmetrics' rule),
    so classes absent from a small validation set do not count as 0. "edges" (2 classes,
    1 = edge): pixel accuracy and the F1 of the edge class, exact pixels, because the target
    was made with the same `edge_map` on the same grid.
    """

    def __init__(
        self,
        num_classes: int,
        task: Literal["segmentation", "edges"],
        device: torch.device | str = "cpu",
    ):
        if task not in ("segmentation", "edges"):
            raise ValueError(f"unknown aux task {task!r}: expected 'segmentation' or 'edges'")
        if task == "edges" and num_classes != 2:
            raise ValueError(
                f"the edges task has 2 classes (0 = background, 1 = edge), got {num_classes}"
            )
        # The scores of this process's batches alone: under DDP only rank 0 validates, and
        # torchmetrics would otherwise wait in compute() for the other ranks to sync.
        local = {"sync_on_compute": False}
        self.scores = {
            "aux_pixel_acc": MulticlassAccuracy(num_classes, average="micro", **local),
            "aux_f1" if task == "edges" else "aux_miou": (
                BinaryF1Score(**local)
                if task == "edges"
                else MulticlassJaccardIndex(num_classes, **local)
            ),
        }
        for score in self.scores.values():
            score.to(device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        preds = logits.argmax(dim=1)
        for score in self.scores.values():
            score.update(preds, targets)

    def compute(self) -> dict[str, float]:
        return {name: float(score.compute()) for name, score in self.scores.items()}


def latent_statistics(latents: torch.Tensor, image_size: int | tuple[int, int]) -> dict:
    """What a diffusion model will see: per-channel mean/std, overall std, size and compression.

    Standard deviations are population ones (correction 0). `scale_factor` = 1/std is the
    constant that gives the diffusion model unit-variance latents (SD's 0.18215).
    `compression_ratio` = 3*H*W / (C*h*w) for images of `image_size` (int for square).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    latents = latents.detach().float()
    per_channel = latents.transpose(0, 1).flatten(1)
    std = float(latents.std(correction=0))
    elements = latents[0].numel()
    return {
        "channel_mean": per_channel.mean(dim=1).tolist(),
        "channel_std": per_channel.std(dim=1, correction=0).tolist(),
        "std": std,
        "scale_factor": 1.0 / std,
        "elements_per_image": elements,
        "compression_ratio": 3 * height * width / elements,
    }


def interpolation_quality(
    decode: Decode, latents_a: torch.Tensor, latents_b: torch.Tensor
) -> torch.Tensor:
    """(N,) detour ratio of the decoded latent midpoint; 1.0 is best, larger is worse.

    ratio = (|D(m) - D(a)| + |D(m) - D(b)|) / |D(a) - D(b)|, m = (a + b) / 2, L2 norms in
    pixel space. Diffusion samples land between training latents; a latent space whose decoder
    makes a detour there (artefacts, noise, an unrelated image) rates poorly. The decoded
    endpoints, not the originals, are the reference, so reconstruction error does not count
    twice. The triangle inequality makes it >= 1; 1 means D(m) lies on the segment.
    """
    decoded_a = decode(latents_a).float().flatten(1)
    decoded_b = decode(latents_b).float().flatten(1)
    decoded_mid = decode((latents_a + latents_b) / 2).float().flatten(1)
    path = (decoded_mid - decoded_a).norm(dim=1) + (decoded_mid - decoded_b).norm(dim=1)
    direct = (decoded_a - decoded_b).norm(dim=1)
    return path / direct.clamp(min=torch.finfo(torch.float32).eps)


def noise_robustness(
    decode: Decode,
    latents: torch.Tensor,
    images: Images,
    rel_sigma: float = 0.1,
    seed: int = 0,
) -> torch.Tensor:
    """(N,) PSNR drop in dB when N(0, (rel_sigma * std(latents))^2) noise is added to latents.

    Diffusion sampling never returns latents exactly on the data manifold; a decoder that
    collapses under small latent noise makes a poor target. The noise is relative to the
    latents' overall std so differently scaled latent spaces are compared fairly, and is drawn
    from a generator seeded with `seed` on the latents' device.
    """
    generator = torch.Generator(device=latents.device).manual_seed(seed)
    sigma = rel_sigma * latents.float().std(correction=0)
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    clean = per_image_psnr(images, decode(latents))
    noisy = per_image_psnr(images, decode(latents + sigma.to(latents.dtype) * noise))
    return clean - noisy


def measure_throughput(
    fn: Callable[[torch.Tensor], object],
    batch: torch.Tensor,
    repeats: int = 10,
    device: torch.device | str = "cpu",
) -> float:
    """Images per second of `fn(batch)` under inference mode, the mean of `repeats` calls.

    torch.utils.benchmark.Timer makes 2 untimed warm-up calls first (they absorb cuDNN
    autotuning, allocator growth, compilation) and synchronises the accelerator around the timed
    calls, whose kernels run asynchronously; it runs on all of torch's threads, as evaluate does.
    """
    batch = batch.to(device)
    timer = Timer(
        "fn(batch)", globals={"fn": fn, "batch": batch}, num_threads=torch.get_num_threads()
    )
    with torch.inference_mode():
        seconds = timer.timeit(repeats).mean
    return batch.shape[0] / seconds


@dataclass
class PeakMemory:
    """Filled in when the `peak_memory` block exits."""

    bytes: int = 0
    approximate: bool = False


def _max_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@contextmanager
def peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Peak memory the block needed on top of what was in use when it started.

    CUDA: exact, torch.cuda.max_memory_allocated over the block minus the memory allocated at
    entry (tensors only, not the caching allocator's reserve). CPU: approximate, the growth of
    the process RSS high-water mark, which is 0 when an earlier peak was higher.
    """
    device = torch.device(device)
    result = PeakMemory(approximate=device.type != "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - start
    else:
        start = _max_rss_bytes()
        yield result
        result.bytes = _max_rss_bytes() - start


def training_stability(
    train_losses: Sequence[float],
    val_mse: Sequence[float],
    ema_span: int = 20,
    window: int = 2,
    rel_tol: float = 0.01,
) -> dict:
    """Whether a run trained cleanly and whether it had finished improving.

    nonfinite_count: NaN/inf training losses. max_spike_ratio: the largest loss divided by the
    EMA (pandas span `ema_span`, non-finite losses skipped) of the losses before it; NaN with
    fewer than two finite losses. val_still_improving: the best validation MSE of the last
    `window` evaluations beats the best before them by more than `rel_tol` (relative), i.e.
    the run was stopped too early to compare; also True when there are too few evaluations
    to tell.
    """
    losses = pd.Series(train_losses, dtype="float64")
    finite = losses.where(np.isfinite(losses))
    running_mean = finite.ewm(span=ema_span, ignore_na=True).mean().shift(1)
    spike = (finite / running_mean).max()
    val = pd.Series(val_mse, dtype="float64")
    still_improving = len(val) <= window or bool(
        val.iloc[-window:].min() < (1.0 - rel_tol) * val.iloc[:-window].min()
    )
    return {
        "nonfinite_count": int((~np.isfinite(losses)).sum()),
        "max_spike_ratio": float(spike),
        "val_still_improving": still_improving,
    }
