"""Device, threads, precision and seeding: the hardware choices, made in one place.

CUDA gets bf16 autocast, channels_last and (behind a flag) torch.compile; the CPU runs plain fp32,
because on CPUs without bf16 units autocast is ~50x slower and channels_last does not pay.
Evaluation runs in plain fp32 on every device (`Runtime.fp32`).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from aeselect.config import TrainConfig
from aeselect.envvars import NPROC_ENV, THREADS_ENV
from aeselect.gpu import claim_gpu


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool
    gpu: str | None = None  # the id claimed from CUDA_VISIBLE_DEVICES (aeselect.gpu)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def fp32(self) -> Iterator[Runtime]:
        """Plain fp32 inside, whatever the training settings: no autocast (not even one opened by
        a caller) and no TF32 matmuls or convolutions; the TF32 switches are restored on exit.
        Yields this runtime without bf16 autocast and channels_last, to run models with inside.
        Evaluation runs here, so its metrics and scale factor mean the same on every device."""
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(self.device.type, enabled=False):
                yield replace(self, bf16=False, channels_last=False)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def describe(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
            return f"cuda:{self.device.index or 0} ({name}; CUDA_VISIBLE_DEVICES={visible})"
        claimed = f"; claimed GPU id {self.gpu}" if self.gpu is not None else ""
        return f"cpu ({torch.get_num_threads()} threads{claimed})"


def select_runtime(cfg: TrainConfig) -> Runtime:
    """Pick the device (auto = CUDA if present) and the precision/layout options that pay there."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "train.device is 'cuda' but no CUDA device is visible; use train.device=auto"
        )
    # Under torchrun each rank takes GPU LOCAL_RANK of those handed to the run; no claim.
    local_rank = os.environ.get("LOCAL_RANK")
    gpu = claim_gpu() if cfg.device != "cpu" and local_rank is None else None  # before CUDA init
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    threads = int(os.environ.get(THREADS_ENV, cfg.num_threads) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    if use_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if local_rank is not None:
            if int(local_rank) >= torch.cuda.device_count():
                raise RuntimeError(
                    f"{NPROC_ENV} asks for more processes than the {torch.cuda.device_count()} "
                    f"visible GPUs (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'all')}); one process per GPU"
                )
            torch.cuda.set_device(int(local_rank))
        return Runtime(
            torch.device("cuda", torch.cuda.current_device()),
            bf16=cfg.bf16 and torch.cuda.is_bf16_supported(),
            channels_last=cfg.channels_last,
            compile=cfg.compile,
            gpu=gpu,
        )
    return Runtime(torch.device("cpu"), bf16=False, channels_last=False, compile=False, gpu=gpu)


def seed_everything(seed: int) -> None:
    """`train.seed` for init; batch order and sampling derive their own streams from it."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for the randomness of one step, derived from (seed, step).

    Re-deriving per step (instead of carrying one generator's state) makes a run resumed from a
    checkpoint at step k draw exactly what an uninterrupted run draws.
    """
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
