"""Fixture ``slurm_cluster``: a real single-node SLURM cluster on localhost.

The session-scoped fixture runs ``hpc/testing/start_cluster.sh`` (idempotent:
it reuses a healthy cluster already running in the same state dir), yields a
:class:`SlurmCluster` and, at the end of the session, runs ``stop_cluster.sh``
-- but only if this fixture started the cluster and ``AESELECT_SLURM_KEEP`` is
not ``1``.

Skips (with the reason) only when CI is not ``true`` and the machine cannot
host the cluster (not root, or SLURM missing and no apt-get).  Under
``CI=true`` any failure to start FAILS the tests.

Environment:
    AESELECT_SLURM_DIR   state dir (default /tmp/aeselect-slurm), see start_cluster.sh
    AESELECT_SLURM_KEEP  1 = leave the cluster running after the session
    CI                   true = never skip
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
START = REPO / "hpc" / "testing" / "start_cluster.sh"
STOP = REPO / "hpc" / "testing" / "stop_cluster.sh"
DEFAULT_DIR = "/tmp/aeselect-slurm"

# Final job states (a REQUEUED/PENDING/COMPLETING job is not finished yet).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    }
)
# Caller variables that would change what sbatch/squeue do (SQUEUE_FORMAT,
# SBATCH_*, an outer job's SLURM_JOB_ID, ...) are not passed to the commands.
_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")
_KEY_RE = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")


def parse_kv(line: str) -> dict[str, str]:
    """Parse a ``Key=value Key2=value two`` line (scontrol -o, jobcomp/filetxt)."""
    matches = list(_KEY_RE.finditer(line))
    out: dict[str, str] = {}
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        end = nxt.start() if nxt else len(line)
        out[m.group(1)] = line[m.end() : end].strip()
    return out


def _split_exit(value: str) -> tuple[int, int]:
    code, _, sig = value.partition(":")
    return int(code or 0), int(sig or 0)


@dataclass(frozen=True)
class JobResult:
    """Final state of a job. ``exit_code``/``signal`` come from ExitCode=<code>:<signal>."""

    job_id: int
    state: str
    exit_code: int
    signal: int
    source: str  # "scontrol" or "jobcomp"
    info: Mapping[str, str] = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == 0 and self.signal == 0


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """Handle on the running test cluster; all commands run with its SLURM_CONF."""

    def __init__(self, state_dir: Path, env: Mapping[str, str], started: bool) -> None:
        self.state_dir = state_dir
        self.slurm_conf = Path(env["SLURM_CONF"])
        self.jobcomp_path = state_dir / "jobcomp.txt"
        self.jobs_dir = state_dir / "jobs"  # default cwd of submit()
        self.started = started  # False: the cluster was already up (reused)
        base = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
        base["PATH"] = base.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        base.update(env)
        self.env: dict[str, str] = base  # pass to your own subprocesses

    # ---------------------------------------------------------------- commands
    def run(
        self, *cmd: str, check: bool = True, timeout: float = 30, **kw
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (``run("squeue", "-h")``) against this cluster."""
        env = {**self.env, **kw.pop("env", {})}
        proc = subprocess.run(
            list(cmd), env=env, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def submit(
        self,
        script: str | os.PathLike[str],
        *sbatch_args: str,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """``sbatch --parsable [args] script`` -> job id.

        ``script`` is a path (``Path``, or a one-line ``str`` naming a file) or
        the script text itself (a ``str`` with a newline, piped to sbatch).
        ``env`` adds variables; sbatch's default ``--export=ALL`` passes them on
        to the job.  ``cwd`` (default: <state dir>/jobs) is the job's working dir
        and where slurm-%j.out lands unless ``--output`` is given.
        """
        is_text = isinstance(script, str) and "\n" in script
        cmd = ["sbatch", "--parsable", *sbatch_args]
        if not is_text:
            cmd.append(os.fspath(script))
        workdir = Path(cwd) if cwd is not None else self.jobs_dir
        workdir.mkdir(parents=True, exist_ok=True)
        proc = self.run(*cmd, input=script if is_text else None, cwd=workdir, env=dict(env or {}))
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str] | None:
        """``scontrol show job -o`` as a dict, or None once the job is unknown."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stdout + proc.stderr:
                return None
            raise SlurmError(f"scontrol show job {job_id}: {proc.stdout}{proc.stderr}")
        return parse_kv(proc.stdout.strip().splitlines()[0])

    def state(self, job_id: int) -> str | None:
        info = self.job_info(job_id)
        return info.get("JobState") if info else None

    def jobcomp(self, job_id: int) -> dict[str, str] | None:
        """Last jobcomp/filetxt record of the job (a line per finished run), or None."""
        if not self.jobcomp_path.exists():
            return None
        last = None
        prefix = f"JobId={job_id} "
        for line in self.jobcomp_path.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                last = line
        return parse_kv(last) if last else None

    def wait_state(self, job_id: int, states: str | set[str], timeout: float = 30) -> str:
        """Wait until the job is in one of ``states`` (e.g. "RUNNING"); returns it."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = self.state(job_id)
            if st in wanted:
                return st
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout}s (is {st})")

    def wait(self, job_id: int, timeout: float = 60) -> JobResult:
        """Wait for the job to finish; returns its final state and exit code.

        Polls ``scontrol show job`` (jobs stay known for MinJobAge=3600 s); if the
        job has left the controller, the jobcomp file gives the ExitCode.
        """
        deadline = time.monotonic() + timeout
        st = None
        while True:
            info = self.job_info(job_id)
            if info is None:
                # A requeued run also leaves a record (JobState=PENDING): skip it.
                rec = self.jobcomp(job_id)
                if rec is not None and rec.get("JobState") in TERMINAL_STATES:
                    code, sig = _split_exit(rec.get("ExitCode", "0:0"))
                    return JobResult(job_id, rec.get("JobState", "?"), code, sig, "jobcomp", rec)
            else:
                st = info.get("JobState")
                if st in TERMINAL_STATES:
                    code, sig = _split_exit(info.get("ExitCode", "0:0"))
                    return JobResult(job_id, st, code, sig, "scontrol", info)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} not finished after {timeout}s (state {st})\n{self.diagnostics()}"
                )
            time.sleep(0.2)

    def stdout(self, job_id: int) -> str:
        """Contents of the job's StdOut file ('' if it does not exist yet)."""
        info = self.job_info(job_id)
        if not info or not info.get("StdOut"):
            raise SlurmError(f"job {job_id}: StdOut unknown")
        path = Path(info["StdOut"])
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, job_id: int, sig: str = "USR1", batch: bool = True) -> None:
        """``scancel --signal=SIG [--batch]``: signal the batch shell (not the steps)."""
        self.run("scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id))

    def requeue(self, job_id: int) -> None:
        self.run("scontrol", "requeue", str(job_id))

    def cancel(self, job_id: int) -> None:
        self.run("scancel", str(job_id))

    @staticmethod
    def wait_for_file(path: Path, timeout: float = 30) -> Path:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear within {timeout}s")
            time.sleep(0.05)
        return path

    def diagnostics(self) -> str:
        parts = []
        for cmd in (("squeue", "-a"), ("sinfo", "-N", "-l")):
            try:
                p = self.run(*cmd, check=False, timeout=10)
                parts.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
            except (OSError, subprocess.TimeoutExpired) as e:
                parts.append(f"$ {' '.join(cmd)}: {e}")
        for name in ("slurmctld.log", "slurmd.log"):
            log = self.state_dir / "log" / name
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- tail {log}\n" + "\n".join(tail))
        return "\n".join(parts)


def _is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _cannot_host_reason() -> str | None:
    if os.geteuid() != 0:
        return "SLURM tests need root (start_cluster.sh runs slurmctld/slurmd as root)"
    have = shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()
    if not have and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = _cannot_host_reason()
    if reason and not _is_ci():
        pytest.skip(f"{reason} (set CI=true to make this a failure)")

    state_dir = Path(os.environ.get("AESELECT_SLURM_DIR") or DEFAULT_DIR)
    env = {**os.environ, "AESELECT_SLURM_DIR": str(state_dir)}
    try:
        proc = subprocess.run(
            ["bash", str(START)], env=env, capture_output=True, text=True, timeout=900
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"start_cluster.sh timed out after {e.timeout}s:\n{e.stderr}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"start_cluster.sh failed (rc={proc.returncode}):\n{proc.stderr}{proc.stdout}",
            pytrace=False,
        )

    exports: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            exports[key] = value
    if "SLURM_CONF" not in exports:
        pytest.fail(f"start_cluster.sh printed no SLURM_CONF:\n{proc.stdout}", pytrace=False)
    started = "# started" in proc.stdout

    cluster = SlurmCluster(state_dir, exports, started=started)
    try:
        yield cluster
    finally:
        if started and os.environ.get("AESELECT_SLURM_KEEP") != "1":
            subprocess.run(
                ["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=120
            )
