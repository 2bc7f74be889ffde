"""Deterministic ControlNet-like scenes: textured backgrounds, overlapping shapes, class masks.

The scenes stand in for a real dataset so the whole pipeline runs offline; they are written as
PNG files and read back through the same path as real images. Each scene has its own generator
seeded from (seed, index), so scene k is the same whatever `num_images` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# Local shape frame: (u, v) pixel offsets from the centre, rotated; r = radius, a = aspect ratio.
_Inside = Callable[[np.ndarray, np.ndarray, float, float], np.ndarray]


def _regular_polygon(sides: int) -> _Inside:
    normals = [2 * math.pi * (k + 0.5) / sides for k in range(sides)]

    def inside(u: np.ndarray, v: np.ndarray, r: float, a: float) -> np.ndarray:
        inradius = r * math.cos(math.pi / sides)
        return np.logical_and.reduce(
            [u * math.cos(t) + v * math.sin(t) <= inradius for t in normals]
        )

    return inside


def _star(u: np.ndarray, v: np.ndarray, r: float, a: float) -> np.ndarray:
    # Five spikes: radius swings between 0.45 r and r with the polar angle.
    phi = np.arctan2(v, u)
    return np.hypot(u, v) <= r * (0.725 + 0.275 * np.cos(5 * phi))


# Class k >= 1 draws SHAPES[(k - 1) % len(SHAPES)]; the order is part of the dataset definition.
SHAPES: dict[str, _Inside] = {
    "disc": lambda u, v, r, a: u * u + v * v <= r * r,
    "rectangle": lambda u, v, r, a: (np.abs(u) <= r) & (np.abs(v) <= r * a),
    "triangle": _regular_polygon(3),
    "ring": lambda u, v, r, a: np.abs(np.hypot(u, v) - 0.75 * r) <= 0.25 * r,
    "star": _star,
    "ellipse": lambda u, v, r, a: (u / r) ** 2 + (v / (r * a)) ** 2 <= 1,
    "hexagon": _regular_polygon(6),
}
_SHAPE_FNS = list(SHAPES.values())


def _supersampling(image_size: int) -> int:
    """Samples per pixel side for shape edges: 4x4 for small images, 2x2 keeps 512px fast."""
    return 4 if image_size <= 128 else 2


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A two-colour gradient, often overlaid with stripes, a checkerboard or pixel noise.

    Evaluated at pixel centres: stripes are at least 2.5 px per period (below Nyquist) and
    checker cells are whole pixels, so no supersampling is needed for the background.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c0, c1 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = x * math.cos(angle) + y * math.sin(angle)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    image = c0 + (c1 - c0) * t[..., None]
    texture = rng.choice(["plain", "stripes", "checker", "noise"])
    amplitude = rng.uniform(0.08, 0.3)
    if texture == "stripes":
        period, theta = rng.uniform(2.5, 8.0), rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * (x * math.cos(theta) + y * math.sin(theta)) / period)
        image += amplitude * wave[..., None]
    elif texture == "checker":
        cell = int(rng.integers(1, 5))
        checker = ((x // cell + y // cell) % 2) * 2 - 1
        image += amplitude * checker[..., None]
    elif texture == "noise":
        image += rng.normal(0.0, amplitude / 2, (size, size, 3)).astype(np.float32)
    return image


def _fill(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Shape colour: mostly flat, sometimes shaded or finely striped (detail to preserve)."""
    colour = rng.random(3, dtype=np.float32)
    style = rng.choice(["flat", "flat", "shaded", "striped"])
    if style == "shaded":
        return colour * (0.6 + 0.4 * np.clip(0.5 - v / (2 * r), 0, 1))[..., None]
    if style == "striped":
        period = rng.uniform(2.0, 5.0)
        second = rng.random(3, dtype=np.float32)
        return np.where((np.sin(2 * math.pi * u / period) > 0)[..., None], colour, second)
    return np.broadcast_to(colour, (*u.shape, 3))


def _box_mean(fine: np.ndarray, ss: int) -> np.ndarray:
    """(h*ss, w*ss, C) supersampled -> (h, w, C) pixel means (two contiguous sums, not mean)."""
    h, w, channels = fine.shape[0] // ss, fine.shape[1] // ss, fine.shape[2]
    rows = fine.reshape(h, ss, w, ss * channels).sum(axis=1)
    return rows.reshape(h, w, ss, channels).sum(axis=2) / (ss * ss)


def render_scene(
    rng: np.random.Generator, image_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 RGB and (H, W) uint8 class ids, 0 = background.

    Shapes are supersampled inside their bounding box only and alpha-composited by coverage,
    so edges are anti-aliased; a pixel's class is the shape covering at least half of it.
    """
    ss = _supersampling(image_size)
    image = _background(rng, image_size)
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 7))):  # later shapes occlude earlier ones
        cls = int(rng.integers(1, num_classes))
        r = rng.uniform(0.08, 0.3) * image_size
        aspect = rng.uniform(0.4, 1.0)
        cx, cy = (float(c) for c in rng.uniform(0, image_size, 2))
        theta = rng.uniform(0, 2 * math.pi)
        reach = r * math.sqrt(2)
        r0, r1 = (int(np.clip(c, 0, image_size)) for c in (cy - reach, cy + reach + 1))
        c0, c1 = (int(np.clip(c, 0, image_size)) for c in (cx - reach, cx + reach + 1))
        ys = (np.arange(r0 * ss, r1 * ss, dtype=np.float32) + 0.5) / ss - cy
        xs = (np.arange(c0 * ss, c1 * ss, dtype=np.float32) + 0.5) / ss - cx
        dy, dx = ys[:, None], xs[None, :]
        cos, sin = math.cos(theta), math.sin(theta)
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        inside = _SHAPE_FNS[(cls - 1) % len(_SHAPE_FNS)](u, v, r, aspect)
        weight = inside[..., None].astype(np.float32)
        pixels = _box_mean(np.concatenate([_fill(rng, u, v, r) * weight, weight], axis=2), ss)
        premultiplied, coverage = pixels[..., :3], pixels[..., 3:]
        box = image[r0:r1, c0:c1]
        box *= 1 - coverage
        box += premultiplied
        mask[r0:r1, c0:c1][coverage[..., 0] >= 0.5] = cls
    rgb = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return rgb, mask


def generate_scenes(
    out_dir: Path, num_images: int, image_size: int, num_classes: int, seed: int
) -> None:
    """Write out_dir/images/scene_NNNNN.png (RGB) and out_dir/masks/scene_NNNNN.png (L, ids)."""
    images_dir, masks_dir = Path(out_dir) / "images", Path(out_dir) / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        rng = np.random.Generator(np.random.PCG64([seed, index]))
        rgb, mask = render_scene(rng, image_size, num_classes)
        name = f"scene_{index:05d}.png"
        # Fixed encoder settings and no metadata: same seed, same bytes.
        Image.fromarray(rgb).save(images_dir / name, format="PNG", compress_level=6)
        Image.fromarray(mask).save(masks_dir / name, format="PNG", compress_level=6)
