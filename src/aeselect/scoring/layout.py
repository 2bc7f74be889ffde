"""Where each tile lies in the grids `scoring.images` draws, for code that crops a logged PNG.

PIL only: the phase report reads the grids back from experiments without importing torch.
"""

from __future__ import annotations

from PIL import Image

GRID_PADDING = 2  # pixels around every tile (torchvision make_grid's padding)


def tile_box(row: int, column: int, tile: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the `tile`-px tile at (row, column)."""
    step = tile + GRID_PADDING
    left, top = GRID_PADDING + column * step, GRID_PADDING + row * step
    return (left, top, left + tile, top + tile)


def grid_column(grid: Image.Image, column: int, tile: int) -> Image.Image:
    """Every row of one column of tiles, with the padding on both sides."""
    step = tile + GRID_PADDING
    return grid.crop((column * step, 0, (column + 1) * step + GRID_PADDING, grid.height))
