"""One pass over the validation split: the batch loop training's periodic check and the evaluate
stage share, each reducing the batches its own way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from aeselect.data.dataset import PreparedData, make_loader, to_model_input
from aeselect.model import AutoencoderOutput
from aeselect.runtime import Runtime


class ValBatch(NamedTuple):
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], on the device
    targets: torch.Tensor  # (N, H, W) auxiliary targets
    out: AutoencoderOutput
    reconstruction: torch.Tensor  # fp32 and clamped to [0, 1], as a saved image would be


def val_batches(
    model: Callable[[torch.Tensor], AutoencoderOutput],
    data: PreparedData,
    batch_size: int,
    runtime: Runtime,
) -> Iterator[ValBatch]:
    """The val split in order, each batch through `model` (in eval mode, under no_grad: the
    caller's job) with the runtime's autocast and memory layout."""
    loader = make_loader(data.dataset("val"), batch_size=batch_size)
    for raw_images, raw_targets in loader:
        images, targets = to_model_input(
            raw_images, raw_targets, runtime.device, runtime.channels_last
        )
        with runtime.autocast():
            out = model(images)
        yield ValBatch(images, targets, out, out.reconstruction.float().clamp(0, 1))
