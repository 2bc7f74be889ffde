"""The logged pictures: pixel values survive the PNG round trip, and scoring.layout finds each
tile where scoring.images drew it (the phase report crops them by that geometry)."""

from __future__ import annotations

import numpy as np
import torch

from aeselect.scoring.images import reconstruction_grid, to_pil
from aeselect.scoring.layout import GRID_PADDING, grid_column, tile_box


def test_to_pil_rounds_to_the_nearest_level():
    # (R, G, B) of two pixels; truncating (to_pil_image's way) would give 127 and 0 for 1.
    red, green, blue = [0.0, 0.5], [1.0, 0.3 / 255], [0.7 / 255, 2.0]
    image = torch.tensor([red, green, blue]).view(3, 1, 2)
    assert np.asarray(to_pil(image)).tolist() == [[[0, 255, 1], [128, 0, 255]]]


def test_layout_finds_every_tile_of_a_reconstruction_grid():
    generator = torch.Generator().manual_seed(0)
    originals = torch.rand(3, 3, 8, 8, generator=generator)
    reconstructions = torch.rand(3, 3, 8, 8, generator=generator)
    grid = reconstruction_grid(originals, reconstructions)  # columns: original, recon, error
    for row in range(3):
        for column, tiles in ((0, originals), (1, reconstructions)):
            tile = np.asarray(grid.crop(tile_box(row, column, 8)), dtype=np.float32) / 255
            expected = tiles[row].permute(1, 2, 0).numpy()
            assert np.abs(tile - expected).max() <= 0.5 / 255 + 1e-6
    column = grid_column(grid, 1, 8)
    assert column.size == (8 + 2 * GRID_PADDING, grid.height)
    assert column.crop(tile_box(2, 0, 8)) == grid.crop(tile_box(2, 1, 8))
