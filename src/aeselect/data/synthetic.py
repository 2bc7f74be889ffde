"""Deterministic dead-leaves scenes with per-pixel class masks: demo data with photo statistics.

The dead-leaves model (occluding shapes whose radii follow a power law, p(r) ~ r^-3) is
scale-invariant like photographs: its power spectrum falls as ~1/f^2, so most of the variance
sits in large, smooth regions and detail thins out towards small scales. Every shape is smoothly
shaded and carries a band-limited texture; nothing in a scene is i.i.d. pixel noise, which no
autoencoder could compress. Each shape class draws one kind of shape, so the masks stay a layout
a ControlNet can condition on.

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

# Radii as fractions of the image side: p(r) ~ r^-3 between these (the scale-invariant law).
RADIUS_RANGE = (0.04, 0.7)
SHAPES_PER_SCENE = (20, 50)
# Band-limited texture: periods between these fractions of the image side, 1/f amplitudes.
TEXTURE_PERIODS = (1 / 10, 1 / 2)
TEXTURE_AMPLITUDE = 0.06  # largest texture std on a shape, in [0, 1] intensity units
SHADING_STRENGTH = 0.35  # largest relative brightness change across a shape's radius


def _supersampling(image_size: int) -> int:
    """Samples per pixel side for shape edges: 4x4 for small images, 2x2 keeps 512px fast."""
    return 4 if image_size <= 128 else 2


def _power_law_radii(rng: np.random.Generator, count: int, image_size: int) -> np.ndarray:
    """`count` radii in pixels with density ~ r^-3 on RADIUS_RANGE (inverse-CDF sampling)."""
    low, high = (fraction * image_size for fraction in RADIUS_RANGE)
    u = rng.random(count)
    return (low**-2 - u * (low**-2 - high**-2)) ** -0.5


def _band_limited_textures(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """(count, size, size) unit-std fields: white noise filtered to a 1/f band of periods."""
    noise = rng.standard_normal((count, size, size))
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.rfftfreq(size), indexing="ij"))
    low, high = 1 / (TEXTURE_PERIODS[1] * size), 1 / (TEXTURE_PERIODS[0] * size)
    gain = np.where((f >= low) & (f <= high), 1 / np.maximum(f, 1e-9), 0.0)
    fields = np.fft.irfft2(np.fft.rfft2(noise) * gain, s=(size, size))
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return fields.astype(np.float32)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A surface colour: a lightness with a moderate, channel-correlated tint, as in photos."""
    lightness = rng.uniform(0.08, 0.92)
    return np.clip(lightness + rng.normal(0.0, 0.12, 3), 0.02, 0.98).astype(np.float32)


def _surface(
    rng: np.random.Generator,
    dx: np.ndarray,
    dy: np.ndarray,
    r: float,
    texture: np.ndarray,
) -> np.ndarray:
    """(h, w, 3) shaded, textured colour of a surface at offsets (dx, dy) from its centre."""
    gradient = rng.normal(0.0, SHADING_STRENGTH / 2, 2) / r
    shading = 1.0 + np.clip(
        dx * gradient[0] + dy * gradient[1], -SHADING_STRENGTH, SHADING_STRENGTH
    )
    detail = rng.uniform(0.0, TEXTURE_AMPLITUDE) * texture
    return _colour(rng) * shading[..., None] + detail[..., None]


def _box_mean(fine: np.ndarray, ss: int) -> np.ndarray:
    """(h*ss, w*ss) supersampled -> (h, w) pixel means (two contiguous sums, not mean)."""
    h, w = fine.shape[0] // ss, fine.shape[1] // ss
    return fine.reshape(h, ss, w, ss).sum(axis=(1, 3)) / (ss * ss)


def render_scene(
    rng: np.random.Generator, image_size: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 RGB and (H, W) uint8 class ids, 0 = background.

    The background (class 0) is a shaded, textured surface; shapes fall on it back to front,
    each supersampled inside its bounding box only for an anti-aliased coverage, then composited
    by coverage; a pixel's class is the shape covering at least half of it. Colour is evaluated
    at pixel centres: shading and texture are smooth at the pixel scale.
    """
    ss = _supersampling(image_size)
    textures = _band_limited_textures(rng, image_size, 2)
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    centre = image_size / 2
    image = _surface(rng, x - centre, y - centre, image_size / 2, textures[0])
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    count = int(rng.integers(*SHAPES_PER_SCENE, endpoint=True))
    for r in _power_law_radii(rng, count, image_size):
        cls = int(rng.integers(1, num_classes))
        aspect = rng.uniform(0.4, 1.0)
        cx, cy = (float(c) for c in rng.uniform(-0.1 * image_size, 1.1 * image_size, 2))
        theta = rng.uniform(0, 2 * math.pi)
        reach = r * math.sqrt(2)
        r0, r1 = (int(np.clip(c, 0, image_size)) for c in (cy - reach, cy + reach + 1))
        c0, c1 = (int(np.clip(c, 0, image_size)) for c in (cx - reach, cx + reach + 1))
        # Draw the shape's attributes even when it falls outside: the stream stays aligned.
        surface = _surface(
            rng, x[r0:r1, c0:c1] - cx, y[r0:r1, c0:c1] - cy, r, textures[1, r0:r1, c0:c1]
        )
        if r1 <= r0 or c1 <= c0:
            continue
        ys = (np.arange(r0 * ss, r1 * ss, dtype=np.float32) + 0.5) / ss - cy
        xs = (np.arange(c0 * ss, c1 * ss, dtype=np.float32) + 0.5) / ss - cx
        dy, dx = ys[:, None], xs[None, :]
        cos, sin = math.cos(theta), math.sin(theta)
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        inside = _SHAPE_FNS[(cls - 1) % len(_SHAPE_FNS)](u, v, r, aspect)
        coverage = _box_mean(inside.astype(np.float32), ss)
        box = image[r0:r1, c0:c1]
        box += coverage[..., None] * (surface - box)
        mask[r0:r1, c0:c1][coverage >= 0.5] = cls
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
