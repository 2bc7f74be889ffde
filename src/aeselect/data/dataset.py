"""Training-time access to the prepared cache: no image decoding, one memmap read per batch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from aeselect.paths import PREPARED_DIR


@dataclass(frozen=True)
class PreparedData:
    """The arrays and metadata that the `prepare` stage wrote."""

    directory: Path
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped
    targets: np.ndarray  # (N, H, W) uint8, memory-mapped
    manifest: pd.DataFrame
    aux_task: str
    aux_classes: int

    @classmethod
    def load(cls, directory: str | Path = PREPARED_DIR) -> PreparedData:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{meta_path} is missing: run the prepare stage first "
                "(`dvc exp run` or `aeselect prepare`)"
            )
        meta = json.loads(meta_path.read_text())
        return cls(
            directory=directory,
            images=np.load(directory / "images.npy", mmap_mode="r"),
            targets=np.load(directory / "targets.npy", mmap_mode="r"),
            manifest=pd.read_csv(directory / "manifest.csv", keep_default_na=False),
            aux_task=meta["aux_task"],
            aux_classes=int(meta["aux_classes"]),
        )

    def split_indices(self, split: str) -> np.ndarray:
        rows = self.manifest[self.manifest["split"] == split]
        return rows["index"].to_numpy(dtype=np.int64)

    def dataset(self, split: str) -> CacheDataset:
        return CacheDataset(self.images, self.targets, self.split_indices(split))


class CacheDataset(Dataset):
    """Rows of the prepared cache; `__getitems__` reads a whole batch with one fancy index."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, indices: np.ndarray):
        self.images = images
        self.targets = targets
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.indices[np.asarray(items)]
        order = np.argsort(rows)  # ascending reads are sequential on the memmap
        images = np.empty((len(rows), *self.images.shape[1:]), dtype=np.uint8)
        targets = np.empty((len(rows), *self.targets.shape[1:]), dtype=np.uint8)
        images[order] = self.images[rows[order]]
        targets[order] = self.targets[rows[order]]
        return [(torch.from_numpy(images), torch.from_numpy(targets))]


def _collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    (images, targets) = batch[0]
    return images, targets


class StepBatchSampler(Sampler[list[int]]):
    """Training batches for steps [start_step, max_steps); epoch e is a permutation seeded by it.

    The batch of any step is a pure function of (seed, step), so a resumed run sees exactly the
    batches an uninterrupted one would; incomplete tail batches are dropped (constant batch shape).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start_step: int, max_steps: int):
        if num_items < batch_size:
            raise ValueError(
                f"train.batch_size={batch_size} is larger than the {num_items} training images; "
                "lower train.batch_size or add images"
            )
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.start_step, self.max_steps = start_step, max_steps
        self.steps_per_epoch = num_items // batch_size

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)

    def __iter__(self):
        epoch, order = -1, None
        for step in range(self.start_step, self.max_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                order = torch.randperm(self.num_items, generator=generator).tolist()
            position = (step % self.steps_per_epoch) * self.batch_size
            yield order[position : position + self.batch_size]


def make_loader(
    dataset: CacheDataset,
    *,
    batch_size: int | None = None,
    batch_sampler: Sampler[list[int]] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of (uint8 NHWC images, uint8 NHW targets); conversion happens on the device.

    Give `batch_sampler` for training (seeded order) or `batch_size` for in-order evaluation.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=_collate,
    )


def to_model_input(
    images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC -> float NCHW in [0, 1] on `device`; targets -> int64 class ids."""
    images = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.contiguous(memory_format=memory_format)
    return images, targets.to(device, non_blocking=True).long()
