"""Image operations shared by data preparation (edge targets) and scoring (edge F1).

One definition of "an edge" keeps the auxiliary target and the spatial-detail metric consistent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Sobel gradient magnitude on luma in [0, 1]; the largest possible value is 4*sqrt(2) ~ 5.66.
# 0.5 marks a step of about 1/8 of the full range across a pixel: object boundaries, not noise.
EDGE_THRESHOLD = 0.5

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1, H, W) luma (ITU-R BT.601 weights).

    Not torchvision's rgb_to_grayscale: it weighs red 0.2989, which would move the edge targets
    of already prepared data and every edge F1 measured so far.
    """
    return (images * _LUMA.to(images).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, H, W) Sobel magnitude of luma (replicate padding)."""
    gray = F.pad(luma(images.float()), (1, 1, 1, 1), mode="replicate")
    kx = _SOBEL_X.to(gray).view(1, 1, 3, 3)
    gx = F.conv2d(gray, kx)
    gy = F.conv2d(gray, kx.transpose(2, 3))
    return torch.sqrt(gx * gx + gy * gy).squeeze(1)


def edge_map(images: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, H, W) bool edge map: Sobel magnitude above `threshold`."""
    return sobel_magnitude(images) > threshold
