"""`aeselect phase submit` on SLURM: profiles, the batch script's signal relay and requeue, and
whole phases drained by real jobs on the local test cluster (fixture in conftest.py).

The jobs inherit the submitting process's environment (--export=ALL): its PATH with this venv,
the Git identity, and the cluster's SLURM_CONF.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, git, make_project

from aeselect.cluster.share import stamp
from aeselect.cluster.slurm import load_profile, sbatch_command, submit
from aeselect.sweep.results import collect_results
from aeselect.sweep.runs import exp_show
from aeselect.sweep.spec import PhaseError, PhaseSpec, load_phase
from aeselect.sweep.sweep_record import recorded_sweep

PHASE = """\
id: "1.1"
title: slurm
requires: null
decide: {metric: mse, direction: min, tolerance: 0.05, tie_breakers: []}
experiments:
"""
TIMING = {"train_time_s", "images_per_s"}


def write_phase(directory: Path, experiments: str) -> Path:
    """Phase 1.1 with these experiments, selecting every key they set (a phase must)."""
    lines = textwrap.dedent(experiments).splitlines()
    parsed = yaml.safe_load("\n".join(lines))
    selects = ", ".join(sorted({key for params in parsed.values() for key in params}))
    header = PHASE.replace("experiments:", f"selects: [{selects}]\nexperiments:")
    path = directory / "phase1_1.yaml"
    path.write_text(header + "".join(f"  {line}\n" for line in lines))
    return path


# ---- profiles and the sbatch command line (no cluster needed) -------------------------------


@pytest.fixture
def hpc_repo(tmp_path) -> Path:
    """A directory with this project's hpc/ files and a one-experiment phase 1.1."""
    shutil.copytree(ROOT / "hpc", tmp_path / "hpc", ignore=shutil.ignore_patterns("logs"))
    write_phase(tmp_path, "lc4: {model.latent_channels: 4}")
    return tmp_path


def spec_of(repo: Path) -> PhaseSpec:
    return load_phase("1.1", repo)


def test_shipped_profiles():
    shapes = {
        name: (p.gpus_per_node, p.parallel_jobs)
        for name in ("v100", "v100x2", "l40s", "local-test")
        for p in [load_profile(ROOT, name)]
    }
    assert shapes == {"v100": (4, 4), "v100x2": (4, 1), "l40s": (2, 2), "local-test": (2, 2)}
    assert load_profile(ROOT, "v100x2").nodes == 2 and load_profile(ROOT, "v100").nodes == 1
    assert load_profile(ROOT, "local-test").partition == "debug"  # hpc/testing/start_cluster.sh


def test_dry_run_prints_the_sbatch_command_and_the_script(hpc_repo, capsys):
    profile = load_profile(hpc_repo, "v100")
    assert submit(hpc_repo, spec_of(hpc_repo), "v100", dry_run=True) == 0
    out = capsys.readouterr().out
    command, _, script = out.partition("\n")
    repo = hpc_repo.resolve()
    for option in [
        "sbatch --parsable --job-name=aeselect-phase1_1 --partition=gpu-v100",
        "--gres=gpu:4 --cpus-per-task=32 --mem=180G --time=24:00:00",
        "--signal=B:USR1@300 --requeue --open-mode=append",
        f"--output={repo}/hpc/logs/phase1_1-%j.out --chdir={repo}",
        "--export=ALL,AESELECT_PHASE=1.1,AESELECT_JOBS=4,"
        f"AESELECT_RESUME_DIR={repo}/.dvc/tmp/aeselect-resume",
    ]:
        assert option in command
    assert "--account" not in command
    assert "--nodes=1 --ntasks=1 " in command
    assert "module load cuda/12.4\nsource .venv/bin/activate\n" in script
    assert "# aeselect:setup\n" not in script
    assert command.split() == sbatch_command(repo, spec_of(hpc_repo), profile)
    assert not (hpc_repo / "hpc" / "logs").exists()  # a dry run writes nothing


def test_a_profile_of_several_nodes_trains_one_experiment_on_all(hpc_repo, capsys):
    """One task per node: the drainer on the first, the train stage's srun on the others."""
    assert submit(hpc_repo, spec_of(hpc_repo), "v100x2", dry_run=True) == 0
    command, _, script = capsys.readouterr().out.partition("\n")
    assert "--nodes=2 --ntasks-per-node=1 --gres=gpu:4 --cpus-per-task=32" in command
    assert "--ntasks=1" not in command and "AESELECT_JOBS=1" in command
    assert "python -m aeselect phase drain" in script  # the same script: one drainer

    write_phase(hpc_repo, "lc4: {model.latent_channels: 4}\nlc8: {model.latent_channels: 8}")
    message = r"hpc/clusters\.yaml: v100x2\.nodes: 2 nodes train one experiment .* 2 experiments"
    with pytest.raises(PhaseError, match=message):
        submit(hpc_repo, spec_of(hpc_repo), "v100x2", dry_run=True)


def test_the_drainer_spreads_only_a_one_experiment_phase_over_the_nodes(monkeypatch):
    from aeselect.cluster.drain import Drainer

    monkeypatch.setenv("SLURM_NNODES", "2")
    phases = ROOT / "phases"
    assert Drainer(ROOT, load_phase("1.5", phases), jobs=1).nodes == 2
    assert Drainer(ROOT, load_phase("1.1", phases), jobs=4).nodes == 1


def set_profile(repo: Path, name: str, old: str, new: str) -> None:
    path = repo / "hpc" / "clusters.yaml"
    text = path.read_text()
    start = text.index(f"\n{name}:\n")
    assert old in text[start:], old
    path.write_text(text[:start] + text[start:].replace(old, new, 1))


SETUP = "setup:\n    - module load cuda/12.4\n    - source .venv/bin/activate\n"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("parallel_jobs: 2", "parallel_jobs: 3", r"l40s\.parallel_jobs: 3 is more than gpus_per_"),
        ('time: "24:00:00"', "time: 24:00:00", r"l40s\.time: expected str, got 86400 \(quote it"),
        ('time: "24:00:00"', 'time: "1 day"', r"l40s\.time: '1 day'; expected HH:MM:SS"),
        ("warn_seconds: 300", "warn_seconds: 90000", r"l40s\.warn_seconds: 90000; must be"),
        ("mem: 96G", "mem: lots", r"l40s\.mem: 'lots'; expected e\.g\. 64G"),
        ("partition: gpu-l40s", "partition: a b", r"l40s\.partition: 'a b' is not a plain"),
        ("cpus_per_task: 16", "cpus_per_task: 1", r"l40s\.cpus_per_task: 1 cores cannot give"),
        ("mem: 96G", "memory: 96G", r"l40s\.memory: unknown key"),
        ("  mem: 96G\n", "", r"l40s\.mem: missing"),
        (SETUP, "setup: source .venv/bin/activate\n", r"l40s\.setup: expected list"),
        ("mem: 96G", "mem: 96G\n  nodes: 0", r"l40s\.nodes: must be >= 1"),
        ("mem: 96G", "mem: 96G\n  nodes: two", r"l40s\.nodes: expected int, got 'two'"),
    ],
)
def test_profile_errors_name_the_file_and_key(hpc_repo, old, new, message):
    set_profile(hpc_repo, "l40s", old, new)
    with pytest.raises(PhaseError, match=rf"^hpc/clusters\.yaml: {message}"):
        load_profile(hpc_repo, "l40s")


def test_unknown_profile_lists_the_known_ones(hpc_repo):
    with pytest.raises(
        PhaseError, match=r"no profile .a100. \(profiles: v100, v100x2, l40s, seed, local-test\)"
    ):
        load_profile(hpc_repo, "a100")


def test_paths_that_reach_sbatch_are_plain(hpc_repo, tmp_path, monkeypatch):
    odd = tmp_path / "my,repo"
    shutil.copytree(hpc_repo, odd)
    with pytest.raises(PhaseError, match=r"repository path .*my,repo.*no spaces, commas or %"):
        submit(odd, spec_of(odd), "local-test", dry_run=True)
    # resume_dir expands $VARS at submit time; what they expand to is checked too.
    set_profile(hpc_repo, "l40s", "warn_seconds: 300\n", "warn_seconds: 300\n  resume_dir: $R\n")
    monkeypatch.setenv("R", "/scratch/x y")
    with pytest.raises(PhaseError, match=r"l40s\.resume_dir '/scratch/x y': sbatch needs plain"):
        submit(hpc_repo, spec_of(hpc_repo), "l40s", dry_run=True)
    monkeypatch.setenv("R", "/scratch/me/resume")
    submit(hpc_repo, spec_of(hpc_repo), "l40s", dry_run=True)


def test_submit_without_sbatch_says_where_to_run(hpc_repo, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(PhaseError, match="sbatch is not on PATH: run this on a SLURM login node"):
        submit(hpc_repo, spec_of(hpc_repo), "local-test", dry_run=False)


# ---- the batch script on the test cluster, with a stand-in drainer --------------------------

# `python` for the job alone (first on the PATH it inherits): records its arguments, and on its
# first run answers SIGUSR1 like the drainer: a moment later (the trainings save snapshots) it
# exits 75. After the requeue it exits FAKE_RC.
FAKE_DRAINER = """\
#!/bin/bash
echo "fake drainer: $* resume_dir_exists=$([[ -d $AESELECT_RESUME_DIR ]] && echo yes)"
if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 || -n ${FAKE_RC_NOW:-} ]]; then exit "$FAKE_RC"; fi
trap 'echo "fake drainer: USR1"; stop=1' USR1
stop=0
touch "$FAKE_DIR/started"
for _ in $(seq 600); do
    if [[ $stop -eq 1 ]]; then sleep 1; exit 75; fi
    sleep 0.1
done
exit 9
"""


@pytest.fixture
def fake_drainer(tmp_path, monkeypatch, slurm_cluster) -> Path:
    """A project whose job runs FAKE_DRAINER; the test submits through submit() in-process."""
    project = make_project(tmp_path / "project", TINY)
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_DRAINER)
    (bin_dir / "python").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return project


def submitted_job(output: str) -> int:
    match = re.search(r"Submitted batch job (\d+)", output)
    assert match, output
    return int(match[1])


@pytest.mark.slurm
def test_batch_script_relays_usr1_and_requeues_on_75(
    slurm_cluster, fake_drainer, capsys, monkeypatch
):
    project = fake_drainer
    monkeypatch.setenv("FAKE_RC", "0")
    submit(project, load_phase("1.1", project / "phases"), "local-test", dry_run=False)
    job = submitted_job(capsys.readouterr().out)
    slurm_cluster.wait_for_file(project.parent / "started", timeout=30)
    # Two warnings in a row: the script's `wait` returns early on each; it must still wait for
    # the drainer's own exit code, 75, and requeue the job exactly once.
    slurm_cluster.signal(job, "USR1")
    slurm_cluster.signal(job, "USR1")
    result = slurm_cluster.wait(job, timeout=60)
    out = (project / "hpc" / "logs" / f"phase1_1-{job}.out").read_text()
    assert result.ok, f"{result}\n{out}"
    assert result.info["Restarts"] == "1", out
    assert "SLURM_RESTART_COUNT=0 CUDA_VISIBLE_DEVICES=0,1" in out
    assert f"fake drainer: -m aeselect phase drain 1.1 -j 2 --repo {project}" in out
    assert "resume_dir_exists=yes" in out
    assert "fake drainer: USR1" in out
    assert out.count("drainer exited 75") == 1 and out.count(f"requeued job {job}") == 1
    assert "SLURM_RESTART_COUNT=1" in out and out.rstrip().endswith("drainer exited 0")


@pytest.mark.slurm
@pytest.mark.parametrize("code", [1, 3])
def test_batch_script_exits_with_the_drainers_code(
    slurm_cluster, fake_drainer, capsys, monkeypatch, code
):
    monkeypatch.setenv("FAKE_RC", str(code))
    monkeypatch.setenv("FAKE_RC_NOW", "1")
    submit(fake_drainer, load_phase("1.1", fake_drainer / "phases"), "local-test", dry_run=False)
    result = slurm_cluster.wait(submitted_job(capsys.readouterr().out), timeout=30)
    assert (result.state, result.exit_code, result.info["Restarts"]) == ("FAILED", code, "0")


# ---- whole phases drained by real jobs --------------------------------------------------------


def phase_project(tmp_path: Path, experiments: str) -> Path:
    project = make_project(tmp_path / "project", TINY)
    for path in (project / "phases").glob("phase*.yaml"):
        path.unlink()
    write_phase(project / "phases", experiments)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "slurm test phase")
    return project


def job_env(slurm_cluster) -> dict[str, str]:
    """The cluster's SLURM_CONF with this test's PATH (venv first) and Git identity."""
    env = {**slurm_cluster.env, "PATH": f"{os.environ['PATH']}{os.pathsep}/usr/sbin"}
    env |= {k: v for k, v in os.environ.items() if k.startswith(("GIT_", "DVC_"))}
    return env


def aeselect(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aeselect", "phase", *args, "--repo", str(project)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def submit_phase(project: Path, env: dict[str, str]) -> int:
    submitted = aeselect(project, env, "submit", "1.1", "--cluster", "local-test")
    assert submitted.returncode == 0, submitted.stderr
    return submitted_job(submitted.stdout)


def job_log(project: Path, job: int) -> str:
    return (project / "hpc" / "logs" / f"phase1_1-{job}.out").read_text()


def results(project: Path) -> dict[str, dict]:
    spec = load_phase("1.1", project / "phases")
    frame = collect_results(project, spec, recorded_sweep(project, spec))
    return {row["experiment"]: row for row in frame.to_dict("records")}


@pytest.mark.slurm
@pytest.mark.slow
def test_phase_drains_in_one_job_one_gpu_per_experiment(slurm_cluster, tmp_path):
    project = phase_project(
        tmp_path,
        """\
        lc2: {model.latent_channels: 2}
        lc4: {model.latent_channels: 4}
        lc8: {model.latent_channels: 8}
        """,
    )
    env = job_env(slurm_cluster)
    job = submit_phase(project, env)
    result = slurm_cluster.wait(job, timeout=240)
    assert result.ok, f"{result}\n{job_log(project, job)}"
    rows = results(project)
    assert sorted(rows) == ["p1-1-lc2", "p1-1-lc4", "p1-1-lc8"]
    assert all(row["state"] == "Success" and row["mse"] > 0 for row in rows.values()), rows
    # Each training claims the first free GPU id: id 1 is taken only while another experiment
    # holds id 0, so both ids showing up means two experiments ran side by side on two GPUs.
    gpus = {re.search(r"claimed GPU id (\d+)", row["device"])[1] for row in rows.values()}
    assert gpus == {"0", "1"}, rows
    assert f"job {job} SLURM_RESTART_COUNT=0 CUDA_VISIBLE_DEVICES=0,1" in job_log(project, job)


def experiment_metrics(project: Path, name: str) -> dict:
    """A finished experiment's train summary, from `dvc exp show`."""
    for baseline in exp_show(project):
        for exp in baseline.get("experiments") or []:
            if exp.get("name") == name:
                return exp["revs"][0]["data"]["metrics"]["results/train/metrics.json"]["data"]
    raise AssertionError(f"{name} not in dvc exp show")


def train_metrics(project: Path, name: str) -> dict:
    """The train summary without the timing and device, which may differ."""
    data = experiment_metrics(project, name)
    return {k: v for k, v in data.items() if k not in {*TIMING, "device"}}


LONG = {
    "model.latent_channels": 4,
    "train.max_steps": 300,
    "train.log_every": 5,
    "train.eval_every": 50,
}


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_bit_identically(slurm_cluster, tmp_path):
    params = ", ".join(f"{k}: {v}" for k, v in LONG.items())
    project = phase_project(tmp_path, f"long: {{{params}}}")
    env = job_env(slurm_cluster)
    job = submit_phase(project, env)
    # The training logs every 5 steps in its temporary workspace (.dvc/tmp/exps/standalone/tmp*):
    # signal once it is under way.
    curves = ".dvc/tmp/exps/*/*/results/train/plots/metrics/loss/total.tsv"
    deadline = time.monotonic() + 120
    while not any(len(p.read_text().splitlines()) > 3 for p in project.glob(curves)):
        running = slurm_cluster.state(job) in {"PENDING", "CONFIGURING", "RUNNING"}
        assert running and time.monotonic() < deadline, job_log(project, job)
        time.sleep(0.2)
    slurm_cluster.signal(job, "USR1")  # what --signal=B:USR1@N sends before the time limit
    result = slurm_cluster.wait(job, timeout=180)
    out = job_log(project, job)
    assert result.ok, f"{result}\n{out}"
    assert result.info["Restarts"] == "1", out
    assert "SLURM_RESTART_COUNT=1" in out and "drainer exited 75" in out
    experiment_log = (project / "hpc" / "logs" / f"phase1_1-{job}-p1-1-long.log").read_text()
    stopped = int(re.search(r"stopped at step (\d+)", experiment_log)[1])
    assert 0 < stopped < LONG["train.max_steps"], experiment_log
    assert f"resumed at step {stopped}" in experiment_log

    # The phase's one experiment got both (fake) GPUs: 2 DDP ranks, on gloo as there is no CUDA.
    assert "started on GPU 0,1" in out
    assert "2 processes (DDP)" in experiment_metrics(project, "p1-1-long")["device"]
    # The same run uninterrupted, as the drainer ran it: 2 ranks sharing both cores;
    # --force: not the run cache's copy of the drained result.
    sets = [arg for k, v in LONG.items() for arg in ("-S", f"{k}={v}")]
    straight = subprocess.run(
        ["dvc", "exp", "run", "--temp", "--force", "-n", "straight", *sets],
        cwd=project,
        env={**env, "AESELECT_NUM_THREADS": "2", "AESELECT_NPROC_PER_NODE": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert train_metrics(project, "p1-1-long") == train_metrics(project, "straight")


@pytest.mark.slurm
@pytest.mark.slow
def test_failed_experiment_fails_the_job_and_is_reported(slurm_cluster, tmp_path):
    project = phase_project(
        tmp_path,
        """\
        ok: {model.latent_channels: 4, data.source: synthetic}
        broken: {model.latent_channels: 2, data.source: folder}  # data/raw/images: no such folder
        """,
    )
    env = job_env(slurm_cluster)
    job = submit_phase(project, env)
    result = slurm_cluster.wait(job, timeout=180)
    out = job_log(project, job)
    assert (result.state, result.exit_code) == ("FAILED", 1), f"{result}\n{out}"
    assert results(project)["p1-1-ok"]["state"] == "Success"
    status = aeselect(project, env, "status", "1.1")
    assert status.returncode == 1, status.stdout + status.stderr
    line = next(ln for ln in status.stdout.splitlines() if "p1-1-broken" in ln)
    assert "failed" in line, status.stdout
    log = project / re.search(r"log: (\S+)", line)[1]
    assert "data/raw/images does not exist" in log.read_text()
    assert str(log.relative_to(project)) in out  # the drainer named it in the job log too


@pytest.mark.slow
def test_second_drainer_on_a_repository_refuses(tmp_path):
    project = phase_project(tmp_path, "lc4: {model.latent_channels: 4}")
    env = dict(os.environ)
    queued = aeselect(project, env, "queue", "1.1")
    assert queued.returncode == 0, queued.stderr
    drain = [sys.executable, "-m", "aeselect", "phase", "drain", "1.1", "--repo", str(project)]
    first = subprocess.Popen(drain, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not list(project.glob("hpc/logs/phase1_1-*-p1-1-lc4.log")):  # it holds the lock
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.1)
    second = subprocess.run(drain, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 3, second.stderr
    assert "another drainer" in second.stderr and "one drainer per repository" in second.stderr
    output = first.communicate(timeout=120)[0].decode()
    assert first.returncode == 0, output
    assert results(project)["p1-1-lc4"]["state"] == "Success"


# ---- one phase shared between two profiles (two partitions) -----------------------------------


def shared_profiles(project: Path, workdir: Path) -> None:
    """Two one-GPU profiles on the test cluster's two partitions, as two sites' nodes."""
    profiles = {
        name: {
            "partition": partition,
            "gpus_per_node": 1,
            "parallel_jobs": 1,
            "cpus_per_task": 1,
            "mem": "1G",
            "time": "00:30:00",
            "warn_seconds": 60,
            "setup": [],
            "workdir": str(workdir / name),
        }
        for name, partition in (("site-a", "debug"), ("site-b", "second"))
    }
    profiles["both"] = ["site-a", "site-b"]
    (project / "hpc" / "clusters.yaml").write_text(yaml.safe_dump(profiles, sort_keys=False))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "two sites")


def with_remotes(project: Path, tmp_path: Path) -> None:
    """The project's remotes: a bare Git repository and a local DVC remote."""
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "remote.git")], check=True)
    git(project, "remote", "add", "origin", str(tmp_path / "remote.git"))
    subprocess.run(
        ["dvc", "remote", "add", "-d", "store", str(tmp_path / "dvc-store")],
        cwd=project,
        check=True,
        capture_output=True,
    )
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "remotes")
    git(project, "push", "-q", "origin", "main")


def test_shared_submit_without_remotes_names_the_commands(tmp_path):
    project = phase_project(tmp_path, "lc4: {model.latent_channels: 4}")
    shared_profiles(project, tmp_path / "work")
    env = dict(os.environ)
    missing_git = aeselect(project, env, "submit", "1.1", "--cluster", "both", "--dry-run")
    assert missing_git.returncode == 2
    assert "no Git remote 'origin'" in missing_git.stderr
    assert "`git remote add origin <url>`" in missing_git.stderr
    git(project, "remote", "add", "origin", str(tmp_path / "remote.git"))
    missing_dvc = aeselect(project, env, "submit", "1.1", "--cluster", "both", "--dry-run")
    assert "`dvc remote add -d store /shared/dvc-store`" in missing_dvc.stderr


def test_shared_dry_run_prints_the_plan_and_every_sbatch_line(tmp_path):
    project = phase_project(
        tmp_path,
        """\
        lc2: {model.latent_channels: 2}
        lc4: {model.latent_channels: 4}
        lc8: {model.latent_channels: 8}
        """,
    )
    shared_profiles(project, tmp_path / "work")
    with_remotes(project, tmp_path)
    dry = aeselect(project, dict(os.environ), "submit", "1.1", "--cluster", "both", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    out = dry.stdout
    assert "  site-a (1 at a time): p1-1-lc2, p1-1-lc4\n" in out
    assert "  site-b (1 at a time): p1-1-lc8\n" in out
    plan = re.search(r"^plan (phase1_1-\d{8}T\d{6}): phase 1.1", out, re.M)[1]
    for site, partition in (("site-a", "debug"), ("site-b", "second")):
        line = next(ln for ln in out.splitlines() if f"--job-name=aeselect-phase1_1-{site}" in ln)
        assert f"--partition={partition} --nodes=1 --ntasks=1 --gres=gpu:1" in line
        workdir = tmp_path / "work" / site
        assert (
            f"AESELECT_PLAN={plan},AESELECT_PROFILE={site},"
            f"AESELECT_GIT_URL={tmp_path / 'remote.git'},AESELECT_WORKDIR={workdir}"
        ) in line
        assert "AESELECT_RESUME_DIR" not in line  # the default: in the job's own clone
    assert "# the batch script of site-b, on sbatch's stdin" in out and "as site-a's" in out
    # A dry run queues and publishes nothing.
    assert git(project, "ls-remote", "origin", "refs/aeselect/*") == ""
    assert (
        "Queued"
        not in subprocess.run(
            ["dvc", "queue", "status"], cwd=project, capture_output=True, text=True
        ).stdout
    )


SHARED = f"""\
long: {{{", ".join(f"{k}: {v}" for k, v in LONG.items())}}}
lc2: {{model.latent_channels: 2, train.max_steps: 6, train.log_every: 3, train.eval_every: 3}}
lc8: {{model.latent_channels: 8, train.max_steps: 6, train.log_every: 3, train.eval_every: 3}}
"""


def claim_history(remote: Path, plan: str) -> dict[str, list[dict]]:
    """Every update of every claim of the plan on the Git remote, oldest first."""
    out = git(remote, "for-each-ref", "--format=%(refname)", f"refs/aeselect/claims/{plan}/")
    return {
        ref.rsplit("/", 1)[1]: [
            json.loads(line)
            for line in git(remote, "log", "--reverse", "--format=%s", ref).split("\n")
            if line
        ]
        for ref in out.split()
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_two_profiles_share_a_phase_and_the_results_come_home(slurm_cluster, tmp_path, capsys):
    project = phase_project(tmp_path, SHARED)
    work = tmp_path / "work"
    shared_profiles(project, work)
    with_remotes(project, tmp_path)
    env = job_env(slurm_cluster)
    submitted = aeselect(
        project, env, "submit", "1.1", "--cluster", "site-a", "--cluster", "site-b"
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    plan = re.search(r"^plan (\S+):", submitted.stdout, re.M)[1]
    jobs = dict(
        re.findall(r"Submitted batch job (\d+): phase 1.1, (\S+)'s share", submitted.stdout)
    )
    job_a = int(next(job for job, site in jobs.items() if site == "site-a"))
    job_b = int(next(job for job, site in jobs.items() if site == "site-b"))
    try:
        assert "site-a (1 at a time): p1-1-long, p1-1-lc2" in submitted.stdout

        # Preempt site-a's job while it trains its long experiment, in its own clone under workdir.
        clone_a = work / "site-a" / plan / f"job-{job_a}"
        curves = ".dvc/tmp/exps/*/*/results/train/plots/metrics/loss/total.tsv"
        deadline = time.monotonic() + 180
        while not any(len(p.read_text().splitlines()) > 3 for p in clone_a.glob(curves)):
            assert time.monotonic() < deadline, job_log(project, job_a)
            time.sleep(0.2)
        slurm_cluster.signal(job_a, "USR1")
        preempted_at = stamp()
        results_a = slurm_cluster.wait(job_a, timeout=300)
        results_b = slurm_cluster.wait(job_b, timeout=120)
        log_a, log_b = job_log(project, job_a), job_log(project, job_b)
        assert results_a.ok and results_b.ok, f"{results_a}\n{log_a}\n{results_b}\n{log_b}"
        assert results_a.info["Restarts"] == "1" and "drainer exited 75" in log_a, log_a

        # Exactly once: one claim per experiment, every update of it by one job, its result pushed.
        history = claim_history(tmp_path / "remote.git", plan)
        assert sorted(history) == ["p1-1-lc2", "p1-1-lc8", "p1-1-long"], history
        for name, updates in history.items():
            assert len({u["job"] for u in updates}) == 1, (name, updates)
            assert (updates[-1]["status"], updates[-1]["pushed"]) == ("success", True), updates
        assert history["p1-1-long"][0]["job"] == str(job_a)
        assert [u["status"] for u in history["p1-1-long"]] == [
            "claimed",
            "running",
            "interrupted",
            "running",
            "success",
        ]
        logs = {
            name: sorted(work.glob(f"*/{plan}/job-*/hpc/logs/*-{name}.log")) for name in history
        }
        for name, files in logs.items():
            assert len(files) == 1, (name, files)  # one job's clone ran it ...
            runs = files[0].read_text().count(f"dvc exp run --temp -n {name} ")
            assert runs == (2 if name == "p1-1-long" else 1), files[0].read_text()  # ... once
        long_log = logs["p1-1-long"][0].read_text()
        stopped = int(re.search(r"stopped at step (\d+)", long_log)[1])
        assert f"resumed at step {stopped}" in long_log  # the requeued job resumed its own claim
        # site-b finished its share (one short run) while site-a trained, was preempted and waited
        # for its requeue: it took site-a's unstarted lc2.
        assert history["p1-1-lc2"][0]["job"] == str(job_b), history["p1-1-lc2"]
        assert "[drain] p1-1-lc2: claimed from site-a's share" in log_b, log_b
        remote_exps = git(
            tmp_path / "remote.git", "for-each-ref", "--format=%(refname)", "refs/exps/"
        )
        assert sorted(ref.rsplit("/", 1)[1] for ref in remote_exps.split()) == sorted(history)
        assert not list(
            project.glob(".dvc/tmp/exps/*/*/results")
        )  # nothing ran in the user's clone

        # The user's clone: who ran what, then compare pulls the results and decides from all three.
        status = aeselect(project, env, "status", "1.1")
        assert status.returncode == 0, status.stdout + status.stderr
        for name, updates in history.items():
            line = next(ln for ln in status.stdout.splitlines() if ln.startswith(f"{name} "))
            assert f"job {updates[-1]['job']} on {updates[-1]['node']}, pushed" in line, line
        compare = aeselect(project, env, "compare", "1.1")
        assert compare.returncode == 0, compare.stdout + compare.stderr
        pull = "dvc exp pull origin p1-1-lc2 p1-1-lc8 p1-1-long"
        assert pull in compare.stdout + compare.stderr
        rows = results(project)
        assert all(rows[name]["state"] == "Success" and rows[name]["mse"] > 0 for name in history)
        promote = aeselect(project, env, "promote", "1.1")
        assert promote.returncode == 0, promote.stdout + promote.stderr
        decision = yaml.safe_load((project / "phases" / "decisions" / "1.1.yaml").read_text())
        assert decision["winner"] in history
    finally:  # a failed assertion must not leave the jobs running
        for job in jobs:
            slurm_cluster.run("scancel", job, check=False)

    # The timeline for the record: claim updates (in their order) and job starts, by time.
    events = [
        (
            u["at"],
            step,
            f"{name:10s} job {u['job']} ({u['profile']} on {u['node']}): {u['status']}"
            + (", pushed" if u["pushed"] else ""),
        )
        for name, updates in history.items()
        for step, u in enumerate(updates)
    ]
    starts = re.findall(
        r"\[drain.sbatch\] (\S+) host \S+ job (\d+) SLURM_RESTART_COUNT=(\d)", log_a + log_b
    )
    events += [(at[:19], -1, f"job {job} starts (restart {n})") for at, job, n in starts]
    events.append(
        (preempted_at, 0, f"SIGUSR1 to job {job_a} (preemption): p1-1-long stops at step {stopped}")
    )
    stolen = history["p1-1-lc2"][0]
    events.append((stolen["at"], 0, f"job {job_b} takes p1-1-lc2 from site-a's share"))
    timeline = [f"{at}  {text}" for at, _, text in sorted(events)]
    timeline += [f"user's clone: {pull}", f"user's clone: promote -> {decision['winner']}"]
    (tmp_path / "timeline.txt").write_text("\n".join(timeline) + "\n")
    with capsys.disabled():
        print("\n" + "\n".join(timeline))


@pytest.mark.slurm
def test_a_claim_of_a_job_slurm_no_longer_runs_is_recognised(slurm_cluster, monkeypatch):
    from aeselect.cluster.home import job_ended, this_cluster
    from aeselect.cluster.share import ClaimRecord

    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))
    monkeypatch.setenv("PATH", f"{os.environ['PATH']}{os.pathsep}/usr/sbin")
    this_cluster.cache_clear()
    job = slurm_cluster.submit("#!/bin/bash\nsleep 60\n", "--partition=second")
    slurm_cluster.wait_state(job, "RUNNING")
    claim = ClaimRecord(str(job), this_cluster(), "site-b", "node", "running")
    assert this_cluster() == "aeselect" and not job_ended(claim)
    assert not job_ended(ClaimRecord(str(job), "elsewhere", "x", "node", "running"))  # can't tell
    slurm_cluster.cancel(job)
    slurm_cluster.wait(job, timeout=30)
    assert job_ended(claim)
    assert job_ended(ClaimRecord("999999", this_cluster(), "site-b", "node", "running"))
    this_cluster.cache_clear()
