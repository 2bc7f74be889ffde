"""DVC, driven through its command line: the one place that spawns `dvc` processes, and that
reads what an experiment recorded (`dvc.api`).

The CLI (not `dvc.repo.Repo`) is the interface users type and DVC keeps stable; every call runs
with analytics off and returns its output or raises with DVC's own message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, Any, NamedTuple


class DvcError(RuntimeError):
    """A dvc command failed; the message carries the command and DVC's output."""


def dvc_executable() -> str:
    """The `dvc` beside this interpreter (the project venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("dvc")
    return str(beside) if beside.exists() else (shutil.which("dvc") or "dvc")


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for dvc: analytics off, and this venv's bin first so stage commands find it."""
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run_dvc(
    args: list[str],
    cwd: Path | str = ".",
    *,
    capture: bool = True,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    command = [dvc_executable(), *args]
    result = subprocess.run(
        command,
        cwd=cwd,
        env=dvc_env(env),
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if check and result.returncode != 0:
        output = (result.stdout or "").strip()
        raise DvcError(
            f"`dvc {' '.join(args)}` failed (exit {result.returncode}) in {cwd}:\n{output}"
        )
    return result


class QueuedTask(NamedTuple):
    task: str  # DVC's short task id
    name: str  # the experiment name
    status: str  # Queued | Running | Success | Failed


class QueueStatus(NamedTuple):
    tasks: list[QueuedTask]  # as DVC lists them, oldest first
    active_workers: int


WORKER_STATUS = re.compile(r"^Worker status: (\d+) active", re.MULTILINE)


def queue_status(cwd: Path | str) -> QueueStatus:
    """`dvc queue status`, parsed: it prints a table (task, name, created, status) and a worker
    line, and has no JSON output."""
    out = run_dvc(["queue", "status"], cwd=cwd).stdout
    workers = WORKER_STATUS.search(out)
    if workers is None:
        raise DvcError(f"`dvc queue status` printed no worker line in {cwd}:\n{out.strip()}")
    tasks = []
    for line in out.splitlines()[1:]:  # the first line is the header (or "No experiment tasks")
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("Worker status"):
            tasks.append(QueuedTask(fields[0], fields[1], fields[-1]))
    return QueueStatus(tasks, int(workers.group(1)))


def read_output(repo: Path, path: str, rev: str) -> bytes:
    """A pipeline output as an experiment recorded it (DVC cache at its rev, not the workspace)."""
    import dvc.api

    with dvc.api.open(path, repo=str(repo), rev=rev, mode="rb") as handle:
        return handle.read()


def read_output_dir(repo: Path, directory: str, rev: str) -> dict[str, bytes]:
    """Every file under a pipeline output directory at `rev`, by path."""
    import dvc.api

    fs = dvc.api.DVCFileSystem(str(repo), rev=rev)
    return {path: fs.read_bytes(path) for path in fs.find(directory)}


def start_queue_workers(jobs: int, cwd: Path | str, env: dict[str, str] | None = None) -> None:
    """`dvc queue start -j N`, its daemonized workers detached from our pipes.

    A worker inherits the stdout of the process that starts it; a captured pipe would keep
    this call waiting until the whole queue is drained.
    """
    log = Path(cwd) / ".dvc" / "tmp" / "aeselect-queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        result = subprocess.run(
            [dvc_executable(), "queue", "start", "-j", str(jobs)],
            cwd=cwd,
            env=dvc_env(env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if result.returncode != 0:
        raise DvcError(f"`dvc queue start -j {jobs}` failed (exit {result.returncode}); see {log}")


def exp_run_command(name: str, params: dict[str, Any], *, queue: bool) -> list[str]:
    """`dvc exp run --queue|--temp -n NAME -S k=v ...` as an argument list (values in YAML
    syntax): `--queue` declares the experiment, `--temp` runs it now in a temporary workspace."""
    sets: list[str] = []
    for key, value in params.items():
        sets += ["-S", f"{key}={json.dumps(value)}"]
    return ["exp", "run", "--queue" if queue else "--temp", "-n", name, *sets]


def start_exp_run(
    name: str,
    params: dict[str, Any],
    cwd: Path,
    *,
    env: dict[str, str],
    log: IO[str],
    label: str,
    preexec_fn=None,
) -> subprocess.Popen:
    """Start one experiment now (`dvc exp run --temp`), its output appended to `log`; the
    caller waits for it (the drainer runs several side by side)."""
    args = exp_run_command(name, params, queue=False)
    log.write(f"{label}: dvc {' '.join(args)}\n")
    log.flush()
    return subprocess.Popen(
        [dvc_executable(), *args],
        cwd=cwd,
        env=dvc_env(env),
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=preexec_fn,
    )


def default_remote(cwd: Path | str) -> str | None:
    """The project's default DVC remote (`dvc remote default`), None when none is set."""
    result = run_dvc(["remote", "default"], cwd=cwd, check=False)
    name = (result.stdout or "").strip()
    return name if result.returncode == 0 and name and " " not in name else None


def remote_url(cwd: Path | str, name: str) -> str:
    """The URL of DVC remote `name` (`dvc remote list`)."""
    for line in run_dvc(["remote", "list"], cwd=cwd).stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == name:
            return fields[1]
    raise DvcError(f"no DVC remote {name!r} in `dvc remote list` ({cwd})")


def set_default_remote(cwd: Path | str, name: str, url: str) -> None:
    """This clone's own (`--local`) default DVC remote, as another clone has it."""
    run_dvc(["remote", "add", "--local", "--force", "--default", name, url], cwd=cwd)


def exp_push(cwd: Path | str, git_remote: str, names: list[str]) -> None:
    """`dvc exp push GIT_REMOTE NAME...`: the experiments' Git refs to the Git remote and their
    outputs to the default DVC remote (not the run cache: a result is found by its name)."""
    out = run_dvc(["exp", "push", git_remote, *names], cwd=cwd).stdout
    if "has diverged" in out:  # DVC reports it and exits 0: the remote keeps another run
        raise DvcError(f"`dvc exp push {git_remote} {' '.join(names)}` in {cwd}:\n{out}")


def exp_pull(cwd: Path | str, git_remote: str, names: list[str]) -> None:
    """`dvc exp pull GIT_REMOTE NAME...`: the experiments' refs and outputs into this clone."""
    run_dvc(["exp", "pull", git_remote, *names], cwd=cwd)
