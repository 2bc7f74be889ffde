"""The user's side of a shared phase (aeselect.cluster.share): make the plan from the queued
experiments, follow its claims, and bring the results home with `dvc exp pull`.

The user's clone keeps a claim record per planned experiment (`.dvc/tmp/aeselect-drain/`, the
drainer's format), refreshed from the shared claims on the Git remote: `phase status`, `queue`
and `compare` then see a planned experiment as queued, running, failed or done, with the job and
node it ran on, exactly as they see a drained one.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import subprocess
from pathlib import Path

from aeselect.cluster.claims import Claim, claim_queued, read_claims
from aeselect.cluster.share import (
    UNFINISHED,
    ClaimRecord,
    Plan,
    SharedClaims,
    git,
    local_plans,
    new_plan_id,
    publish_plan,
    share_out,
)
from aeselect.dvc import DvcError, default_remote, exp_pull, remote_url
from aeselect.git import GitError
from aeselect.sweep.names import file_order
from aeselect.sweep.runs import load_phase_runs
from aeselect.sweep.spec import PhaseError, PhaseSpec
from aeselect.sweep.status import Status

GIT_REMOTE = "origin"
# squeue's states of a job that will not run again (a requeued job is PENDING meanwhile).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}


def _absolute(url: str, base: Path) -> str:
    """A local path as the jobs must see it: absolute (URLs pass unchanged)."""
    if "://" in url or url.startswith("/") or ":" in url.split("/", 1)[0]:
        return url
    return str((base / url).resolve())


def remotes(repo: Path) -> tuple[str, str, str]:
    """(Git remote URL, default DVC remote name, its URL); a missing one is an error that
    names the command that sets it up."""
    try:
        url = git(repo, "remote", "get-url", GIT_REMOTE)
    except GitError:
        raise PhaseError(
            f"no Git remote {GIT_REMOTE!r} in {repo}: the jobs clone the queued commit from it "
            f"and push their experiments there. Set it up: `git remote add {GIT_REMOTE} <url>` "
            "(e.g. a bare repository on shared storage: `git init --bare /shared/aeselect.git`)"
        ) from None
    dvc_remote = default_remote(repo)
    if dvc_remote is None:
        raise PhaseError(
            f"no default DVC remote in {repo}: the jobs push their experiments' outputs there. "
            "Set it up: `dvc remote add -d store /shared/dvc-store` (or s3://..., ssh://...) and "
            "commit .dvc/config"
        )
    git_url = _absolute(url.strip(), repo)
    return git_url, dvc_remote, _absolute(remote_url(repo, dvc_remote), repo / ".dvc")


def make_plan(repo: Path, spec: PhaseSpec, weights: dict[str, int]) -> Plan:
    """Take the phase's queued experiments out of DVC's queue into a plan shared out by
    `weights` (profile -> parallel_jobs), publish it on the Git remote and record each
    experiment as planned in this clone."""
    claims = read_claims(repo, spec)
    claim_queued(repo, spec, claims)
    planned = sorted(
        (c for c in claims.values() if c.status == Status.CLAIMED and not c.plan),
        key=lambda c: file_order(spec, c.name),
    )
    if not planned:
        raise PhaseError(f"phase {spec.id}: nothing left to run (see `aeselect phase status`)")
    experiments = {c.name: {"overrides": c.overrides, "params": c.params} for c in planned}
    plan = new_plan(repo, spec, git(repo, "rev-parse", "HEAD").strip(), experiments, weights)
    publish_plan(repo, plan)
    for claim in planned:
        claim.plan = plan.id
        claim.save(repo)
    return plan


def abandon_plan(repo: Path, spec: PhaseSpec, plan: Plan) -> None:
    """No job of the plan was submitted: its experiments go back to this clone, to be planned
    by the next submit (or drained here)."""
    for claim in read_claims(repo, spec).values():
        if claim.plan == plan.id:
            claim.plan = ""
            claim.save(repo)


@functools.cache
def this_cluster() -> str:
    """The name of the SLURM cluster this machine submits to ('' outside SLURM)."""
    if shutil.which("scontrol") is None:
        return ""
    config = subprocess.run(["scontrol", "show", "config"], text=True, capture_output=True)
    names = [
        ln.split("=", 1)[1] for ln in config.stdout.splitlines() if ln.startswith("ClusterName")
    ]
    return names[0].strip() if names else ""


def preview_plan(
    repo: Path, spec: PhaseSpec, weights: dict[str, int], sweep: dict, *, retry_failed: bool
) -> Plan:
    """The plan a submit would make now, unpublished (for `--dry-run`): the phase's fresh
    queued runs and those `phase queue` would queue (PhaseRuns.wants_new_run decides both)."""
    view = load_phase_runs(repo, spec, sweep)
    names = []
    for phase_run in spec.runs():
        run = view.current(phase_run)
        if view.wants_new_run(phase_run, retry_failed):
            names.append(view.next_name(phase_run))
        elif (
            run is not None
            and run.status == Status.QUEUED
            and run.task is not None
            and run.task.task
        ):
            names.append(run.name)  # in DVC's queue, not taken by a drainer or a plan yet
    return new_plan(repo, spec, view.baseline.commit, {name: {} for name in names}, weights)


def new_plan(
    repo: Path, spec: PhaseSpec, base: str, experiments: dict[str, dict], weights: dict[str, int]
) -> Plan:
    git_url, dvc_remote, dvc_url = remotes(repo)
    return Plan(
        id=new_plan_id(spec.path.stem),
        phase=spec.id,
        base=base,
        git_remote=GIT_REMOTE,
        git_url=git_url,
        dvc_remote=dvc_remote,
        dvc_url=dvc_url,
        experiments=experiments,
        shares=share_out(list(experiments), weights),
    )


def job_ended(record: ClaimRecord) -> bool:
    """Whether SLURM says the claim's job will not run again; False when this machine cannot
    tell (no SLURM here, or the job is on another cluster)."""
    if not this_cluster() or (record.cluster and record.cluster != this_cluster()):
        return False
    queued = subprocess.run(
        ["squeue", "-h", "-j", record.job, "-o", "%T"], text=True, capture_output=True
    )
    state = queued.stdout.strip()
    return "Invalid job id" in queued.stderr or not state or state in ENDED


def follow(repo: Path, spec: PhaseSpec) -> list[Plan]:
    """Refresh this clone's records of the phase's planned experiments from their claims."""
    plans = local_plans(repo, spec.path.stem)
    claims = read_claims(repo, spec)
    for plan in plans:
        for name, (_, record) in SharedClaims(repo, plan).fetch().items():
            claim = claims.get(name)
            if claim is None:
                continue
            status = record.status
            log = record.log
            if status in UNFINISHED and job_ended(record):
                status = Status.FAILED  # its job is gone: reported, and retried by the next submit
                log = f"{record.log} (job {record.job} ended without finishing it)"
            mirrored = dataclasses.replace(
                claim,
                status=status,
                log=log,
                job=record.job,
                node=record.node,
                pushed=record.pushed,
            )
            if mirrored != claim:
                mirrored.save(repo)
    return plans


def local_experiments(repo: Path) -> set[str]:
    """Names of the experiments this clone has (`refs/exps/<baseline>/<name>`)."""
    refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
    return {ref.rsplit("/", 1)[1] for ref in refs}


def bring_home(repo: Path, spec: PhaseSpec, echo=print) -> list[str]:
    """`dvc exp pull` the phase's planned experiments that finished elsewhere and are not here
    yet; returns their names. They count only if they pass the phase's baseline check, as any.

    A success that never reached the remotes is an error naming the push to run: without its
    results it must not be ranked, and running it again would run it twice."""
    plans = follow(repo, spec)
    if not plans:
        return []
    remotes(repo)  # a clear error if the remotes went missing since the submit
    claims: dict[str, Claim] = read_claims(repo, spec)
    here = local_experiments(repo)
    done = [
        claims[name]
        for plan in plans
        for name in plan.experiments
        if name in claims and claims[name].status == Status.SUCCESS and name not in here
    ]
    stranded = [c for c in done if not c.pushed]
    if stranded:
        raise PhaseError(
            "succeeded but not on the remotes (`dvc exp push` failed in the job): "
            + "; ".join(
                f"{c.name} (job {c.job} on {c.node}): `dvc exp push {GIT_REMOTE} {c.name}` in "
                f"the job's clone, see {c.log}"
                for c in stranded
            )
        )
    missing = sorted(c.name for c in done)
    if missing:
        echo(f"dvc exp pull {GIT_REMOTE} {' '.join(missing)}")
        try:
            exp_pull(repo, GIT_REMOTE, missing)
        except DvcError as err:
            raise PhaseError(f"pulling the phase's experiments failed: {err}") from None
    return missing


def where_ran(repo: Path, spec: PhaseSpec) -> dict[str, str]:
    """`job 123 on node7, pushed` per planned experiment a job has taken (for `phase status`)."""
    return {
        name: f"job {claim.job} on {claim.node}, " + ("pushed" if claim.pushed else "not pushed")
        for name, claim in read_claims(repo, spec).items()
        if claim.plan and claim.job
    }
