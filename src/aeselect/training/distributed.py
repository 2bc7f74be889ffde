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

Several nodes (AESELECT_NNODES > 1, set by the drainer inside a multi-node SLURM job): the
launcher runs node 0's torchrun itself, as on one node, so global rank 0 is a child of the
drainer's `dvc exp run` on the job's first node (its pid in the pidfile, results/ in the temp
workspace there), and starts nodes 1..N-1 with one `srun` task each. The rendezvous is torchrun's
static one (--node-rank, --master-addr = the job's first host): c10d would order the nodes by
host name, which may put rank 0 elsewhere. The other nodes run in the same directory, so the
repository (with dvc's temp workspace under .dvc/tmp/exps) must be on shared storage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler

from aeselect.config import Config, ConfigError
from aeselect.envvars import (
    NNODES_ENV,
    NPROC_ENV,
    PREEMPTED_EXIT_CODE,
    RUNG_EXIT_CODE,
    THREADS_ENV,
)

# Longer than rank 0's validation + checkpoint, during which the other ranks wait in a collective
# (at 512px a few thousand val images take minutes); a rank that dies is caught by torchrun's
# monitor at once, so this bounds only a rank that hangs alive.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
RENDEZVOUS_PORT = 29500  # torchrun's default; one training per job uses it
# How long node 0 waits for its ranks to end by themselves after another node's failed: they see
# the loss at their next collective, and a preempted run's nodes all exit at about the same time.
REMOTE_FAILURE_GRACE_S = 60


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


def _count(name: str, what: str) -> int:
    raw = os.environ.get(name, "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r}: expected a whole number of {what} >= 1")
    return int(raw)


def processes_per_node() -> int:
    return _count(NPROC_ENV, "processes")


def nodes() -> int:
    return _count(NNODES_ENV, "nodes")


def must_launch() -> bool:
    """True in the stage's own process when several ranks are asked for and none runs yet."""
    several = processes_per_node() > 1 or nodes() > 1
    return several and "TORCHELASTIC_RUN_ID" not in os.environ


def first_host() -> str:
    """The job's first node: where the batch script, the drainer and so rank 0 run."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ConfigError(
            f"{NNODES_ENV}={nodes()} needs a SLURM job (SLURM_JOB_NODELIST is unset): several "
            f"nodes are started with srun; unset {NNODES_ENV} to train on this node"
        )
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    )
    return hosts.stdout.split()[0]


def torchrun_args(node_count: int, processes: int, host: str | None) -> list[str]:
    """torchrun's options: standalone on one node, else a static rendezvous at `host`."""
    if node_count == 1:
        return ["--standalone", f"--nproc-per-node={processes}"]
    return [
        f"--nnodes={node_count}",
        f"--nproc-per-node={processes}",
        f"--master-addr={host}",
        f"--master-port={RENDEZVOUS_PORT}",
    ]


def other_nodes_command(
    node_count: int, processes: int, host: str, stage_args: list[str], gpus: bool
) -> list[str]:
    """srun of one torchrun per node but the first (`host`, node rank 0, run by the launcher).

    SLURM_PROCID counts this step's tasks from 0, so the nodes take ranks 1..N-1."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")  # srun no longer inherits sbatch's
    torchrun = f"exec {shlex.quote(sys.executable)} -m torch.distributed.run"
    return [
        "srun",
        f"--nodes={node_count - 1}",
        f"--ntasks={node_count - 1}",
        "--ntasks-per-node=1",
        f"--exclude={host}",
        "--kill-on-bad-exit=1",
        *([f"--cpus-per-task={cpus}"] if cpus else []),
        *([f"--gres=gpu:{processes}"] if gpus else []),
        "bash",
        "-c",
        f'{torchrun} --node-rank="$((SLURM_PROCID + 1))" "$@"',
        "torchrun",
        *torchrun_args(node_count, processes, host),
        "-m",
        "aeselect.stages",
        *stage_args,
    ]


def _end_after_remote_failure(srun: subprocess.Popen, done: threading.Event) -> None:
    """A node that failed ends this node's ranks too (SIGTERM to the launcher: torchrun passes
    it on), unless they end within the grace time by themselves."""
    if srun.wait() != 0 and not done.wait(REMOTE_FAILURE_GRACE_S):
        print(
            f"[train] the ranks on the other nodes failed (srun exit {srun.returncode}; their "
            "output is above); ending this node's",
            file=sys.stderr,
        )
        os.kill(os.getpid(), signal.SIGTERM)


def check_batch_size(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} (the global batch) does not split evenly over "
            f"{world_size} processes ({NPROC_ENV} x {NNODES_ENV}); use a multiple of {world_size}"
        )


def launch(cfg: Config, stage_args: list[str]) -> int:
    """Run `python -m aeselect.stages <stage_args>` as N ranks under torchrun, on this node
    (and with AESELECT_NNODES > 1 on the job's other nodes too, through srun).

    Returns the stage's exit code: 0, PREEMPTED_EXIT_CODE when the ranks stopped on a signal
    after rank 0 saved the snapshot (RUNG_EXIT_CODE when they paused at a budget rung), 1 when a
    rank failed (torchrun's report names it and its error), 128+n when this launcher itself got
    signal n (torchrun forwards it to the ranks).
    """
    from torch.distributed.run import parse_args

    processes, node_count = processes_per_node(), nodes()
    check_batch_size(cfg.train.batch_size, processes * node_count)
    # The cores of this experiment, shared between its ranks (torchrun would give each one).
    cores = int(os.environ.get(THREADS_ENV, cfg.train.num_threads) or 0)
    per_rank = str(max(1, (cores or len(os.sched_getaffinity(0))) // processes))
    os.environ[THREADS_ENV] = os.environ["OMP_NUM_THREADS"] = per_rank
    # SIGUSR1 goes to a rank (the drainer's pidfile names rank 0), never through torchrun, which
    # would give the ranks 30 s and then kill them; it must not end this launcher either.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    host = first_host() if node_count > 1 else None
    options = torchrun_args(node_count, processes, host)
    args = parse_args([*options, "--node-rank=0", "-m", "aeselect.stages", *stage_args])
    done = threading.Event()
    if host is not None:
        gpus = torch.cuda.is_available()
        srun = subprocess.Popen(other_nodes_command(node_count, processes, host, stage_args, gpus))
        threading.Thread(target=_end_after_remote_failure, args=(srun, done), daemon=True).start()
    try:
        return _run(args)
    finally:
        done.set()
        if host is not None:
            _wait_or_end(srun)


def _run(args: argparse.Namespace) -> int:
    """torchrun on this node; its result as the stage's exit code (see launch)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    try:
        run(args)
    except ChildFailedError as failed:
        # A rank exits 75 (76) only after the barrier behind rank 0's complete snapshot; torchrun
        # then tears down the ranks still exiting, which it reports as failures of their own.
        exit_code = failed.get_first_failure()[1].exitcode
        if exit_code in (PREEMPTED_EXIT_CODE, RUNG_EXIT_CODE):
            return exit_code
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


def _wait_or_end(srun: subprocess.Popen) -> None:
    """The other nodes end with node 0 (a barrier ends a run, an all-reduced flag a stop)."""
    try:
        srun.wait(REMOTE_FAILURE_GRACE_S)
    except subprocess.TimeoutExpired:
        srun.terminate()  # srun passes SIGTERM to its tasks
        srun.wait()


def rank_cores(cores: list[int], local_rank: int, local_ranks: int) -> list[int]:
    """The CPU ranks' equal shares of this node's cores (`cores`: the allocation's), one block
    each, so that they do not compete for a core; with fewer cores than ranks, one core each."""
    share = len(cores) // local_ranks
    if share == 0:
        return [cores[local_rank % len(cores)]]
    return cores[local_rank * share : (local_rank + 1) * share]


def pin_cpu_rank(rank: Rank) -> None:
    """A CPU rank keeps to its share of the node's cores (called before torch starts threads,
    which inherit it); GPU ranks and a single process keep the whole allocation."""
    if not rank.distributed or torch.cuda.is_available():
        return
    share = rank_cores(
        sorted(os.sched_getaffinity(0)),
        int(os.environ["LOCAL_RANK"]),
        int(os.environ["LOCAL_WORLD_SIZE"]),
    )
    os.sched_setaffinity(0, share)


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
