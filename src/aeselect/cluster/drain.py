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

With a phase `budget:`, the drainer also coordinates the rungs (aeselect.cluster.rungs): a run
that pauses at a rung frees its slot, a rung is judged once every live run has paused there, and
the survivors resume; a pruned run ends there and counts as done.

Exit codes: 0 all of the phase succeeded (or was pruned), 1 some failed, 75 stopped by
SIGUSR1/SIGTERM (requeue me), 3 another drainer holds this repository.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aeselect.cluster.claims import Claim, claim_queued, read_claims
from aeselect.cluster.rungs import RungBook
from aeselect.cluster.share import UNFINISHED, Plan, SharedClaims, job_identity, read_plan
from aeselect.dvc import DvcError, exp_push, set_default_remote, start_exp_run
from aeselect.envvars import (
    NNODES_ENV,
    NPROC_ENV,
    PIDFILE_ENV,
    PREEMPTED_EXIT_CODE,
    THREADS_ENV,
)
from aeselect.paths import HPC_LOG_DIR as LOG_DIR
from aeselect.phases.decide import requirement_failures
from aeselect.sweep.claim_states import DRAIN_DIR
from aeselect.sweep.names import file_order
from aeselect.sweep.spec import PhaseSpec
from aeselect.sweep.status import Status

ANOTHER_DRAINER_EXIT_CODE = 3
POLL_SECONDS = 0.5


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
        self.claims: dict[str, Claim] = {}
        self.todo: list[Claim] = []
        self.rungs = RungBook(repo, spec, spec.budget) if spec.budget else None
        self.paused: list[str] = []  # this drain's runs waiting at a rung (or runnable again)
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
        if self.rungs is not None:
            extra |= self.rungs.prepare(claim)
        with log.open("a") as out:
            self.running[claim.name] = start_exp_run(
                claim.name,
                claim.overrides,
                self.repo,
                env=extra,
                log=out,
                label=f"[drain] job {self.job_id}",
                # Ignored signals survive exec: the drainer forwards USR1 to the training alone.
                preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN),
            )
        claim.status, claim.log = Status.RUNNING, str(log.relative_to(self.repo))
        claim.jobs.append(self.job_id)
        claim.save(self.repo)
        gpus = ",".join(self.gpus_of.get(claim.name, [])) or "none"
        print(f"[drain] {claim.name}: started on GPU {gpus}, log {claim.log}", file=sys.stderr)

    def finish(self, claim: Claim, returncode: int) -> None:
        self.free_gpus += self.gpus_of.pop(claim.name, [])
        claim.returncode = returncode
        if returncode != 0 and self.rungs is not None and self.rungs.reached_rung(claim):
            claim.status, claim.rung = Status.PAUSED, claim.rung + 1
            self.paused.append(claim.name)
        elif returncode == 0:
            claim.status = Status.SUCCESS
        elif self.stop_signal is not None:
            claim.status = Status.INTERRUPTED
        else:
            claim.status = Status.FAILED
        claim.save(self.repo)
        print(f"[drain] {claim.name}: {claim.status} (exit {returncode})", file=sys.stderr)

    def collect(self) -> None:
        """Take the phase's fresh tasks out of DVC's queue: what this drainer runs."""
        self.claims = read_claims(self.repo, self.spec)
        fresh = claim_queued(self.repo, self.spec, self.claims)
        mine = [c for c in self.claims.values() if c.name in fresh and not c.plan]
        # The claims are read in name order; start them in the phase file's.
        mine.sort(key=lambda claim: file_order(self.spec, claim.name))
        self.todo = [c for c in mine if c.status in UNFINISHED and not self.excluded(c)]
        self.paused = [c.name for c in mine if c.status == Status.PAUSED]

    def excluded(self, claim: Claim) -> bool:
        """With a budget, a run whose params alone fail a requirement (the latent size) is left
        out before it trains: its claim ends `excluded`, saying why."""
        if self.rungs is None:
            return False
        failures = requirement_failures(self.spec.decide, claim.params)
        if not failures:
            return False
        claim.status, claim.excluded = Status.EXCLUDED, "; ".join(why for why, _ in failures)
        claim.save(self.repo)
        print(f"[drain] {claim.name}: excluded, untrained: {claim.excluded}", file=sys.stderr)
        return True

    def take_next(self) -> Claim | None:
        """The next experiment to start: one not started yet, else one whose rung is judged and
        that goes on; None when there is none for now."""
        if self.todo:
            return self.todo.pop(0)
        for name in self.paused:
            if self.rungs is not None and self.rungs.runnable(self.claims[name]):
                self.paused.remove(name)
                return self.claims[name]
        return None

    def judge_rung(self) -> bool:
        """Judge the rung every live run has paused at, if there is one; True if judged."""
        runs = [self.claims[c.name] for c in self.todo] + [self.claims[n] for n in self.paused]
        runs += [self.claims[n] for n in self.running]
        standings = self.rungs.judge_ready(runs) if self.rungs is not None else []
        for standing in standings:
            verdict = "pruned" if standing.pruned else "goes on"
            print(f"[drain] rung: {standing.describe()}: {verdict}", file=sys.stderr)
        self.paused = [n for n in self.paused if self.claims[n].status == Status.PAUSED]
        return bool(standings)

    def run(self) -> int:
        self.collect()
        # Work is only ever taken, never given back: once none, none until a run pauses at a
        # rung or a rung is judged (its survivors may resume then).
        more = True
        while more or self.running:
            while more and len(self.running) < self.jobs and self.stop_signal is None:
                claim = self.take_next()
                if claim is None:
                    more = False
                else:
                    self.start(claim)
            for name, process in list(self.running.items()):
                if process.poll() is not None:
                    del self.running[name]
                    self.finish(self.claims[name], process.returncode)
                    more = more or self.claims[name].status == Status.PAUSED
            if self.stop_signal is None and self.judge_rung():
                more = True  # its survivors may resume
            if self.stop_signal is not None and not self.running:
                break
            time.sleep(POLL_SECONDS)
        if self.stop_signal is not None:
            return PREEMPTED_EXIT_CODE
        return self.report()

    def report(self) -> int:
        for claim in self.claims.values():
            if claim.status == Status.PRUNED and claim.jobs and claim.jobs[-1] == self.job_id:
                print(f"[drain] {claim.name}: pruned at step {claim.pruned_at}", file=sys.stderr)
        failed = [c for c in self.claims.values() if c.status == Status.FAILED]
        for claim in failed:
            print(f"[drain] FAILED {claim.name}: see {claim.log}", file=sys.stderr)
        return 1 if failed else 0


class SharedDrainer(Drainer):
    """A job's drainer for a plan shared with other jobs (aeselect.cluster.share): it works in
    its own clone of the plan's commit, takes experiments by claims on the Git remote (its own
    share first, then unstarted ones of other shares) and pushes each success home at once."""

    def __init__(self, repo: Path, spec: PhaseSpec, jobs: int, plan: Plan, profile: str):
        super().__init__(repo, spec, jobs)
        self.plan, self.profile = plan, profile
        self.shared = SharedClaims(repo, plan)
        self.me = job_identity(profile)
        self.offered: set[str] = set()  # taken by this process: never offered twice

    def collect(self) -> None:
        self.claims = read_claims(self.repo, self.spec)  # a requeued job's, from its first run
        set_default_remote(self.repo, self.plan.dvc_remote, self.plan.dvc_url)

    def record(self, claim: Claim, status: Status, *, pushed: bool = False) -> None:
        log = str(self.repo / claim.log) if claim.log else ""
        self.shared.update(claim.name, self.me.now(status=status, pushed=pushed, log=log))

    def local_claim(self, name: str) -> Claim:
        self.offered.add(name)
        if name not in self.claims:
            experiment = self.plan.experiments[name]
            self.claims[name] = Claim(
                name,
                experiment["overrides"],
                baseline=self.plan.base,
                params=experiment["params"],
                claimed_at=dt.datetime.now().isoformat(timespec="seconds"),
                plan=self.plan.id,
            )
        return self.claims[name]

    def take_next(self) -> Claim | None:
        held = self.shared.fetch()
        order = self.plan.order_for(self.profile)
        for name in order:  # after a requeue: this job's own interrupted experiments first
            holder = held.get(name, ("", None))[1]
            mine = holder is not None and holder.held_by(self.me.job, self.me.cluster)
            if not mine or holder.status not in UNFINISHED or name in self.offered:
                continue
            ended = self.claims.get(name)
            if ended is not None and ended.status in (Status.SUCCESS, Status.FAILED):
                # It ended before the job was stopped, the shared claim not told yet: tell it.
                self.offered.add(name)
                self.finish(ended, ended.returncode or 0)
                continue
            print(f"[drain] {name}: resuming this job's claim", file=sys.stderr)
            return self.local_claim(name)
        for name in order:
            if name not in held and self.shared.take(name, self.me.now()):
                theirs = next(s for s, names in self.plan.shares.items() if name in names)
                taken = "claimed" if theirs == self.profile else f"claimed from {theirs}'s share"
                print(f"[drain] {name}: {taken}", file=sys.stderr)
                return self.local_claim(name)
        return None

    def start(self, claim: Claim) -> None:
        super().start(claim)
        self.record(claim, Status.RUNNING)

    def finish(self, claim: Claim, returncode: int) -> None:
        super().finish(claim, returncode)
        if claim.status != Status.SUCCESS:
            self.record(claim, claim.status)
            return
        self.record(claim, Status.SUCCESS, pushed=self.push(claim))

    def push(self, claim: Claim) -> bool:
        """`dvc exp push` the finished experiment to the plan's remotes; False if it failed."""
        try:
            exp_push(self.repo, self.plan.git_remote, [claim.name])
        except DvcError as err:
            print(f"[drain] {claim.name}: push failed: {err}", file=sys.stderr)
            return False
        claim.pushed = True
        claim.save(self.repo)
        print(f"[drain] {claim.name}: pushed to {self.plan.git_remote}", file=sys.stderr)
        return True

    def report(self) -> int:
        """Failed like a lone drainer's, and a success that is not home yet fails the job too."""
        unpushed = [c for c in self.claims.values() if c.status == Status.SUCCESS and not c.pushed]
        for claim in unpushed:
            if self.push(claim):
                self.record(claim, Status.SUCCESS, pushed=True)
            else:
                print(f"[drain] NOT PUSHED {claim.name}: `dvc exp push`", file=sys.stderr)
        failed = super().report()
        return 1 if failed or any(not c.pushed for c in unpushed) else 0


def drain(
    repo: Path, spec: PhaseSpec, jobs: int, plan_id: str | None = None, profile: str | None = None
) -> int:
    lock = DrainerLock(repo)
    if not lock.acquire():
        print(
            f"aeselect phase drain: another drainer ({lock.holder()}) is draining {repo}; one "
            "drainer per repository clone (to share a phase between nodes: `aeselect phase "
            "submit <phase> --cluster A --cluster B`, each job in its own clone)",
            file=sys.stderr,
        )
        return ANOTHER_DRAINER_EXIT_CODE
    if plan_id is None:
        drainer = Drainer(repo, spec, jobs)
    else:
        drainer = SharedDrainer(repo, spec, jobs, read_plan(repo, plan_id), profile or "")
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, drainer.on_signal)
    return drainer.run()
