"""One GPU per experiment when N experiments share an N-GPU node.

DVC's queue starts every worker with the same CUDA_VISIBLE_DEVICES; each training process claims
one of those ids with an exclusive, non-blocking lock on a file named after it and narrows
CUDA_VISIBLE_DEVICES to it before CUDA initialises. The kernel drops the lock when the process
exits, however it exits, so a killed run never leaks its GPU.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO

from aeselect.envvars import GPU_LOCK_DIR_ENV

_held: list[IO] = []  # open lock files: the claim lasts as long as the process


def lock_dir() -> Path:
    """Per-job by default (SLURM_JOB_ID), so jobs on a shared node never see each other's ids."""
    default = (
        Path(tempfile.gettempdir()) / f"aeselect-gpus-{os.environ.get('SLURM_JOB_ID', 'local')}"
    )
    return Path(os.environ.get(GPU_LOCK_DIR_ENV, default))


def claim_gpu() -> str | None:
    """Claim a free id from CUDA_VISIBLE_DEVICES and make it the only visible one.

    Returns the id, or None when no GPUs are listed. Raises when every listed GPU is taken:
    more parallel experiments than GPUs is a configuration error, not something to share.
    """
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible or _held:
        return os.environ.get("CUDA_VISIBLE_DEVICES") if _held else None
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for device in visible:
        handle = (directory / f"gpu-{device.strip()}.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _held.append(handle)
        os.environ["CUDA_VISIBLE_DEVICES"] = device.strip()
        return device.strip()
    raise RuntimeError(
        f"all GPUs in CUDA_VISIBLE_DEVICES={','.join(visible)} are claimed by other experiments "
        f"(locks in {directory}); run at most as many parallel experiments as GPUs"
    )
