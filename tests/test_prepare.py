"""The prepare stage on real files: both sources, every kind of bad input, stable splits."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aeselect.config import Config, from_dict
from aeselect.data.prepare import MANIFEST_COLUMNS, PrepareError, prepare, split_for
from aeselect.imageops import edge_map

SIZE = 16


def _cfg(tmp_path: Path, **data: object) -> Config:
    folders = {"root": str(tmp_path / "raw"), "mask_root": str(tmp_path / "masks")}
    return from_dict({"data": {"source": "folder", "image_size": SIZE, **folders, **data}})


def _pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random blocks: edges and colour, reproducible."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)[:height, :width]


def _save(path: Path, image: Image.Image | np.ndarray, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.save(path, **options)
    return path


def _good(root: Path, rel: str, width: int = 24, height: int = 20, seed: int = 0) -> Path:
    return _save(root / rel, _pattern(width, height, seed))


def _read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
    return image


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _rejected(out: Path) -> dict[str, str]:
    return {row["path"]: row["reason"] for row in _csv(out / "rejected.csv")}


def _tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(folder.rglob("*"))
    }


def _arrays(out: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(out / "images.npy", mmap_mode="r"), np.load(out / "targets.npy", mmap_mode="r")


def test_synthetic_source_goes_through_files(tmp_path: Path) -> None:
    cfg = from_dict({"seed": 1, "data": {"num_images": 10, "image_size": SIZE, "num_classes": 4}})
    out = tmp_path / "prepared"
    summary = prepare(cfg, out)
    assert (summary.aux_task, summary.aux_classes, summary.num_rejected) == ("segmentation", 4, 0)
    assert summary.num_train + summary.num_val == 10 and summary.num_val >= 1
    images, targets = _arrays(out)
    assert images.shape == (10, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert targets.shape == (10, SIZE, SIZE) and int(targets.max()) < 4
    manifest = _csv(out / "manifest.csv")
    assert list(manifest[0]) == list(MANIFEST_COLUMNS)
    first = out / "synthetic" / "images" / manifest[0]["path"]
    # Scenes are generated at the target size: the cached row is exactly the PNG's pixels.
    np.testing.assert_array_equal(images[0], np.asarray(_read(first)))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "synthetic" and meta["aux_classes"] == 4 and meta["num_images"] == 10
    assert _csv(out / "rejected.csv") == []
    assert (out / "rejected.csv").read_text() == "path,reason\n"

    # A rerun with fewer scenes replaces everything: no stale scenes or rows survive.
    prepare(from_dict({"data": {"num_images": 3, "image_size": SIZE}}), out)
    assert _arrays(out)[0].shape[0] == 3
    assert len(list((out / "synthetic" / "images").iterdir())) == 3


def test_folder_without_masks_gets_edge_targets(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    bands = np.zeros((SIZE, 3 * SIZE, 3), dtype=np.uint8)
    bands[:, :SIZE, 0] = bands[:, SIZE : 2 * SIZE, 1] = bands[:, 2 * SIZE :, 2] = 255
    _save(raw / "a_bands.png", bands)  # 48x16: the centre crop is the pure green band
    _good(raw, "nested/deeper/b.JPG", 40, 64, seed=1)
    _good(raw, "c.webp", 30, 30, seed=2)
    _good(raw, "d.Tiff", 17, 33, seed=3)
    (raw / "notes.txt").write_text("not an image extension: ignored, not rejected")
    summary = prepare(_cfg(tmp_path), tmp_path / "out")

    assert (summary.aux_task, summary.aux_classes, summary.num_rejected) == ("edges", 2, 0)
    manifest = _csv(tmp_path / "out" / "manifest.csv")
    paths = [row["path"] for row in manifest]
    assert paths == sorted(["a_bands.png", "nested/deeper/b.JPG", "c.webp", "d.Tiff"])
    assert [int(row["index"]) for row in manifest] == [0, 1, 2, 3]
    for row in manifest:
        data = (raw / row["path"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["mask_path"] == ""
        assert (int(row["width"]), int(row["height"])) == _read(raw / row["path"]).size

    images, targets = _arrays(tmp_path / "out")
    assert (images[0] == [0, 255, 0]).all()
    pixels = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_array_equal(targets, edge_map(pixels).numpy().astype(np.uint8))
    assert set(np.unique(targets)) == {0, 1}


def test_masks_give_segmentation_targets(tmp_path: Path) -> None:
    raw, masks = tmp_path / "raw", tmp_path / "masks"
    ids = np.zeros((20, 24), dtype=np.uint8)
    ids[5:15, 6:18] = 3
    for rel in ("a.jpg", "sub/b.png", "c.png", "no_mask.png"):
        _good(raw, rel)
    _save(masks / "a.png", ids)
    _save(masks / "a.bmp", np.full_like(ids, 1))  # .png is preferred over other extensions
    _save(masks / "sub" / "b.bmp", ids)
    palette = Image.fromarray(ids, "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    _save(masks / "c.png", palette)  # palette masks hold class ids as indices (VOC style)
    summary = prepare(_cfg(tmp_path), tmp_path / "out")

    assert (summary.aux_task, summary.aux_classes) == ("segmentation", 5)
    manifest = _csv(tmp_path / "out" / "manifest.csv")
    assert [(r["path"], r["mask_path"]) for r in manifest] == [
        ("a.jpg", "a.png"),
        ("c.png", "c.png"),
        ("sub/b.png", "sub/b.bmp"),
    ]
    _, targets = _arrays(tmp_path / "out")
    for target in targets:
        assert set(np.unique(target)) == {0, 3}  # NEAREST: no invented in-between ids
    assert _rejected(tmp_path / "out") == {"no_mask.png": f"no mask at {masks / 'no_mask'}.*"}


def test_bad_files_are_rejected_with_reasons(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _good(raw, "good1.png")
    _good(raw, "good2.png", seed=1)
    whole = _good(raw, "truncated.png", 64, 64).read_bytes()
    (raw / "truncated.png").write_bytes(whole[: len(whole) // 2])
    jpeg = _save(raw / "cut.jpg", _pattern(64, 64), quality=90).read_bytes()
    (raw / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (raw / "text.png").write_text("this is not a picture\n")
    (raw / "empty.jpeg").write_bytes(b"")
    _good(raw, "small.png", 40, SIZE - 1)
    summary = prepare(_cfg(tmp_path), tmp_path / "out")

    reasons = _rejected(tmp_path / "out")
    assert sorted(reasons) == ["cut.jpg", "empty.jpeg", "small.png", "text.png", "truncated.png"]
    assert reasons["truncated.png"].startswith("corrupt or truncated image")
    assert reasons["cut.jpg"].startswith("corrupt or truncated image")
    assert reasons["text.png"].startswith("not an image")
    assert reasons["empty.jpeg"] == "empty file (0 bytes)"
    assert "40x15" in reasons["small.png"] and f"data.image_size={SIZE}" in reasons["small.png"]
    assert (summary.num_train + summary.num_val, summary.num_rejected) == (2, 5)
    images, targets = _arrays(tmp_path / "out")  # rows reserved for rejects are cut off
    assert images.shape[0] == targets.shape[0] == 2
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["num_rejected"] == 5


def test_huge_and_rotated_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw"
    _good(raw, "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees for display
    _save(raw / "rotated.jpg", _pattern(32, 20), exif=exif)
    _good(raw, "huge.png", 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 40x40 > 2x the limit: a "bomb"
    prepare(_cfg(tmp_path), tmp_path / "out")

    assert _rejected(tmp_path / "out")["huge.png"].startswith("too many pixels")
    sizes = {r["path"]: (r["width"], r["height"]) for r in _csv(tmp_path / "out" / "manifest.csv")}
    assert sizes == {"a.png": ("24", "20"), "rotated.jpg": ("20", "32")}  # as displayed


def test_image_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _save(raw / "grey.png", np.full((SIZE, SIZE), 100, dtype=np.uint8))
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[:, :, 0] = 255
    rgba[:, : SIZE // 2, 3] = 255  # left half opaque red, right half fully transparent
    _save(raw / "rgba.png", rgba)
    palette = Image.fromarray(np.tile(np.arange(SIZE, dtype=np.uint8) % 2, (SIZE, 1)), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50])
    _save(raw / "palette.png", palette)
    deep = np.full((SIZE, SIZE), 65535, dtype=np.uint16)
    deep[:, : SIZE // 2] = 32896  # 128 * 257: mid grey in 16 bit
    _save(raw / "deep16.png", Image.fromarray(deep))
    _save(raw / "cmyk.tif", Image.new("CMYK", (SIZE, SIZE), (255, 0, 0, 0)))
    assert _read(raw / "deep16.png").mode == "I;16"
    prepare(_cfg(tmp_path), tmp_path / "out")

    rows = {row["path"]: int(row["index"]) for row in _csv(tmp_path / "out" / "manifest.csv")}
    assert len(rows) == 5
    images, _ = _arrays(tmp_path / "out")
    assert (images[rows["grey.png"]] == 100).all()
    # Transparency is composited on white: transparent pixels become white, not black.
    assert (images[rows["rgba.png"]][:, : SIZE // 2] == [255, 0, 0]).all()
    assert (images[rows["rgba.png"]][:, SIZE // 2 :] == 255).all()
    assert (images[rows["palette.png"]][:, 0::2] == [10, 20, 30]).all()
    assert (images[rows["palette.png"]][:, 1::2] == [200, 100, 50]).all()
    # 16 bit is scaled by 255/65535, not clipped (clipping would make both halves 255).
    assert (images[rows["deep16.png"]][:, : SIZE // 2] == 128).all()
    assert (images[rows["deep16.png"]][:, SIZE // 2 :] == 255).all()
    assert (images[rows["cmyk.tif"]] == [0, 255, 255]).all()  # pure cyan ink


def test_bad_masks_are_rejected(tmp_path: Path) -> None:
    raw, masks = tmp_path / "raw", tmp_path / "masks"
    for rel in ("ok.png", "big_mask.png", "high_id.png", "rgb_mask.png", "broken_mask.png"):
        _good(raw, rel)
    _good(raw, "negative.png")
    signed = np.zeros((20, 24), dtype=np.int32)
    signed[3, 4] = -1  # would wrap to class 255 as uint8
    _save(masks / "negative.tif", Image.fromarray(signed))
    assert _read(masks / "negative.tif").mode == "I"
    _save(masks / "ok.png", np.zeros((20, 24), dtype=np.uint8))
    _save(masks / "big_mask.png", np.zeros((21, 24), dtype=np.uint8))
    _save(masks / "high_id.png", np.full((20, 24), 7, dtype=np.uint8))
    _save(masks / "rgb_mask.png", np.zeros((20, 24, 3), dtype=np.uint8))
    (masks / "broken_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(PrepareError, match="1 usable image"):
        prepare(_cfg(tmp_path, num_classes=5), tmp_path / "out")

    reasons = _rejected(tmp_path / "out")
    assert reasons["big_mask.png"] == "mask big_mask.png is 24x21 but the image is 24x20"
    assert "mask class id 7 in high_id.png" in reasons["high_id.png"]
    assert "data.num_classes=5" in reasons["high_id.png"]
    assert reasons["negative.png"].startswith("mask class id -1 in negative.tif is negative")
    assert "mode RGB" in reasons["rgb_mask.png"]
    assert reasons["broken_mask.png"].startswith("mask broken_mask.png: ")
    assert len(reasons) == 5


def test_file_names_that_are_not_utf8_are_rejected(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _good(raw, "a.png")
    _good(raw, "b.png", seed=1)
    _good(raw, os.fsdecode(b"caf\xe9.png"), seed=2)  # 'café' in Latin-1
    _good(raw, os.fsdecode(b"d\xff/c.png"), seed=3)  # a folder name is part of the path
    summary = prepare(_cfg(tmp_path), tmp_path / "out")

    reason = "file name is not valid UTF-8; rename it (e.g. convmv -f latin1 -t utf-8)"
    assert _rejected(tmp_path / "out") == {"caf\\xe9.png": reason, "d\\xff/c.png": reason}
    assert (summary.num_train + summary.num_val, summary.num_rejected) == (2, 2)
    assert [row["path"] for row in _csv(tmp_path / "out" / "manifest.csv")] == ["a.png", "b.png"]
    with pytest.raises(PrepareError, match=r"caf\\xe9\.png: file name is not valid UTF-8"):
        prepare(_cfg(tmp_path, on_bad_file="fail"), tmp_path / "out")


def test_identical_images_share_a_split(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "copies").mkdir(parents=True)
    for i in range(12):
        original = _good(raw, f"img{i:02d}.png", seed=i)
        shutil.copy(original, raw / "copies" / f"dup{i:02d}.png")
    prepare(_cfg(tmp_path, val_fraction=0.5), tmp_path / "out")

    splits: dict[str, set[str]] = {}
    for row in _csv(tmp_path / "out" / "manifest.csv"):
        splits.setdefault(row["sha256"], set()).add(row["split"])
    assert len(splits) == 12
    assert all(len(split) == 1 for split in splits.values())  # no image in both train and val
    assert set().union(*splits.values()) == {"train", "val"}
    # Forcing a split non-empty moves every copy: ["x", "x", "y"] never puts an "x" in both.
    assert split_for(["x", "x", "y"], seed=0, val_fraction=1e-9) in (
        ["val", "val", "train"],
        ["train", "train", "val"],
    )


def test_copies_of_one_image_are_not_a_dataset(tmp_path: Path) -> None:
    original = _good(tmp_path / "raw", "a.png")
    shutil.copy(original, tmp_path / "raw" / "b.png")
    with pytest.raises(PrepareError, match=r"2 usable image\(s\) \(1 distinct\).*2 distinct"):
        prepare(_cfg(tmp_path), tmp_path / "out")


def test_num_images_takes_a_seeded_subset_of_a_folder(tmp_path: Path) -> None:
    for i in range(8):
        _good(tmp_path / "raw", f"img{i}.png", seed=i)
    taken = {}
    for limit in (0, 3, 5):
        prepare(_cfg(tmp_path, num_images=limit), tmp_path / f"n{limit}")
        manifest = _csv(tmp_path / f"n{limit}" / "manifest.csv")
        taken[limit] = [row["path"] for row in manifest]
        meta = json.loads((tmp_path / f"n{limit}" / "meta.json").read_text())
        assert (meta["num_found"], meta["num_images"]) == (8, len(taken[limit]))
        assert meta["num_over_limit"] == 8 - len(taken[limit])
    assert len(taken[0]) == 8 and len(taken[3]) == 3 and len(taken[5]) == 5
    assert taken[3] == sorted(taken[3]) != taken[0][:3]  # spread over the folder, in path order
    assert set(taken[3]) < set(taken[5])  # a larger limit only adds images


def test_inputs_are_never_modified(tmp_path: Path) -> None:
    raw, masks = tmp_path / "raw", tmp_path / "masks"
    for i in range(4):
        _good(raw, f"img{i}.png", seed=i)
        _save(masks / f"img{i}.png", np.ones((20, 24), dtype=np.uint8))
    (raw / "bad.png").write_bytes(b"junk")
    (raw / "no_mask.png").write_bytes((raw / "img0.png").read_bytes())
    before = (_tree(raw), _tree(masks))
    for _ in range(2):  # the second run overwrites the first run's outputs
        prepare(_cfg(tmp_path), tmp_path / "out")
    assert (_tree(raw), _tree(masks)) == before


def test_output_inside_input_is_refused(tmp_path: Path) -> None:
    for i in range(2):
        _good(tmp_path / "raw", f"img{i}.png", seed=i)
    before = _tree(tmp_path / "raw")
    with pytest.raises(PrepareError, match="overlap"):
        prepare(_cfg(tmp_path), tmp_path / "raw" / "prepared")
    assert _tree(tmp_path / "raw") == before


def test_on_bad_file_fail_stops_at_the_first_bad_file(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _good(raw, "a.png")
    (raw / "b.png").write_bytes(b"")
    _good(raw, "c.png", seed=1)
    with pytest.raises(PrepareError, match=r"b\.png: empty file .*data\.on_bad_file"):
        prepare(_cfg(tmp_path, on_bad_file="fail"), tmp_path / "out")


def test_on_bad_file_fail_covers_missing_masks(tmp_path: Path) -> None:
    _good(tmp_path / "raw", "a.png")
    _save(tmp_path / "masks" / "other.png", np.zeros((20, 24), dtype=np.uint8))
    with pytest.raises(PrepareError, match=r"a\.png: no mask at"):
        prepare(_cfg(tmp_path, on_bad_file="fail"), tmp_path / "out")


def test_missing_or_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match=r"raw does not exist.*data\.source=synthetic"):
        prepare(_cfg(tmp_path), tmp_path / "out")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "readme.txt").write_text("no images here")
    with pytest.raises(PrepareError, match=r"no images in .*raw.*\.png .*\.tiff"):
        prepare(_cfg(tmp_path), tmp_path / "out")


def test_all_files_rejected_points_to_rejected_csv(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "raw" / name).write_bytes(b"garbage")
    with pytest.raises(PrepareError, match=r"0 usable image.*rejected\.csv"):
        prepare(_cfg(tmp_path), tmp_path / "out")
    assert sorted(_rejected(tmp_path / "out")) == ["a.png", "b.jpg"]


def test_split_is_stable_when_files_are_added(tmp_path: Path) -> None:
    for i in range(12):
        _good(tmp_path / "raw", f"img{i:02d}.png", seed=i)
    prepare(_cfg(tmp_path), tmp_path / "before")
    _good(tmp_path / "raw", "img_new.png", seed=99)
    _good(tmp_path / "raw", "a_first.png", seed=98)  # shifts every row index by one
    prepare(_cfg(tmp_path), tmp_path / "after")

    before = {r["path"]: r["split"] for r in _csv(tmp_path / "before" / "manifest.csv")}
    after = {r["path"]: r["split"] for r in _csv(tmp_path / "after" / "manifest.csv")}
    assert {path: after[path] for path in before} == before
    assert {"train", "val"} <= set(before.values())
    other_seed = from_dict({"seed": 5, "data": _cfg(tmp_path).to_dict()["data"]})
    prepare(other_seed, tmp_path / "reseeded")
    reseeded = {r["path"]: r["split"] for r in _csv(tmp_path / "reseeded" / "manifest.csv")}
    assert reseeded != after


def test_both_splits_are_never_empty() -> None:
    paths = [f"img{i}.png" for i in range(5)]
    assert split_for(paths[:2], seed=0, val_fraction=1e-9).count("val") == 1
    assert split_for(paths[:2], seed=0, val_fraction=1 - 1e-9).count("train") == 1
    assert split_for(paths, seed=0, val_fraction=1e-9).count("val") == 1
    many = [f"img{i}.png" for i in range(400)]
    assert 0.15 < split_for(many, seed=0, val_fraction=0.25).count("val") / 400 < 0.35


def test_thread_count_does_not_change_outputs(tmp_path: Path) -> None:
    for i in range(6):
        _good(tmp_path / "raw", f"img{i}.png", 30, 20, seed=i)
    (tmp_path / "raw" / "bad.png").write_bytes(b"junk")
    for workers in (1, 3):
        prepare(_cfg(tmp_path), tmp_path / f"w{workers}", workers=workers)
    for name in ("images.npy", "targets.npy", "manifest.csv", "rejected.csv", "meta.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes()
