"""High-frequency energy of latents and images (Skorokhodov et al. 2025, arXiv 2502.14831): the
share of spectral power above half the Nyquist frequency, which grows with a latent's channels
and predicts how hard it is to diffuse."""

from __future__ import annotations

import torch
import torch.nn.functional as F

HALF_NYQUIST = 0.25  # cycles per sample: Nyquist is 0.5


def high_frequency_share(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N,): per channel, the share of the (mean-removed) 2-D power spectrum at
    radial frequencies above half Nyquist, averaged over channels. A constant channel counts 0;
    white noise reads about 0.80 (the corners of the frequency square outside that circle)."""
    maps = maps.double()
    maps = maps - maps.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(maps).abs().square()
    fy = torch.fft.fftfreq(maps.shape[-2], dtype=torch.float64)
    fx = torch.fft.fftfreq(maps.shape[-1], dtype=torch.float64)
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() > HALF_NYQUIST
    total = power.sum(dim=(-2, -1))
    share = (power * high).sum(dim=(-2, -1)) / total.clamp_min(torch.finfo(torch.float64).tiny)
    return share.mean(dim=1)


def downsampled(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images averaged over blocks down to `size` (the latent's resolution), to compare their
    high-frequency share with the latent's at the same sampling rate."""
    return F.adaptive_avg_pool2d(images, size)
