"""DDP under torchrun with real processes on gloo: 1 against 2 ranks, a stop signal to one rank
and the resume, a killed rank. (The CUDA/nccl path is the same code with another backend.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY
from test_resume import logged_steps

from aeselect.config import apply_overrides, from_dict, read_yaml
from aeselect.envvars import (
    NNODES_ENV,
    NPROC_ENV,
    PIDFILE_ENV,
    PREEMPTED_EXIT_CODE,
    RESUME_DIR_ENV,
    THREADS_ENV,
)
from aeselect.model import Autoencoder
from aeselect.training import distributed

# Long enough to signal a rank between two log boundaries; 4 images per rank and step; a VAE,
# so that the ranks' sampling is under test too.
PARAMS = TINY | {
    "train.max_steps": 24,
    "train.batch_size": 8,
    "train.eval_every": 12,
    "model.variational": True,
    "loss.kl_weight": 0.001,
}
TIMING = {"train_time_s", "images_per_s", "device"}


def train_stage(workdir: Path, processes: int, **env: str) -> subprocess.Popen:
    environment = {**os.environ, NPROC_ENV: str(processes), THREADS_ENV: "2", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "aeselect", "train"],
        cwd=workdir,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def prepared(path: Path) -> Path:
    path.mkdir()
    raw = apply_overrides(read_yaml(ROOT / "params.yaml"), PARAMS)
    (path / "params.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, "-m", "aeselect", "prepare"], cwd=path, check=True)
    return path


def trained(path: Path, processes: int) -> Path:
    process = train_stage(path, processes)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    return path


def summary(workdir: Path) -> dict:
    data = json.loads((workdir / "results/train/metrics.json").read_text())
    return {key: value for key, value in data.items() if key not in TIMING}


def ranks_of(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the torchrun workers under the launcher, once both have started."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        ranks = {}
        for pid in children:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [v[5:] for v in environ if v.startswith(b"RANK=")]
            if rank:
                ranks[int(rank[0])] = int(pid)
        if len(ranks) == 2:
            return ranks
        time.sleep(0.1)
    raise AssertionError("torchrun did not start 2 ranks")


def wait_for_logged_steps(workdir: Path, count: int) -> None:
    deadline = time.monotonic() + 300
    while logged_steps(workdir) < count and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One prepared workspace that each test copies (prepare is not what is under test)."""
    return prepared(tmp_path_factory.mktemp("ddp") / "prepared")


def workspace(data: Path, path: Path) -> Path:
    subprocess.run(["cp", "-r", str(data), str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def two_process_run(data, tmp_path_factory) -> Path:
    return trained(workspace(data, tmp_path_factory.mktemp("ddp") / "two"), 2)


def test_ranks_take_contiguous_slices_of_each_global_batch():
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(distributed.RankSlice(batches, distributed.Rank(0, 2))) == [[0, 1], [4, 5]]
    assert list(distributed.RankSlice(batches, distributed.Rank(1, 2))) == [[2, 3], [6, 7]]
    with pytest.raises(ValueError, match=r"train\.batch_size=4 .* over 3 processes"):
        list(distributed.RankSlice(batches, distributed.Rank(0, 3)))


def test_process_count_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(NPROC_ENV, raising=False)
    assert distributed.processes_per_node() == 1 and not distributed.must_launch()
    monkeypatch.setenv(NPROC_ENV, "2")
    assert distributed.must_launch()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # inside torchrun: a rank, not the launcher
    assert not distributed.must_launch()
    monkeypatch.setenv(NPROC_ENV, "two")
    with pytest.raises(ValueError, match=f"{NPROC_ENV}='two': expected a whole number"):
        distributed.processes_per_node()


def test_cpu_ranks_share_the_cores_out_in_disjoint_blocks():
    cores = [0, 1, 4, 5, 6]  # an allocation need not be contiguous
    assert [distributed.rank_cores(cores, r, 2) for r in range(2)] == [[0, 1], [4, 5]]
    assert [distributed.rank_cores(cores, r, 5) for r in range(5)] == [[c] for c in cores]
    assert [distributed.rank_cores([3, 7], r, 3) for r in range(3)] == [[3], [7], [3]]


def test_several_nodes_need_a_slurm_job(monkeypatch):
    monkeypatch.setenv(NNODES_ENV, "2")
    monkeypatch.delenv(NPROC_ENV, raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert distributed.nodes() == 2 and distributed.must_launch()  # even with 1 rank per node
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(ValueError, match=f"{NNODES_ENV}=2 needs a SLURM job"):
        distributed.first_host()


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs SLURM's scontrol")
def test_other_nodes_join_a_static_rendezvous_on_the_first_host(monkeypatch, tmp_path):
    """The launcher runs node rank 0 on the job's first host (the drainer's, so global rank 0
    is its child); srun starts one torchrun on every other node with node ranks 1..N-1."""
    (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))  # scontrol only parses here
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09]")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    host = distributed.first_host()
    assert host == "gpu07"
    rendezvous = ["--nnodes=3", "--nproc-per-node=4", "--master-addr=gpu07", "--master-port=29500"]
    assert distributed.torchrun_args(3, 4, host) == rendezvous
    assert distributed.torchrun_args(1, 4, None) == ["--standalone", "--nproc-per-node=4"]
    stage = ["train", "--params", "params.yaml"]
    command = distributed.other_nodes_command(3, 4, host, stage, gpus=True)
    assert command == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--exclude=gpu07",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=32",
        "--gres=gpu:4",
        "bash",
        "-c",
        f'exec {sys.executable} -m torch.distributed.run --node-rank="$((SLURM_PROCID + 1))" "$@"',
        "torchrun",
        *rendezvous,
        "-m",
        "aeselect.stages",
        *stage,
    ]
    # What each task's shell runs: torchrun's options, then the stage, with node rank 2.
    shell = command[command.index("-c") + 1].replace(sys.executable, "echo")
    ran = subprocess.run(
        ["bash", "-c", shell, *command[command.index("-c") + 2 :]],
        env={**os.environ, "SLURM_PROCID": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    expected = ["-m", "torch.distributed.run", "--node-rank=2", *rendezvous, "-m"]
    assert ran.stdout.split()[: len(expected)] == expected


def test_a_vae_batch_split_over_ranks_samples_the_noise_of_the_whole_batch():
    vae = {"variational": True, "base_channels": 8, "aux_hidden_channels": 8}
    cfg = from_dict({"model": vae, "loss": {"kl_weight": 0.1}})
    model = Autoencoder(cfg.model, aux_classes=3).train()
    images = torch.rand(4, 3, 16, 16)

    def latent(part: slice, rows=None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        return model(images[part], generator=generator, rows=rows).latent

    halves = [latent(slice(0, 2), (0, 4)), latent(slice(2, 4), (2, 4))]
    torch.testing.assert_close(torch.cat(halves), latent(slice(0, 4)))
    assert not torch.allclose(halves[1], latent(slice(2, 4)))  # not each rank its own draw


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(data, two_process_run, tmp_path):
    one = trained(workspace(data, tmp_path / "one"), 1)
    two = summary(two_process_run)
    assert json.loads((two_process_run / "results/train/metrics.json").read_text())[
        "device"
    ].endswith("2 processes (DDP)")
    # Same global batches, schedule and steps: the runs differ only in fp32 rounding (two
    # half-batch means averaged by the all-reduce instead of one mean; 1 thread per rank
    # instead of 2), ~1e-7 relative per operation. Adam divides by sqrt(v), so early steps
    # amplify such differences; after 24 steps they stay below 1e-5 relative here. 1e-3 leaves
    # a margin, yet a semantic difference (ranks on the same slice, a per-rank batch of 8, a
    # different LR schedule) moves these metrics by whole percents.
    expected = summary(one)
    for group in ("loss", "val", "best"):
        assert two[group] == pytest.approx(expected[group], rel=1e-3), group
    worst = max(abs(two[g][k] / expected[g][k] - 1) for g in ("loss", "val") for k in two[g])
    print(f"1 against 2 processes: largest relative difference {worst:.1e}")
    assert two["step"] == expected["step"] == PARAMS["train.max_steps"]
    # Two 2-process runs are bit-identical: another set of processes, the same numbers.
    again = trained(workspace(data, tmp_path / "again"), 2)
    assert summary(again) == two


@pytest.mark.slow
def test_a_signal_to_any_rank_stops_all_and_the_rerun_resumes_them(data, two_process_run, tmp_path):
    env = {RESUME_DIR_ENV: str(tmp_path / "snapshots"), PIDFILE_ENV: str(tmp_path / "pid")}
    interrupted = workspace(data, tmp_path / "interrupted")
    launcher = train_stage(interrupted, 2, **env)
    ranks = ranks_of(launcher)
    wait_for_logged_steps(interrupted, 2)
    cores = [os.sched_getaffinity(pid) for pid in ranks.values()]
    assert cores[0] and cores[1] and not cores[0] & cores[1]  # pinned to disjoint shares
    os.kill(ranks[1], signal.SIGUSR1)  # not rank 0: the all-reduced flag stops rank 0 too
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == PREEMPTED_EXIT_CODE, output
    assert output.count("stopped at step") == 1  # rank 0 reports and snapshots, once
    assert (tmp_path / "pid").read_text() == str(ranks[0])  # where the drainer sends USR1
    assert len(list((tmp_path / "snapshots").iterdir())) == 1

    resumed = train_stage(interrupted, 2, **env)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    stopped_at = int(output.split("resumed at step ")[1].split()[0])
    assert 0 < stopped_at < PARAMS["train.max_steps"]
    assert not list((tmp_path / "snapshots").iterdir())
    assert summary(interrupted) == summary(two_process_run)
    for curve in sorted(two_process_run.rglob("results/train/**/*.tsv")):
        relative = curve.relative_to(two_process_run)
        assert (interrupted / relative).read_text() == curve.read_text(), relative
    a = torch.load(two_process_run / "models/best.pt", weights_only=True)["model"]
    b = torch.load(interrupted / "models/best.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_at_once_naming_it(data, tmp_path):
    run = workspace(data, tmp_path / "killed")
    launcher = train_stage(run, 2)
    ranks = ranks_of(launcher)
    wait_for_logged_steps(run, 1)
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    output = launcher.communicate(timeout=120)[0]
    ended_after = time.monotonic() - killed
    print(f"a killed rank ended the run in {ended_after:.1f} s")
    assert launcher.returncode == 1, output
    # The report names the killed rank among its failures. Which failure it calls the "root
    # cause" is torchrun's race: the smallest whole-second timestamp, ties to the lowest rank,
    # so rank 0's disconnect error (written in the same second) can take that title.
    report = output.split("Failures:")[1]
    failures = re.split(r"\n\[\d+\]:\n", report)[1:]
    killed_rank = [f for f in failures if "rank      : 1 (local_rank: 1)" in f]
    assert len(killed_rank) == 1 and "Signal 9 (SIGKILL)" in killed_rank[0], output
    # torchrun's monitor sees the exit within 0.1 s and ends rank 0 (SIGKILL after 30 s at most).
    assert ended_after < 30
