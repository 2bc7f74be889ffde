"""The drainer: runs a phase's queued experiments inside one allocation (a SLURM job or a box).

Why not DVC's own workers: `dvc queue start` daemonizes them out of the job's process group, gives
them the environment of whoever started the first one (so no per-experiment GPU), and a worker
killed with SIGKILL leaves its task "Running" forever. Here the experiments stay declared with
`dvc exp run --queue`; the drainer claims each Queued task (a durable record under
.dvc/tmp/aeselect-drain/ is written first, then the task leaves DVC's queue) and runs it as its
own child `dvc exp run --temp` with one GPU of the allocation (the drainer narrows
CUDA_VISIBLE_DEVICES; the training's lock-file claim then only confirms it) and cores/N threads.
Every claimed experiment ends Success, Failed (with its log) or Interrupted; an interrupted one
(the job was signalled; its training left a resume snapshot) runs again when the job is
requeued, so each queued experiment completes exactly once.

Exit codes: 0 all of the phase succeeded, 1 some failed, 75 stopped by SIGUSR1/SIGTERM (requeue
me), 3 another drainer holds this repository.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aeselect.dvc import dvc_env, dvc_executable
from aeselect.envvars import (
    NNODES_ENV,
    NPROC_ENV,
    PIDFILE_ENV,
    PREEMPTED_EXIT_CODE,
    THREADS_ENV,
)
from aeselect.paths import HPC_LOG_DIR as LOG_DIR
from aeselect.phases.experiments import (
    DRAIN_DIR,
    canonical_params,
    claim_records,
    dvc_command,
    load_phase_runs,
    parse_run_name,
    queue_states,
    recorded_sweep,
)
from aeselect.phases.spec import PhaseSpec

ANOTHER_DRAINER_EXIT_CODE = 3
POLL_SECONDS = 0.5


@dataclass
class Claim:
    """One experiment taken from DVC's queue; its file is the source of truth once written."""

    name: str
    overrides: dict[str, Any]
    status: str = "claimed"  # claimed | running | success | failed | interrupted
    log: str = ""
    jobs: list[str] = field(default_factory=list)
    returncode: int | None = None
    # What `phase status`/`compare` judge the run by while DVC's queue no longer lists it:
    baseline: str = ""  # HEAD when claimed; the run is `dvc exp run --temp` on HEAD
    params: dict[str, Any] = field(default_factory=dict)  # its canonical params
    claimed_at: str = ""  # local time, as `dvc exp show` stamps runs: a newer DVC record wins

    def path(self, repo: Path) -> Path:
        return repo / DRAIN_DIR / f"{self.name}.json"

    def save(self, repo: Path) -> None:
        path = self.path(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)


def read_claims(repo: Path, spec: PhaseSpec) -> dict[str, Claim]:
    """The claims on this phase's runs, whichever attempt (`p1-1-lc8`, `p1-1-lc8_2`, ...)."""
    return {
        name: Claim(**record)
        for name, record in claim_records(repo).items()
        if parse_run_name(spec, name) is not None
    }


class DrainerLock:
    """One drainer per repository: DVC's queue and Git refs are local files that two drainers
    would race on. The lock is an flock, released by the kernel however the drainer dies."""

    def __init__(self, repo: Path):
        self.path = repo / DRAIN_DIR / "drainer.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a+")

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} job {os.environ.get('SLURM_JOB_ID', '-')}\n")
        self.handle.flush()
        return True

    def holder(self) -> str:
        self.handle.seek(0)
        return self.handle.read().strip() or "unknown"


def claim_queued(repo: Path, spec: PhaseSpec, claims: dict[str, Claim]) -> set[str]:
    """Move the phase's fresh Queued tasks from DVC's queue into claims (record first, then
    remove); returns the names of the phase's fresh runs. A stale task (queued on other params
    or code: it could never count) stays unclaimed."""
    view = load_phase_runs(repo, spec, recorded_sweep(repo, spec))
    head_params = canonical_params(view.baseline.params) or {}
    fresh = {run.name: run for run in view.runs if run.fresh}
    in_dvc = queue_states(repo)  # only tasks still there have a task id to remove
    for name, run in fresh.items():
        if name not in in_dvc or in_dvc[name].status != "Queued":
            continue
        if name not in claims:
            overrides = {k: v for k, v in run.params.items() if head_params.get(k) != v}
            claims[name] = Claim(
                name,
                overrides,
                baseline=view.baseline.commit,
                params=run.params,
                claimed_at=dt.datetime.now().isoformat(timespec="seconds"),
            )
            claims[name].save(repo)
        subprocess.run(
            [dvc_executable(), "queue", "remove", name],
            cwd=repo,
            env=dvc_env(),
            check=True,
            capture_output=True,
        )
    return set(fresh)


def _cpus() -> int:
    return int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))


def _state_and_parent(pid: int) -> tuple[str, int]:
    """From /proc/<pid>/stat; the name before them may hold spaces and ')', so split after it."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
    return state, int(parent)


def is_live_descendant(pid: int, ancestor: int) -> bool:
    """Whether `pid` runs (not a zombie) below `ancestor` in the process tree."""
    try:
        state, parent = _state_and_parent(pid)
        if state in ("Z", "X"):
            return False
        while parent != ancestor:
            if parent <= 1:
                return False
            parent = _state_and_parent(parent)[1]
    except OSError:  # exited while we walked, or not ours to read (hidepid)
        return False
    return True


def signal_descendant(pid: int, ancestor: int, signum: int) -> bool:
    """Send `signum` to `pid` only while it is a live descendant of `ancestor`; True if sent.

    A pid read from a file may belong to a process that has exited, its number since reused by
    another. A pidfd pins the process before the check, so a pid reused between the check and
    the signal is never hit (kernels before 5.3 lack pidfd_open: then os.kill follows the check).
    """
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # ENOSYS: no pidfd_open in this kernel
        pidfd = None
    try:
        if not is_live_descendant(pid, ancestor):
            return False
        if pidfd is None:
            os.kill(pid, signum)
        else:
            signal.pidfd_send_signal(pidfd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


class Drainer:
    def __init__(self, repo: Path, spec: PhaseSpec, jobs: int):
        # As `phase run`: never more slots than experiments, so a one-experiment phase (the
        # final training) gets every core.
        self.repo, self.spec, self.jobs = repo, spec, max(1, min(jobs, len(spec.names())))
        self.job_id = os.environ.get("SLURM_JOB_ID", f"local{os.getpid()}")
        self.running: dict[str, subprocess.Popen] = {}
        self.stop_signal: int | None = None
        # GPUs of the allocation, handed out one per running experiment and taken back at its end;
        # a phase of one experiment (the final training) gets them all, one DDP rank per GPU.
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.free_gpus = [d.strip() for d in visible.split(",") if d.strip()]
        self.gpus_per_experiment = len(self.free_gpus) if len(spec.names()) == 1 else 1
        self.gpus_of: dict[str, list[str]] = {}
        # ... and, in a job of several nodes (a profile's `nodes`), the GPUs of every node.
        nodes = os.environ.get("SLURM_NNODES", "1")
        self.nodes = int(nodes) if len(spec.names()) == 1 and nodes.isdigit() else 1

    def on_signal(self, signum: int, frame: Any) -> None:
        """Stop starting experiments; ask running trainings to snapshot and exit (once)."""
        if self.stop_signal is not None:
            return
        self.stop_signal = signum
        print(f"[drain] signal {signum}: stopping; running trainings snapshot", file=sys.stderr)
        for name, process in self.running.items():
            pidfile = self.repo / DRAIN_DIR / f"{name}.pid"
            # Not training (yet, or any more): its current stage finishes, or SLURM's SIGTERM
            # reaches it. The pid is signalled only while a live process under this experiment's
            # `dvc exp run` holds it: a stale file's pid may now be any other process's.
            with contextlib.suppress(FileNotFoundError, ValueError):
                signal_descendant(int(pidfile.read_text()), process.pid, signal.SIGUSR1)

    def start(self, claim: Claim) -> None:
        log = self.repo / LOG_DIR / f"{self.spec.path.stem}-{self.job_id}-{claim.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        pidfile = self.repo / DRAIN_DIR / f"{claim.name}.pid"
        pidfile.unlink(missing_ok=True)
        # Threads depend on -j only, never on how many experiments remain: a resumed run must
        # compute with the same thread count to stay bit-identical.
        extra = {THREADS_ENV: str(max(1, _cpus() // self.jobs)), PIDFILE_ENV: str(pidfile)}
        if self.free_gpus:
            gpus = self.gpus_of[claim.name] = self.free_gpus[: self.gpus_per_experiment]
            del self.free_gpus[: self.gpus_per_experiment]
            extra |= {"CUDA_VISIBLE_DEVICES": ",".join(gpus), NPROC_ENV: str(len(gpus))}
        if self.nodes > 1:
            extra[NNODES_ENV] = str(self.nodes)
        env = dvc_env(extra)
        args = dvc_command(claim.name, claim.overrides)
        args[args.index("--queue")] = "--temp"
        with log.open("a") as out:
            out.write(f"[drain] job {self.job_id}: dvc {' '.join(args)}\n")
            out.flush()
            self.running[claim.name] = subprocess.Popen(
                [dvc_executable(), *args],
                cwd=self.repo,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Ignored signals survive exec: the drainer forwards USR1 to the training alone.
                preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN),
            )
        claim.status, claim.log = "running", str(log.relative_to(self.repo))
        claim.jobs.append(self.job_id)
        claim.save(self.repo)
        gpus = ",".join(self.gpus_of.get(claim.name, [])) or "none"
        print(f"[drain] {claim.name}: started on GPU {gpus}, log {claim.log}", file=sys.stderr)

    def finish(self, claim: Claim, returncode: int) -> None:
        self.free_gpus += self.gpus_of.pop(claim.name, [])
        claim.returncode = returncode
        if returncode == 0:
            claim.status = "success"
        elif self.stop_signal is not None:
            claim.status = "interrupted"
        else:
            claim.status = "failed"
        claim.save(self.repo)
        print(f"[drain] {claim.name}: {claim.status} (exit {returncode})", file=sys.stderr)

    def run(self) -> int:
        claims = read_claims(self.repo, self.spec)
        fresh = claim_queued(self.repo, self.spec, claims)
        todo = [
            c
            for c in claims.values()
            if c.status in ("claimed", "running", "interrupted") and c.name in fresh
        ]
        while todo or self.running:
            while todo and len(self.running) < self.jobs and self.stop_signal is None:
                self.start(todo.pop(0))
            for name, process in list(self.running.items()):
                if process.poll() is not None:
                    del self.running[name]
                    self.finish(claims[name], process.returncode)
            if self.stop_signal is not None and not self.running:
                break
            time.sleep(POLL_SECONDS)
        if self.stop_signal is not None:
            return PREEMPTED_EXIT_CODE
        failed = [c for c in claims.values() if c.status == "failed"]
        for claim in failed:
            print(f"[drain] FAILED {claim.name}: see {claim.log}", file=sys.stderr)
        return 1 if failed else 0


def drain(repo: Path, spec: PhaseSpec, jobs: int) -> int:
    lock = DrainerLock(repo)
    if not lock.acquire():
        print(
            f"aeselect phase drain: another drainer ({lock.holder()}) is draining {repo}; one "
            "drainer per repository clone (for several nodes, give each its own clone; see the "
            "README, 'Run on a SLURM cluster')",
            file=sys.stderr,
        )
        return ANOTHER_DRAINER_EXIT_CODE
    drainer = Drainer(repo, spec, jobs)
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, drainer.on_signal)
    return drainer.run()
