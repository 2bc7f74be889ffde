"""Checkpoints: dicts of tensors and primitives, so `torch.load(weights_only=True)` loads them.

Written by training, read by evaluation and the hand-off: below all three, so none imports another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import torch

from aeselect.config import Config, from_dict
from aeselect.model.autoencoder import Autoencoder


def save_checkpoint(path: Path, **payload: Any) -> None:
    """Write atomically (temp file + rename): a kill mid-write never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(source: str | Path | BinaryIO) -> dict[str, Any]:
    """A path, or an open binary file (how `dvc.api.open` serves another Git revision)."""
    if isinstance(source, str | Path):
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"{source}: no checkpoint there; run the train stage first")
    return torch.load(source, map_location="cpu", weights_only=True)


def model_from_checkpoint(checkpoint: dict[str, Any]) -> tuple[Autoencoder, Config]:
    """Rebuild the model from the resolved config stored beside its weights."""
    cfg = from_dict(checkpoint["config"])
    model = Autoencoder(cfg.model, aux_classes=int(checkpoint["aux_classes"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), cfg
