"""`aeselect phase submit`: one SLURM job per phase, draining its queued experiments on one node
(a profile with `nodes` > 1: one experiment, trained on every GPU of every node); with several
profiles (`--cluster A --cluster B`, or a group), one job per profile sharing the phase
(aeselect.cluster.share).

The job is `hpc/drain.sbatch` with the options of a profile in `hpc/clusters.yaml`. Options go
on sbatch's command line (an argument list, never a shell string) and the script goes to sbatch
on stdin with the profile's setup lines filled in, so what runs is exactly what `--dry-run`
prints, and a requeued job runs the script SLURM stored at submission.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from aeselect.cluster.share import Plan
from aeselect.envvars import (
    GIT_URL_ENV,
    JOBS_ENV,
    PHASE_ENV,
    PLAN_ENV,
    PROFILE_ENV,
    RESUME_DIR_ENV,
    WORKDIR_ENV,
)
from aeselect.paths import HPC_LOG_DIR as LOG_DIR
from aeselect.paths import RESUME_DIR
from aeselect.sweep.spec import PHASE_ID, PhaseError, PhaseSpec

CLUSTERS_FILE = Path("hpc/clusters.yaml")
SCRIPT_FILE = Path("hpc/drain.sbatch")
SETUP_MARKER = "# aeselect:setup\n"

# What reaches sbatch's option parser and the job's shell: sbatch splits --export at commas and
# expands % in --output, so paths and names keep to plain characters.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
PATH = re.compile(r"^/[A-Za-z0-9_.+@/-]+$")
URL = re.compile(r"^[A-Za-z0-9_.+@/:~-]+$")
MEM = re.compile(r"^\d+[KMGT]?$")
TIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
TIME_HINT = ' (quote it: "HH:MM:SS"; YAML reads an unquoted 04:00:00 as a number)'
REQUIRED = {
    "partition": str,
    "gpus_per_node": int,
    "parallel_jobs": int,
    "cpus_per_task": int,
    "mem": str,
    "time": str,
    "warn_seconds": int,
    "setup": list,
}
OPTIONAL = {"account": str, "resume_dir": str, "nodes": int, "workdir": str}
MAX_SIGNAL_SECONDS = 65535  # the largest lead time --signal accepts


@dataclass(frozen=True)
class Profile:
    name: str
    partition: str
    gpus_per_node: int
    parallel_jobs: int
    cpus_per_task: int
    mem: str
    time: str
    warn_seconds: int
    setup: tuple[str, ...]
    account: str | None = None
    resume_dir: str | None = None
    nodes: int = 1
    workdir: str | None = None  # where the jobs of a shared phase make their clones


def _entries(repo: Path) -> dict:
    path = repo / CLUSTERS_FILE
    if not path.exists():
        raise PhaseError(f"{CLUSTERS_FILE}: not found in {repo}")
    entries = yaml.safe_load(path.read_text()) or {}
    if not isinstance(entries, dict):
        raise PhaseError(f"{CLUSTERS_FILE}: expected a mapping of profile name -> settings")
    return entries


def _entry(entries: dict, name: str):
    if name not in entries:
        known = ", ".join(str(k) for k in entries) or "none"
        raise PhaseError(f"{CLUSTERS_FILE}: no profile {name!r} (profiles: {known})")
    return entries[name]


def load_profile(repo: Path, name: str) -> Profile:
    """The named profile, validated: every error names hpc/clusters.yaml and the key."""
    raw = _entry(_entries(repo), name)
    where = f"{CLUSTERS_FILE}: {name}"
    if isinstance(raw, list):
        raise PhaseError(f"{where}: a group of profiles; a job runs on one of them")
    if not isinstance(raw, dict):
        raise PhaseError(f"{where}: expected a mapping of settings")
    for key in sorted(raw.keys() - REQUIRED.keys() - OPTIONAL.keys()):
        raise PhaseError(f"{where}.{key}: unknown key; expected {sorted(REQUIRED | OPTIONAL)}")
    for key in sorted(REQUIRED.keys() - raw.keys()):
        raise PhaseError(f"{where}.{key}: missing")
    for key, kind in (REQUIRED | OPTIONAL).items():
        value = raw.get(key)
        if key in raw and (not isinstance(value, kind) or isinstance(value, bool)):
            hint = TIME_HINT if key == "time" else ""
            raise PhaseError(f"{where}.{key}: expected {kind.__name__}, got {value!r}{hint}")
    profile = Profile(name=name, **{**raw, "setup": tuple(raw["setup"])})
    _check(profile, where)
    return profile


def _check(p: Profile, where: str) -> None:
    for key in ("partition", "account"):
        value = getattr(p, key)
        if value is not None and not NAME.match(value):
            raise PhaseError(f"{where}.{key}: {value!r} is not a plain SLURM name")
    for key in ("gpus_per_node", "parallel_jobs", "cpus_per_task", "nodes"):
        if getattr(p, key) < 1:
            raise PhaseError(f"{where}.{key}: must be >= 1")
    if p.parallel_jobs > p.gpus_per_node:
        raise PhaseError(
            f"{where}.parallel_jobs: {p.parallel_jobs} is more than gpus_per_node "
            f"({p.gpus_per_node}); each parallel experiment needs a GPU of its own"
        )
    if p.cpus_per_task < p.parallel_jobs:
        raise PhaseError(
            f"{where}.cpus_per_task: {p.cpus_per_task} cores cannot give each of the "
            f"{p.parallel_jobs} parallel experiments one"
        )
    if not MEM.match(p.mem):
        raise PhaseError(f"{where}.mem: {p.mem!r}; expected e.g. 64G or 4000M")
    limit = TIME.match(p.time)
    if not limit:
        raise PhaseError(f"{where}.time: {p.time!r}; expected HH:MM:SS")
    seconds = int(limit[1]) * 3600 + int(limit[2]) * 60 + int(limit[3])
    if not 0 < p.warn_seconds < min(seconds, MAX_SIGNAL_SECONDS):
        raise PhaseError(
            f"{where}.warn_seconds: {p.warn_seconds}; must be above 0 and below the time limit "
            f"({seconds} s) and {MAX_SIGNAL_SECONDS}"
        )
    for i, line in enumerate(p.setup):
        if not isinstance(line, str) or "\n" in line:
            raise PhaseError(f"{where}.setup[{i}]: expected one shell line, got {line!r}")


def load_profiles(repo: Path, names: list[str]) -> list[Profile]:
    """The profiles of `--cluster` names, a group (a list of profile names) standing for its
    members; each profile once."""
    entries, expanded = _entries(repo), []
    for name in names:
        raw = _entry(entries, name)
        if isinstance(raw, list):
            if not raw or not all(isinstance(member, str) for member in raw):
                raise PhaseError(f"{CLUSTERS_FILE}: {name}: expected a list of profile names")
            expanded += raw
        else:
            expanded.append(name)
    return [load_profile(repo, name) for name in dict.fromkeys(expanded)]


def check_fits(spec: PhaseSpec, profile: Profile) -> None:
    """Several nodes train one experiment together: a sweep would use the first node only."""
    count = len(spec.names())
    if profile.nodes > 1 and count != 1:
        raise PhaseError(
            f"{CLUSTERS_FILE}: {profile.name}.nodes: {profile.nodes} nodes train one experiment "
            f"(the final training, phase 1.5) across them; phase {spec.id} has {count} "
            "experiments: submit it with a one-node profile"
        )


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def resume_dir(repo: Path, profile: Profile) -> Path:
    if profile.resume_dir is None:
        return repo / RESUME_DIR
    return repo / _expand(profile.resume_dir)


def _plain(label: str, value: str, pattern: re.Pattern) -> None:
    if not pattern.match(value):
        raise PhaseError(
            f"{label} {value!r}: sbatch needs plain characters here (letters, digits, "
            "'_.+@/-'; no spaces, commas or %)"
        )


def batch_script(repo: Path, profile: Profile) -> str:
    template = (repo / SCRIPT_FILE).read_text()
    if SETUP_MARKER not in template:
        raise PhaseError(f"{SCRIPT_FILE}: the line {SETUP_MARKER.strip()!r} is missing")
    setup = "".join(f"{line}\n" for line in profile.setup)
    return template.replace(SETUP_MARKER, setup or "# (the profile has no setup lines)\n")


def sbatch_command(
    repo: Path, spec: PhaseSpec, profile: Profile, plan: Plan | None = None
) -> list[str]:
    """The sbatch command line of the phase's job on `profile`; with `plan`, of that profile's
    job of a phase shared between several jobs."""
    check_fits(spec, profile)
    slug = spec.path.stem  # phase1_1: the log and job names
    resume = resume_dir(repo, profile)
    _plain("phase id", spec.id, PHASE_ID)
    _plain("phase file", slug, NAME)
    _plain("repository path", str(repo), PATH)
    _plain(f"{CLUSTERS_FILE}: {profile.name}.resume_dir", str(resume), PATH)
    exports = {
        PHASE_ENV: spec.id,
        JOBS_ENV: str(profile.parallel_jobs),
        RESUME_DIR_ENV: str(resume),
    }
    name = f"aeselect-{slug}"
    if plan is not None:
        exports |= _shared_exports(profile, plan)
        if profile.resume_dir is None:  # the default: in the job's own clone
            del exports[RESUME_DIR_ENV]
        name += f"-{profile.name}"
    options = [
        f"--job-name={name}",
        f"--partition={profile.partition}",
        *([f"--account={profile.account}"] if profile.account else []),
        # One task per node: the drainer on the first, the train stage's srun on the others.
        *(["--nodes=1", "--ntasks=1"] if profile.nodes == 1 else []),
        *([f"--nodes={profile.nodes}", "--ntasks-per-node=1"] if profile.nodes > 1 else []),
        f"--gres=gpu:{profile.gpus_per_node}",
        f"--cpus-per-task={profile.cpus_per_task}",
        f"--mem={profile.mem}",
        f"--time={profile.time}",
        f"--signal=B:USR1@{profile.warn_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={repo / LOG_DIR}/{slug}-%j.out",
        f"--chdir={repo}",
        "--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in exports.items())]),
    ]
    return ["sbatch", "--parsable", *options]


def _shared_exports(profile: Profile, plan: Plan) -> dict[str, str]:
    """What the batch script needs to make the job's own clone of the plan's commit."""
    where = f"{CLUSTERS_FILE}: {profile.name}.workdir"
    if profile.workdir is None:
        raise PhaseError(
            f"{where}: missing; a phase shared between jobs runs each job in its own clone "
            "under it, on storage its node sees (e.g. workdir: /scratch/$USER/aeselect-jobs)"
        )
    workdir = _expand(profile.workdir)
    _plain(where, workdir, PATH)
    _plain("Git remote URL", plan.git_url, URL)
    return {
        PLAN_ENV: plan.id,
        PROFILE_ENV: profile.name,
        GIT_URL_ENV: plan.git_url,
        WORKDIR_ENV: workdir,
    }


def submit(repo: Path, spec: PhaseSpec, cluster: str, *, dry_run: bool) -> int:
    """sbatch the phase's drainer with the profile `cluster`; print the job id and its log."""
    repo = repo.resolve()
    profile = load_profile(repo, cluster)
    argv = sbatch_command(repo, spec, profile)
    script = batch_script(repo, profile)
    if dry_run:
        print(shlex.join(argv))
        print(f"# the batch script, on sbatch's stdin ({SCRIPT_FILE} with the setup lines):")
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        raise PhaseError(
            "sbatch is not on PATH: run this on a SLURM login node (on some sites after "
            "`module load slurm`); the queued experiments stay queued and are not queued twice"
        )
    (repo / LOG_DIR).mkdir(parents=True, exist_ok=True)
    result = subprocess.run(argv, input=script, text=True, capture_output=True, cwd=repo)
    if result.returncode != 0:
        raise PhaseError(
            f"`{shlex.join(argv)}` failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    job = result.stdout.strip().split(";")[0]
    slug = spec.path.stem
    print(f"Submitted batch job {job}: phase {spec.id} on {cluster}")
    print(f"job log: {LOG_DIR}/{slug}-{job}.out")
    print(f"experiment logs: {LOG_DIR}/{slug}-{job}-<experiment>.log")
    print(f"follow: squeue -j {job}; aeselect phase status {spec.id}")
    return 0


def plan_lines(plan: Plan, profiles: list[Profile]) -> list[str]:
    """What goes where, as `submit` prints it."""
    count = len(plan.experiments)
    lines = [
        f"plan {plan.id}: phase {plan.phase} on {plan.base[:7]}, {count} experiments shared "
        "in proportion to parallel_jobs"
    ]
    for profile in profiles:
        names = ", ".join(plan.shares[profile.name]) or "(none)"
        lines.append(f"  {profile.name} ({profile.parallel_jobs} at a time): {names}")
    lines += [
        "  a job whose share is done takes the unstarted experiments of the others",
        f"  results: dvc exp push {plan.git_remote} ({plan.git_url}), outputs to DVC remote "
        f"{plan.dvc_remote} ({plan.dvc_url}), each as it succeeds",
    ]
    return lines


def submit_shared(
    repo: Path,
    spec: PhaseSpec,
    clusters: list[str],
    *,
    dry_run: bool,
    queue: Callable[[], object],
    sweep: dict,
    retry_failed: bool,
) -> int:
    """One job per profile of `clusters` (names or groups), draining one plan together.

    `queue` is `phase queue` for this phase with `sweep` and `retry_failed` (its dry run with
    `dry_run`); the fresh queued experiments become the plan."""
    from aeselect.cluster.home import abandon_plan, make_plan, preview_plan, remotes

    repo = repo.resolve()
    if spec.budget is not None:
        raise PhaseError(
            f"{spec.path}: budget: rungs are judged by the one drainer that holds every run of "
            "the phase, and a plan shared between clusters splits the runs between jobs that "
            "cannot see each other's rung scores. Submit to one cluster (`--cluster NAME`), or "
            "drop `budget:` to share the phase"
        )
    profiles = load_profiles(repo, clusters)
    for profile in profiles:
        check_fits(spec, profile)
    weights = {profile.name: profile.parallel_jobs for profile in profiles}
    remotes(repo)  # a clear error before anything is queued
    if dry_run:
        queue()
        plan = preview_plan(repo, spec, weights, sweep, retry_failed=retry_failed)
        _print_dry_run(repo, spec, profiles, plan)
        return 0
    if shutil.which("sbatch") is None:
        raise PhaseError("sbatch is not on PATH: submit from a login node (or module load slurm)")
    queue()
    plan = make_plan(repo, spec, weights)
    print("\n".join(plan_lines(plan, profiles)))
    failures = _submit_jobs(repo, spec, profiles, plan)
    if len(failures) == len(profiles):
        abandon_plan(repo, spec, plan)
        raise PhaseError(f"sbatch failed for {'; '.join(failures)}; no job runs: submit again")
    if failures:
        raise PhaseError(
            f"sbatch failed for {'; '.join(failures)}; the submitted jobs take over these "
            "shares when theirs are done"
        )
    print(f"follow: aeselect phase status {spec.id} (job, node and pushed per experiment)")
    return 0


def _print_dry_run(repo: Path, spec: PhaseSpec, profiles: list[Profile], plan: Plan) -> None:
    """The plan, every sbatch line, and each distinct batch script once."""
    print("\n".join(plan_lines(plan, profiles)))
    for profile in profiles:
        print(shlex.join(sbatch_command(repo, spec, profile, plan)))
    printed: dict[str, str] = {}
    for profile in profiles:
        script = batch_script(repo, profile)
        same = next((name for name, text in printed.items() if text == script), None)
        print(f"# the batch script of {profile.name}, on sbatch's stdin ({SCRIPT_FILE}", end="")
        print(f" with its setup lines): as {same}'s" if same else " with its setup lines):")
        if same is None:
            print(script, end="")
        printed[profile.name] = script


def _submit_jobs(repo: Path, spec: PhaseSpec, profiles: list[Profile], plan: Plan) -> list[str]:
    """sbatch one job per profile; the failures as 'profile: sbatch's message'."""
    (repo / LOG_DIR).mkdir(parents=True, exist_ok=True)
    slug, failures = spec.path.stem, []
    for profile in profiles:
        argv = sbatch_command(repo, spec, profile, plan)
        result = subprocess.run(
            argv, input=batch_script(repo, profile), text=True, capture_output=True, cwd=repo
        )
        if result.returncode != 0:
            failures.append(f"{profile.name}: {(result.stderr or result.stdout).strip()}")
            continue
        job = result.stdout.strip().split(";")[0]
        print(f"Submitted batch job {job}: phase {spec.id}, {profile.name}'s share")
        print(f"  job log: {LOG_DIR}/{slug}-{job}.out")
    return failures
