"""Training on several GPUs (or CPU processes) with PyTorch's own stack: torchrun launches the
ranks, DistributedDataParallel averages their gradients, `nccl` joins GPUs and `gloo` CPUs.

How many ranks is hardware, not a param: `AESELECT_NPROC_PER_NODE` (set by the drainer when one
experiment gets every GPU of the allocation) chooses it, like AESELECT_NUM_THREADS chooses threads.
A `train.*` key would enter the experiment's identity, its DVC cache key and its resume key, yet
with a fixed global batch N does not change what is trained:

- `train.batch_size` is the global batch. Step s trains on the batch StepBatchSampler derives
  from (seed, s); rank r of N takes its r-th contiguous slice of it (batch_size / N images).
- The loss is a per-element mean and DDP averages the ranks' gradients, so every rank applies the
  gradient of the whole global batch: same LR schedule, same step count, same curve for any N (up
  to fp32 summation order, which makes N=1 and N=2 agree closely, not bit for bit).
- Rank 0 alone validates and writes dvclive, checkpoints and the resume snapshot; the logged loss
  is the mean over all ranks, i.e. over the global batch.

Stopping: SIGUSR1/SIGTERM may reach any one rank (the drainer signals rank 0, whose pid is in the
pidfile; SLURM signals all). At each log boundary the ranks all-reduce their stop flags, so all
stop at the same step; rank 0 writes the one snapshot while the others wait at a barrier, then
all exit 75. A failing rank ends the run through torchrun: it sees the exit within its monitor
interval and tears the others down (SIGTERM, SIGKILL after 30 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from aeselect.config import Config, ConfigError
from aeselect.envvars import NPROC_ENV, THREADS_ENV
from aeselect.training.resume import PREEMPTED_EXIT_CODE

# Longer than rank 0's validation + checkpoint, during which the other ranks wait in a collective
# (at 512px a few thousand val images take minutes); a rank that dies is caught by torchrun's
# monitor at once, so this bounds only a rank that hangs alive.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Rank:
    """This process's place in the run, as torchrun's environment states it (RANK, WORLD_SIZE)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def this_rank() -> Rank:
    return Rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def processes_per_node() -> int:
    raw = os.environ.get(NPROC_ENV, "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"{NPROC_ENV}={raw!r}: expected a whole number of processes >= 1")
    return int(raw)


def must_launch() -> bool:
    """True in the stage's own process when several ranks are asked for and none runs yet."""
    return processes_per_node() > 1 and "TORCHELASTIC_RUN_ID" not in os.environ


def check_batch_size(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} (the global batch) does not split evenly over "
            f"{world_size} processes ({NPROC_ENV}); use a multiple of {world_size}"
        )


def launch(cfg: Config, stage_args: list[str]) -> int:
    """Run `python -m aeselect.stages <stage_args>` as N ranks under torchrun, on this node.

    Returns the stage's exit code: 0, PREEMPTED_EXIT_CODE when the ranks stopped on a signal
    after rank 0 saved the snapshot, 1 when a rank failed (torchrun's report names it and its
    error), 128+n when this launcher itself got signal n (torchrun forwards it to the ranks).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    processes = processes_per_node()
    check_batch_size(cfg.train.batch_size, processes)
    # The cores of this experiment, shared between its ranks (torchrun would give each one).
    cores = int(os.environ.get(THREADS_ENV, cfg.train.num_threads) or 0)
    per_rank = str(max(1, (cores or len(os.sched_getaffinity(0))) // processes))
    os.environ[THREADS_ENV] = os.environ["OMP_NUM_THREADS"] = per_rank
    # SIGUSR1 goes to a rank (the drainer's pidfile names rank 0), never through torchrun, which
    # would give the ranks 30 s and then kill them; it must not end this launcher either.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    args = parse_args(
        ["--standalone", f"--nproc-per-node={processes}", "-m", "aeselect.stages", *stage_args]
    )
    try:
        run(args)
    except ChildFailedError as failed:
        # A rank exits 75 only after the barrier behind rank 0's complete snapshot; torchrun
        # then tears down the ranks still exiting, which it reports as failures of their own.
        if failed.get_first_failure()[1].exitcode == PREEMPTED_EXIT_CODE:
            return PREEMPTED_EXIT_CODE
        print(f"[train] a training process failed:\n{failed.format_msg()}", file=sys.stderr)
        return 1
    except SignalException as stopped:
        print(
            f"[train] launcher got signal {stopped.sigval.name}; torchrun passed it to the ranks "
            "and ended them (a resume snapshot, if saved, is used by the rerun)",
            file=sys.stderr,
        )
        return 128 + stopped.sigval.value
    return 0


@contextlib.contextmanager
def process_group(rank: Rank) -> Iterator[None]:
    """Join the run's process group (gloo for CPU tensors, nccl for CUDA ones) when there are
    several ranks; leave it together on success, and at once on an error (torchrun ends the rest).
    """
    if not rank.distributed:
        yield
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        yield
        dist.barrier()  # rank 0 may still be writing the final metrics
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as DDP when several ranks train it (all parameters take part in every step).

    No buffer sync in forward (GroupNorm keeps no running statistics anyway): rank 0 alone runs
    it in validation, which must not wait for the others."""
    if not this_rank().distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


class RankSlice(Sampler[list[int]]):
    """This rank's contiguous slice of every global batch that `batches` yields."""

    def __init__(self, batches: Sampler[list[int]], rank: Rank):
        self.batches, self.rank = batches, rank

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            check_batch_size(len(batch), self.rank.world_size)
            size = len(batch) // self.rank.world_size
            yield batch[self.rank.rank * size : (self.rank.rank + 1) * size]


def batch_rows(rank_batch_size: int) -> tuple[int, int] | None:
    """(first row, global batch size) of this rank's slice; None with one process."""
    rank = this_rank()
    if not rank.distributed:
        return None
    return rank.rank * rank_batch_size, rank.world_size * rank_batch_size


def shard(batches: Sampler[list[int]]) -> Sampler[list[int]]:
    rank = this_rank()
    return RankSlice(batches, rank) if rank.distributed else batches


def mean_over_ranks(window: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each step's loss terms averaged over the ranks: the terms of the global batch."""
    if not this_rank().distributed:
        return window
    names = list(window[0])
    stacked = torch.stack([torch.stack([terms[n] for n in names]) for terms in window]).float()
    dist.all_reduce(stacked)
    stacked /= dist.get_world_size()
    return [dict(zip(names, row, strict=True)) for row in stacked]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on one (the stop request, polled at log boundaries)."""
    if not this_rank().distributed:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if this_rank().distributed:
        dist.barrier()
