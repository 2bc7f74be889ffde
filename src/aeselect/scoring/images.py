"""Pictures a person looks at: reconstruction grids, error heat maps, latent channel maps."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from aeselect.scoring.layout import GRID_PADDING


def to_pil(grid: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image, each value rounded to the nearest of 256 levels
    (to_pil_image would truncate a float tensor, darkening it by half a level on average)."""
    return to_pil_image((grid.clamp(0, 1) * 255).round().to(torch.uint8).cpu())


def error_heatmap(
    original: torch.Tensor, reconstruction: torch.Tensor, vmax: float = 0.25
) -> torch.Tensor:
    """Per-pixel mean absolute error as a black-red-yellow-white heat map, saturating at `vmax`."""
    error = (original - reconstruction).abs().mean(dim=1, keepdim=True).div(vmax).clamp(0, 1)
    return torch.cat(
        [(error * 3).clamp(0, 1), (error * 3 - 1).clamp(0, 1), (error * 3 - 2).clamp(0, 1)], 1
    )


def reconstruction_grid(
    originals: torch.Tensor, reconstructions: torch.Tensor, with_error: bool = True
) -> Image.Image:
    """One row per image: original | reconstruction (| absolute error heat map)."""
    originals = originals.float().cpu()
    reconstructions = reconstructions.float().cpu().clamp(0, 1)
    columns = [originals, reconstructions]
    if with_error:
        columns.append(error_heatmap(originals, reconstructions))
    tiles = torch.stack(columns, dim=1).flatten(0, 1)
    return to_pil(make_grid(tiles, nrow=len(columns), padding=GRID_PADDING, pad_value=1.0))


def latent_channel_grid(latent: torch.Tensor, tile: int = 64) -> Image.Image:
    """(C, h, w) latent of one image -> one grey tile per channel, each min-max normalised."""
    channels = latent.float().cpu().unsqueeze(1)
    low = channels.amin(dim=(2, 3), keepdim=True)
    high = channels.amax(dim=(2, 3), keepdim=True)
    normalised = (channels - low) / (high - low).clamp_min(1e-8)
    scale = max(1, tile // latent.shape[-1])
    normalised = torch.nn.functional.interpolate(normalised, scale_factor=scale, mode="nearest")
    return to_pil(
        make_grid(
            normalised.expand(-1, 3, -1, -1),
            nrow=min(8, len(channels)),
            padding=GRID_PADDING,
            pad_value=1.0,
        )
    )
