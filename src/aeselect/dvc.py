"""DVC: the one place that spawns `dvc` processes, reads what an experiment recorded
(`dvc.api`), and calls DVC's own `Repo` where a command has no JSON output (`dvc queue
status`), needs a workspace (hashing a commit's stage deps) or costs a process start on every
phase command (`dvc exp show`): each such function makes the calls the command makes.

Commands run with analytics off and return their output or raise with DVC's own message.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def open_repo(cwd: Path | str, rev: str | None = None) -> Iterator[Any]:
    """DVC's own `Repo` of `cwd` (at commit `rev`: its Git objects, no checkout) for what the
    CLI gives no JSON of, needs a workspace for, or would take a process start to read."""
    from dvc.repo import Repo

    with Repo(str(cwd), rev=rev) as repo:
        yield repo


def queue_tasks(cwd: Path | str) -> list[QueuedTask]:
    """DVC's queue as `dvc queue status` lists it (running, queued, failed, done), read by the
    call that command makes; its table has no JSON form."""
    with open_repo(cwd) as repo:
        listed = repo.experiments.celery_queue.status()
    return [QueuedTask(e["rev"][:7], e.get("name") or "", e["status"]) for e in listed]


def active_workers(cwd: Path | str) -> int:
    """How many of DVC's queue workers are running a task (`dvc queue status`'s worker line)."""
    with open_repo(cwd) as repo:
        workers = repo.experiments.celery_queue.worker_status()
    return len([name for name, tasks in workers.items() if tasks])


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


def experiment_baselines(repo: Path) -> set[str]:
    """The commits DVC's experiments derive from: each experiment ref's
    (`refs/exps/<baseline>/<name>`) and each queued, running or failed task's. `dvc exp show -A`
    finds the same by walking every commit; this reads a few refs and the queue."""
    from dvc.repo.experiments.utils import exp_refs

    with open_repo(repo) as dvc_repo:
        experiments = dvc_repo.experiments
        celery = experiments.celery_queue
        tasks = [*celery.iter_queued(), *celery.iter_active()]
        tasks += [*experiments.tempdir_queue.iter_active()]
        tasks += [done.entry for done in celery.iter_failed()]
        return {ref.baseline_sha for ref in exp_refs(dvc_repo.scm)} | {
            task.baseline_rev for task in tasks
        }


def exp_show(cwd: Path | str, revs: list[str]) -> list[dict[str, Any]]:
    """What `dvc exp show --json --no-fetch --rev REV...` prints: the workspace, then each
    commit of `revs` with the experiments derived from it; made by the calls that command
    makes (its JSON encoder included), without the process.

    Not `dvc.api.exp_show`: its flat table cuts revs to 7 characters, formats timestamps,
    drops a failed run's error, and flattens params to text or floats.
    """
    from dvc.commands.experiments.show import _format_json

    with open_repo(cwd) as repo:
        shown = repo.experiments.show(revs=revs, fetch_running=False)
        return json.loads(json.dumps([exp.dumpd() for exp in shown], default=_format_json))


class StageDeps(NamedTuple):
    """A pipeline stage's file deps at a commit, split by what tells whether they changed."""

    source: dict[str, str | None]  # Git-tracked dep -> md5 as dvc.lock records it; None: absent
    # Deps that hold data DVC tracks (`dvc add`ed, or another stage's outputs inside): Git has
    # only their .dvc files and sources, so their Git tree tells whether they changed.
    tracked: tuple[str, ...]


def stage_deps(repo: Path, rev: str) -> dict[str, StageDeps]:
    """Each pipeline stage's file deps at commit `rev`, hashed by DVC from Git's objects (no
    checkout): what `dvc status` would compare with dvc.lock in a workspace of `rev`.

    A dep that is (or lies inside) another stage's output is left out: it changes only when its
    producer's deps do. Params deps are the caller's to compare.
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.stage import PipelineStage

    def inside(path: str, outer: str) -> bool:
        return path == outer or path.startswith(f"{outer}/")

    with open_repo(repo, rev) as dvc_repo:
        stages = dvc_repo.index.stages

        def relative(entry: Any) -> str:  # from the repo root (a .dvc file's are from its dir)
            return dvc_repo.fs.relpath(entry.fs_path, dvc_repo.root_dir)

        produced = [relative(o) for s in stages if isinstance(s, PipelineStage) for o in s.outs]
        tracked = [relative(o) for s in stages for o in s.outs]  # also `dvc add`ed data
        hashes: dict[str, str | None] = {}
        found = {}
        for stage in stages:
            if not isinstance(stage, PipelineStage):
                continue
            source, held = {}, []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    continue
                path = relative(dep)  # as dvc.lock records it: dvc.yaml is at the root
                if any(inside(path, o) for o in produced):
                    continue
                if any(inside(out, path) or inside(path, out) for out in tracked):
                    held.append(path)
                    continue
                if path not in hashes:
                    hashes[path] = dep.get_hash().value if dep.exists else None
                source[path] = hashes[path]
            found[stage.name] = StageDeps(source, tuple(held))
    return found


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
