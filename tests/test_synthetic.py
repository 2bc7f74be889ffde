"""The synthetic scenes: reproducible bytes, several classes, photo-like statistics, no noise."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aeselect.data.synthetic import SHAPES, generate_scenes


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def _scenes(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    scenes = []
    for image_path in sorted((folder / "images").glob("*.png")):
        with (
            Image.open(image_path) as image,
            Image.open(folder / "masks" / image_path.name) as mask,
        ):
            assert (image.mode, mask.mode) == ("RGB", "L")
            assert image.size == mask.size
            scenes.append((np.asarray(image), np.asarray(mask)))
    return scenes


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_scenes(tmp_path / name, num_images=4, image_size=32, num_classes=5, seed=seed)
    first = _files(tmp_path / "a")
    assert len(first) == 8  # 4 images + 4 masks
    assert first == _files(tmp_path / "b")
    other = _files(tmp_path / "c")
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if name.startswith("images/"))


def test_scene_does_not_depend_on_dataset_size(tmp_path: Path) -> None:
    generate_scenes(tmp_path / "few", num_images=2, image_size=16, num_classes=5, seed=0)
    generate_scenes(tmp_path / "many", num_images=5, image_size=16, num_classes=5, seed=0)
    few, many = _files(tmp_path / "few"), _files(tmp_path / "many")
    assert few == {name: many[name] for name in few}


@pytest.mark.parametrize("num_classes", [2, 5, len(SHAPES) + 3])
def test_masks_hold_several_valid_classes(tmp_path: Path, num_classes: int) -> None:
    generate_scenes(tmp_path, num_images=8, image_size=32, num_classes=num_classes, seed=1)
    masks = [mask for _, mask in _scenes(tmp_path)]
    assert len(masks) == 8
    present = np.unique(np.concatenate([m.ravel() for m in masks]))
    assert present.max() < num_classes
    assert len(present) >= min(num_classes, 4)  # background + several shape kinds
    assert all(len(np.unique(m)) >= 2 for m in masks)  # every scene shows at least one shape


def test_images_are_textured_not_flat(tmp_path: Path) -> None:
    generate_scenes(tmp_path, num_images=6, image_size=64, num_classes=5, seed=2)
    for image, mask in _scenes(tmp_path):
        pixels = image.reshape(-1, 3)
        assert pixels.std(axis=0).mean() > 10
        assert len(np.unique(pixels, axis=0)) > 200
        # Horizontal pixel differences: high-frequency content exists somewhere in the image.
        assert np.abs(np.diff(image.astype(int), axis=1)).max() > 60
        assert mask.shape == image.shape[:2]


def _gray_stack(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    scenes = _scenes(folder)
    gray = np.stack([image.astype(np.float64).mean(axis=2) for image, _ in scenes])
    return gray, np.stack([mask for _, mask in scenes])


def test_power_spectrum_falls_like_photographs(tmp_path: Path) -> None:
    """Dead leaves are scale-invariant: power ~ 1/f^a with a near 2 (photos) to 3, not flat."""
    generate_scenes(tmp_path, num_images=16, image_size=64, num_classes=5, seed=0)
    gray, _ = _gray_stack(tmp_path)
    power = np.abs(np.fft.fft2(gray - gray.mean(axis=(1, 2), keepdims=True))) ** 2
    freq = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij"))
    edges = np.geomspace(2 / 64, 0.5, 8)
    band_power = [
        power.mean(axis=0)[(freq >= lo) & (freq < hi)].mean()
        for lo, hi in itertools.pairwise(edges)
    ]
    slope = np.polyfit(np.log(np.sqrt(edges[:-1] * edges[1:])), np.log(band_power), 1)[0]
    assert -3.3 < slope < -1.7


def test_surfaces_are_smooth_not_noisy(tmp_path: Path) -> None:
    """Inside a surface (3x3 neighbourhood of one class) the Laplacian is small: shading and
    band-limited texture only. I.i.d. noise of std 3 grey levels alone would give ~12."""
    generate_scenes(tmp_path, num_images=16, image_size=64, num_classes=5, seed=0)
    gray, masks = _gray_stack(tmp_path)
    laplacian = np.abs(
        4 * gray[:, 1:-1, 1:-1]
        - gray[:, :-2, 1:-1]
        - gray[:, 2:, 1:-1]
        - gray[:, 1:-1, :-2]
        - gray[:, 1:-1, 2:]
    )
    windows = np.lib.stride_tricks.sliding_window_view(masks, (3, 3), axis=(1, 2))
    interior = windows.max(axis=(-1, -2)) == windows.min(axis=(-1, -2))
    assert interior.mean() > 0.5
    assert laplacian[interior].mean() < 6.0
    assert laplacian[~interior].mean() > 5 * laplacian[interior].mean()  # edges stay sharp


def test_large_images(tmp_path: Path) -> None:
    generate_scenes(tmp_path, num_images=1, image_size=512, num_classes=5, seed=0)
    ((image, mask),) = _scenes(tmp_path)
    assert image.shape == (512, 512, 3)
    assert len(np.unique(mask)) >= 2
