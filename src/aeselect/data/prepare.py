"""The `prepare` stage: a folder of images (real or synthetic) -> fixed-size arrays + manifest.

Every image is decoded once here, converted to RGB, resized and centre-cropped to
`data.image_size`, and streamed row by row into `images.npy` / `targets.npy`, so training and
evaluation memory-map the arrays instead of decoding files. Unusable files are listed in
`rejected.csv` with a reason (or stop the run with `data.on_bad_file=fail`); nothing under the
input folders is ever written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from aeselect.config import Config
from aeselect.data.synthetic import generate_scenes
from aeselect.imageops import edge_map

log = logging.getLogger(__name__)

# Lower-case suffixes, in order of preference when a mask exists with several of them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_COLUMNS = ("path", "mask_path", "split", "width", "height", "sha256", "index")
OUTPUT_NAMES = ("manifest.csv", "images.npy", "targets.npy", "rejected.csv", "meta.json")
SYNTHETIC_DIR = "synthetic"
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Files per batch handed to the decoding threads: bounds memory while keeping threads busy.
_BATCH = 256


class PrepareError(ValueError):
    """The input cannot produce a dataset; the message names what was searched and the fix."""


class _Rejected(Exception):
    """One unusable file; the message is the reason written to rejected.csv."""


@dataclass(frozen=True)
class PrepareSummary:
    """What the stage produced, for the CLI to print and tests to check."""

    aux_task: str  # "segmentation" (mask class ids) or "edges" (binary edge map)
    aux_classes: int
    num_train: int
    num_val: int
    num_rejected: int


class _FileInfo(NamedTuple):
    rel: str
    mask_rel: str
    width: int  # original size, before resizing
    height: int
    sha256: str


@dataclass(frozen=True)
class _Sample:
    info: _FileInfo
    image: np.ndarray  # (S, S, 3) uint8
    target: np.ndarray  # (S, S) uint8


@dataclass(frozen=True)
class _Job:
    rel: str
    path: Path
    mask_path: Path | None
    mask_rel: str
    size: int
    num_classes: int


def _scan(root: Path) -> list[str]:
    """Relative posix paths of files with an image suffix (any case), sorted."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def _mask_index(mask_root: Path) -> dict[str, str]:
    """{relative path without suffix: mask relative path}; .png first, then IMAGE_EXTENSIONS."""
    if not mask_root.is_dir():
        return {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    index: dict[str, str] = {}
    for rel in sorted(_scan(mask_root), key=lambda r: (rank[Path(r).suffix.lower()], r)):
        index.setdefault(Path(rel).with_suffix("").as_posix(), rel)
    return index


def _open(data: bytes, what: str) -> Image.Image:
    """Decode fully (not lazily) so truncation is caught here; EXIF rotation applied."""
    if not data:
        raise _Rejected(f"{what}empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise _Rejected(f"{what}not an image PIL can read (unknown or broken format)") from None
    except Image.DecompressionBombError as err:
        raise _Rejected(f"{what}too many pixels: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _Rejected(f"{what}corrupt or truncated image: {err}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB. Transparency is composited on white; 16-bit grey is scaled, not clipped."""
    if image.mode.startswith("I"):  # I;16 (16-bit PNG/TIFF) and I (32-bit int holding 16-bit)
        grey = np.asarray(image).astype(np.float64) * (255 / 65535)
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise _Rejected("unsupported mode F (floating-point pixels have no fixed range)")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    try:
        return image.convert("RGB")
    except ValueError:
        raise _Rejected(f"unsupported image mode {image.mode}") from None


def _mask_ids(mask: Image.Image, num_classes: int, mask_rel: str) -> Image.Image:
    """A single-channel mask of class ids (L, P palette indices, 1, I;16, I) -> mode L."""
    if mask.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
        raise _Rejected(f"mask has mode {mask.mode}; masks must be single-channel class ids")
    ids = np.asarray(mask)
    low, top = int(ids.min()), int(ids.max())
    if low < 0:  # mode I is signed 32-bit: -1 would wrap to 255 in uint8
        raise _Rejected(
            f"mask class id {low} in {mask_rel} is negative; class ids run from 0 (background) "
            f"to data.num_classes-1={num_classes - 1}: fix the mask"
        )
    if top >= num_classes:
        raise _Rejected(
            f"mask class id {top} in {mask_rel} >= data.num_classes={num_classes}; "
            "raise data.num_classes or fix the mask"
        )
    return Image.fromarray(ids.astype(np.uint8))


def _edges(rgb: np.ndarray) -> np.ndarray:
    """The shared edge definition (imageops.edge_map) on the resized image: {0, 1} targets."""
    pixels = torch.tensor(rgb).permute(2, 0, 1)[None].float() / 255
    return edge_map(pixels)[0].numpy().astype(np.uint8)


def _load(job: _Job) -> _Sample | _Rejected:
    """Decode, check and resize one image (and its mask); runs in a worker thread."""
    try:
        data = job.path.read_bytes()
        image = _open(data, "")
        width, height = image.size
        if min(width, height) < job.size:
            raise _Rejected(
                f"too small: {width}x{height}, shorter side {min(width, height)} "
                f"< data.image_size={job.size}"
            )
        # The centred square, resized in one resampling (== resize the shorter side, then crop).
        square = (job.size, job.size)
        rgb = np.asarray(ImageOps.fit(_to_rgb(image), square, Image.Resampling.LANCZOS))
        if job.mask_path is None:
            target = _edges(rgb)
        else:
            mask = _open(job.mask_path.read_bytes(), f"mask {job.mask_rel}: ")
            if mask.size != image.size:
                raise _Rejected(
                    f"mask {job.mask_rel} is {mask.size[0]}x{mask.size[1]} "
                    f"but the image is {width}x{height}"
                )
            ids = _mask_ids(mask, job.num_classes, job.mask_rel)
            target = np.asarray(ImageOps.fit(ids, square, Image.Resampling.NEAREST))
    except _Rejected as reason:
        return reason
    except OSError as err:  # unreadable file: permissions, vanished, I/O error
        return _Rejected(f"cannot read: {err}")
    digest = hashlib.sha256(data).hexdigest()
    return _Sample(_FileInfo(job.rel, job.mask_rel, width, height, digest), rgb, target)


def _load_all(jobs: list[_Job], workers: int) -> Iterator[tuple[_Job, _Sample | _Rejected]]:
    """Results in job order; PIL, numpy and torch release the GIL, so threads decode in parallel."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(jobs), _BATCH):
            batch = jobs[start : start + _BATCH]
            yield from zip(batch, pool.map(_load, batch), strict=True)


class _NpyRows:
    """Append rows to a .npy file without holding the array; the final row count is set at close.

    The header is written for `capacity` rows and rewritten for the rows actually appended
    (numpy pads headers so the first dimension can change without changing the header length),
    then the file is truncated: no second copy of a dataset that may be tens of gigabytes.
    """

    def __init__(self, path: Path, capacity: int, row_shape: tuple[int, ...]) -> None:
        self.row_shape, self.rows = row_shape, 0
        self.file: BinaryIO = path.open("wb")
        self._header(capacity)
        self.data_start = self.file.tell()

    def _header(self, rows: int) -> None:
        header = {"descr": "|u1", "fortran_order": False, "shape": (rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, row: np.ndarray) -> None:
        assert row.shape == self.row_shape and row.dtype == np.uint8, (row.shape, row.dtype)
        self.file.write(np.ascontiguousarray(row).tobytes())
        self.rows += 1

    def close(self) -> None:
        end = self.file.tell()
        self.file.seek(0)
        self._header(self.rows)
        if self.file.tell() != self.data_start:  # pragma: no cover - numpy format change
            raise RuntimeError(f"{self.file.name}: .npy header length changed on rewrite")
        self.file.truncate(end)
        self.file.close()


def _score(seed: int, key: str) -> float:
    """A stable pseudo-random fraction per key: adding keys never moves the others."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_for(contents: list[str], seed: int, val_fraction: float) -> list[str]:
    """'train'/'val' per image, decided by its content hash: score < val_fraction -> val.

    Equal contents (the same image under two names) always share a split, so val never holds
    a copy of a training image. With 2+ distinct contents both splits are guaranteed non-empty:
    if no content landed in val, the one with the lowest score (the closest to val) moves there;
    if none landed in train, the one with the highest score moves to train. Only such a forced
    content can change split when files are added.
    """
    scores = {content: _score(seed, content) for content in contents}
    val = {content for content, score in scores.items() if score < val_fraction}
    if len(scores) >= 2:
        if not val:
            val.add(min(scores, key=scores.__getitem__))
        if len(val) == len(scores):
            val.remove(max(scores, key=scores.__getitem__))
    return ["val" if content in val else "train" for content in contents]


def _readable_names(rels: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths whose names are UTF-8, rejected rows for the others): manifests and DVC store text.

    A rejected name is listed with its undecodable bytes as \\xNN escapes.
    """
    readable, rejected = [], []
    for rel in rels:
        name = os.fsencode(rel)
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            reason = "file name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf-8)"
            rejected.append((name.decode("utf-8", "backslashreplace"), reason))
        else:
            readable.append(rel)
    return readable, rejected


def _limit(rels: list[str], seed: int, limit: int) -> list[str]:
    """At most `limit` paths (0: all), a seeded pseudo-random subset kept in path order.

    A larger limit only adds paths to a smaller one's subset; rejected files are not replaced.
    """
    if not limit or len(rels) <= limit:
        return rels
    taken = set(sorted(rels, key=lambda rel: _score(seed, f"subset:{rel}"))[:limit])
    log.warning(
        "data.num_images=%d: taking %d of the %d images found (set data.num_images=0 for all)",
        limit,
        limit,
        len(rels),
    )
    return [rel for rel in rels if rel in taken]


def _check_separate(out_dir: Path, *inputs: Path) -> None:
    """Refuse overlapping input and output folders: outputs are deleted and rewritten."""
    out = out_dir.resolve()
    for folder in inputs:
        path = folder.resolve()
        if out == path or out.is_relative_to(path) or path.is_relative_to(out):
            raise PrepareError(
                f"output folder {out_dir} and input folder {folder} overlap; prepare never "
                "writes into its inputs: set data.root / data.mask_root to folders outside it"
            )


def _clear_outputs(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_NAMES:
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / SYNTHETIC_DIR, ignore_errors=True)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _input_folders(cfg: Config, out_dir: Path) -> tuple[Path, Path, list[str]]:
    """(image root, mask root, image paths); clears old outputs, generates synthetic scenes."""
    if cfg.data.source == "synthetic":
        _clear_outputs(out_dir)
        scenes = out_dir / SYNTHETIC_DIR
        data = cfg.data
        generate_scenes(scenes, data.num_images, data.image_size, data.num_classes, cfg.seed)
        root, mask_root = scenes / "images", scenes / "masks"
    else:
        root, mask_root = Path(cfg.data.root), Path(cfg.data.mask_root)
        _check_separate(out_dir, root, mask_root)
        _clear_outputs(out_dir)
    extensions = " ".join(IMAGE_EXTENSIONS)
    if not root.is_dir():
        raise PrepareError(
            f"data.root: image folder {root} does not exist; point data.root at a folder of "
            f"images ({extensions}) or set data.source=synthetic"
        )
    rels = _scan(root)
    if not rels:
        raise PrepareError(
            f"data.root: no images in {root} (searched recursively for {extensions}, any case); "
            "add images there, point data.root elsewhere or set data.source=synthetic"
        )
    return root, mask_root, rels


def _jobs(
    cfg: Config, root: Path, rels: list[str], mask_root: Path, masks: dict[str, str]
) -> tuple[list[_Job], list[tuple[str, str]]]:
    """(one decoding job per image, rejected rows): with masks in use, each image needs one."""
    jobs, rejected = [], []
    size, num_classes = cfg.data.image_size, cfg.data.num_classes
    for rel in rels:
        stem = Path(rel).with_suffix("").as_posix()
        mask_rel = masks.get(stem, "")
        if masks and not mask_rel:
            rejected.append((rel, f"no mask at {mask_root / stem}.*"))
        else:
            mask_path = mask_root / mask_rel if mask_rel else None
            jobs.append(_Job(rel, root / rel, mask_path, mask_rel, size, num_classes))
    return jobs, rejected


def prepare(cfg: Config, out_dir: Path, workers: int | None = None) -> PrepareSummary:
    """Build manifest.csv, images.npy, targets.npy, rejected.csv and meta.json in `out_dir`.

    `workers` decoding threads (default: up to 8, one per CPU); the output does not depend on it.
    """
    out_dir = Path(out_dir)
    root, mask_root, found = _input_folders(cfg, out_dir)
    readable, bad_names = _readable_names(found)
    rels = _limit(readable, cfg.seed, cfg.data.num_images)
    masks = _mask_index(mask_root)
    aux_task, aux_classes = ("segmentation", cfg.data.num_classes) if masks else ("edges", 2)
    jobs, no_masks = _jobs(cfg, root, rels, mask_root, masks)
    rejected = bad_names + no_masks
    fail = cfg.data.on_bad_file == "fail"
    if rejected and fail:
        raise PrepareError(_fail_message(*rejected[0]))
    infos = _decode_all(jobs, out_dir, cfg.data.image_size, workers, fail, rejected)
    rejected_csv = out_dir / "rejected.csv"
    _write_csv(rejected_csv, ("path", "reason"), sorted(rejected))
    contents = [info.sha256 for info in infos]
    if len(set(contents)) < 2:
        raise PrepareError(
            f"{len(infos)} usable image(s) ({len(set(contents))} distinct) of {len(found)} "
            f"under {root}; at least 2 distinct ones are needed (one train, one val; identical "
            f"files share a split): see {rejected_csv} for why files were rejected"
        )
    splits = split_for(contents, cfg.seed, cfg.data.val_fraction)
    rows = [
        (f.rel, f.mask_rel, split, f.width, f.height, f.sha256, index)
        for index, (f, split) in enumerate(zip(infos, splits, strict=True))
    ]
    _write_csv(out_dir / "manifest.csv", MANIFEST_COLUMNS, rows)
    num_val = splits.count("val")
    summary = PrepareSummary(aux_task, aux_classes, len(infos) - num_val, num_val, len(rejected))
    meta = {
        "source": cfg.data.source,
        "root": root.as_posix(),
        "aux_task": aux_task,
        "aux_classes": aux_classes,
        "image_size": cfg.data.image_size,
        "num_found": len(found),
        "num_over_limit": len(readable) - len(rels),  # left out by data.num_images
        "num_images": len(infos),
        "num_train": summary.num_train,
        "num_val": num_val,
        "num_rejected": len(rejected),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("prepare: %s (rejected files: %s)", meta, rejected_csv)
    return summary


def _decode_all(
    jobs: list[_Job],
    out_dir: Path,
    size: int,
    workers: int | None,
    fail: bool,
    rejected: list[tuple[str, str]],
) -> list[_FileInfo]:
    """Stream the usable images and targets into images.npy and targets.npy, in job order;
    unusable files are appended to `rejected` (or raise, with `fail`)."""
    images = _NpyRows(out_dir / "images.npy", len(jobs), (size, size, 3))
    targets = _NpyRows(out_dir / "targets.npy", len(jobs), (size, size))
    infos: list[_FileInfo] = []
    try:
        for job, result in _load_all(jobs, workers or min(8, os.cpu_count() or 1)):
            if isinstance(result, _Rejected):
                if fail:
                    raise PrepareError(_fail_message(job.rel, str(result)))
                rejected.append((job.rel, str(result)))
            else:
                images.append(result.image)
                targets.append(result.target)
                infos.append(result.info)
    finally:
        images.close()
        targets.close()
    return infos


def _fail_message(rel: str, reason: str) -> str:
    return (
        f"{rel}: {reason} (data.on_bad_file=fail stops at the first unusable file; "
        "fix or remove it, or set data.on_bad_file=skip to list it in rejected.csv)"
    )
