"""One phase drained by several SLURM jobs (nodes, partitions or clusters) at once.

`phase submit 1.1 --cluster v100 --cluster l40s` writes a *plan*: the phase's experiments shared
out between the jobs in proportion to each profile's `parallel_jobs`. Each job drains its share in
its own clone of the queued commit (under the profile's `workdir`) and `dvc exp push`es every
experiment as soon as it succeeds; `phase status`, `compare` and `promote` in the user's clone
read the plan's claims and `dvc exp pull` what is missing.

Everything the jobs share lives on the project's Git remote, the one place every job and the
user's clone already reach (jobs on different clusters share no file system):
- the plan: `refs/aeselect/plans/<plan>`, a commit whose parent is the queued commit (so a job
  fetches both at once) and whose tree holds plan.json;
- a claim per experiment: `refs/aeselect/claims/<plan>/<name>`, created by a push with
  `--force-with-lease=<ref>:` (the ref must not exist yet: the server checks and updates it under
  its ref lock, a compare-and-swap), so exactly one job wins an experiment. The claim's commits
  record who runs it and how it ended; each update is a compare-and-swap on the last one.
A job requeued after preemption keeps its SLURM job id, finds its own unfinished claims and
resumes them first; a claim whose job SLURM no longer knows is reported failed and retried
under a new name by the next `phase submit`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from aeselect.git import GitError
from aeselect.git import git as plain_git
from aeselect.sweep.spec import PhaseError
from aeselect.sweep.status import Status

PLAN_REFS = "refs/aeselect/plans"
CLAIM_REFS = "refs/aeselect/claims"
PLAN_FILE = "plan.json"
# Claims are machine records: their commits carry this identity, whatever the user's Git says.
CLAIM_IDENTITY = {
    "GIT_AUTHOR_NAME": "aeselect",
    "GIT_AUTHOR_EMAIL": "aeselect@localhost",
    "GIT_COMMITTER_NAME": "aeselect",
    "GIT_COMMITTER_EMAIL": "aeselect@localhost",
}
UNFINISHED = (Status.CLAIMED, Status.RUNNING, Status.INTERRUPTED)
CAS_TRIES = 3  # a push that lost a ref lock to a racing push that then failed itself: retry


def git(repo: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    """Git as the claims' own identity (plan and claim commits name no user)."""
    return plain_git(repo, *args, input=input, check=check, env=os.environ | CLAIM_IDENTITY)


def share_out(names: list[str], weights: dict[str, int]) -> dict[str, list[str]]:
    """Consecutive runs of `names` per share, sized in proportion to `weights` (each profile's
    `parallel_jobs`; largest remainder, ties to the earlier share), in the order given."""
    total = sum(weights.values())
    exact = {share: len(names) * weight / total for share, weight in weights.items()}
    sizes = {share: int(value) for share, value in exact.items()}
    by_remainder = sorted(weights, key=lambda share: sizes[share] - exact[share])
    for share in by_remainder[: len(names) - sum(sizes.values())]:
        sizes[share] += 1
    shares, start = {}, 0
    for share in weights:
        shares[share] = names[start : start + sizes[share]]
        start += sizes[share]
    return shares


@dataclass(frozen=True)
class Plan:
    """Which experiment goes where, and where results go home."""

    id: str  # phase1_1-20261127T093000: ref names, the jobs' clone folders
    phase: str
    base: str  # the commit the experiments were queued on
    git_remote: str  # its name in the user's clone; the jobs clone it under the same name
    git_url: str
    dvc_remote: str
    dvc_url: str
    experiments: dict[str, dict[str, Any]]  # name -> the params it sets on top of the base
    shares: dict[str, list[str]]  # profile -> the experiments it starts with

    def order_for(self, share: str) -> list[str]:
        """What a job of `share` tries to take: its own share first, then the other shares
        from their ends, so a thief and the owner start at opposite ends."""
        others = [name for other, names in self.shares.items() if other != share for name in names]
        return [*self.shares[share], *reversed(others)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def new_plan_id(slug: str) -> str:
    return f"{slug}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}"


def publish_plan(repo: Path, plan: Plan) -> None:
    """The plan as a commit on top of the queued commit, pushed to the Git remote (the jobs
    fetch it) and kept as a local ref (the user's clone reads it back)."""
    blob = git(repo, "hash-object", "-w", "--stdin", input=plan.to_json()).strip()
    tree = git(repo, "mktree", input=f"100644 blob {blob}\t{PLAN_FILE}\n").strip()
    commit = git(repo, "commit-tree", tree, "-p", plan.base, "-m", f"aeselect plan {plan.id}")
    ref = f"{PLAN_REFS}/{plan.id}"
    git(repo, "update-ref", ref, commit.strip())
    git(repo, "push", "-q", plan.git_remote, f"{ref}:{ref}")


def read_plan(repo: Path, plan_id: str) -> Plan:
    return Plan(**json.loads(git(repo, "show", f"{PLAN_REFS}/{plan_id}:{PLAN_FILE}")))


def local_plans(repo: Path, slug: str) -> list[Plan]:
    """The plans this clone published for phase file `slug`, oldest first."""
    refs = git(repo, "for-each-ref", "--format=%(refname)", f"{PLAN_REFS}/").split()
    ids = sorted(ref.rsplit("/", 1)[1] for ref in refs)
    return [read_plan(repo, plan_id) for plan_id in ids if plan_id.startswith(f"{slug}-")]


def stamp() -> str:
    """Local time to the millisecond: a claim's updates in one second stay in order."""
    return dt.datetime.now().isoformat(timespec="milliseconds")


@dataclass
class ClaimRecord:
    """One update of a shared claim: who holds the experiment, and how far it got."""

    job: str  # SLURM job id: a requeued job keeps it and so recognises its own claims
    cluster: str
    profile: str
    node: str
    status: Status  # claimed, running, interrupted, success or failed
    pushed: bool = False  # the result is on the remotes (`dvc exp push`)
    log: str = ""  # the experiment's log in the job's clone, on its node's storage
    at: str = field(default_factory=lambda: stamp())

    def now(self, **changes: Any) -> ClaimRecord:
        """This record updated, stamped now."""
        return replace(self, at=stamp(), **changes)

    def held_by(self, job: str, cluster: str) -> bool:
        return (self.job, self.cluster) == (job, cluster)


class SharedClaims:
    """The claims of one plan on the Git remote, read and written from a clone."""

    def __init__(self, repo: Path, plan: Plan):
        self.repo, self.plan = repo, plan
        self.prefix = f"{CLAIM_REFS}/{plan.id}/"
        self.empty_tree = git(repo, "mktree", input="").strip()

    def ref(self, name: str) -> str:
        return self.prefix + name

    def fetch(self) -> dict[str, tuple[str, ClaimRecord]]:
        """Name -> (commit, latest record) of every claim on the remote, now."""
        git(
            self.repo,
            "fetch",
            "-q",
            "--prune",
            self.plan.git_remote,
            f"+{self.prefix}*:{self.prefix}*",
        )
        out = git(
            self.repo, "for-each-ref", "--format=%(refname) %(objectname) %(subject)", self.prefix
        )
        claims = {}
        for line in out.splitlines():
            ref, commit, record = line.split(" ", 2)
            claims[ref.removeprefix(self.prefix)] = (commit, ClaimRecord(**json.loads(record)))
        return claims

    def _push(self, name: str, record: ClaimRecord, previous: str | None) -> bool:
        """Compare-and-swap: the remote ref moves to a commit of `record` only if it is still
        `previous` (None: does not exist yet). False if another clone got there first."""
        parents = ["-p", previous] if previous else []
        message = json.dumps(asdict(record))
        commit = git(self.repo, "commit-tree", self.empty_tree, *parents, "-m", message).strip()
        ref = self.ref(name)
        lease = f"--force-with-lease={ref}:{previous or ''}"
        target = f"{commit}:{ref}"
        said = ""
        for _ in range(CAS_TRIES):
            try:
                plain_git(self.repo, "push", "--porcelain", lease, self.plan.git_remote, target)
                pushed = True
            except GitError as err:
                pushed, said = False, err.output
            # Rejected by the lease, or the ref locked by a racing push: the remote says which.
            now = git(self.repo, "ls-remote", self.plan.git_remote, ref).split()
            if pushed or now[:1] == [commit]:
                git(self.repo, "update-ref", ref, commit)
                return True
            if now[:1] != ([previous] if previous else []):
                return False  # someone else's claim, or someone else's update
        raise PhaseError(f"claiming {name} on Git remote {self.plan.git_remote!r} failed: {said}")

    def take(self, name: str, record: ClaimRecord) -> bool:
        """Claim an unclaimed experiment; False when another job holds it."""
        return self._push(name, record, None)

    def update(self, name: str, record: ClaimRecord) -> None:
        """Record progress on a claim this job holds (only its holder writes there; the remote's
        value is read first: a requeued job may have pushed its last update before a crash)."""
        commit, holder = self.fetch().get(name, ("", None))
        if holder is None or not holder.held_by(record.job, record.cluster):
            raise PhaseError(f"claim {self.ref(name)} is not held by job {record.job}")
        if not self._push(name, record, commit):
            raise PhaseError(f"claim {self.ref(name)} changed under job {record.job}")


def job_identity(profile: str) -> ClaimRecord:
    """This job's claim record, status to be set (`SLURM_*` of the allocation)."""
    return ClaimRecord(
        job=os.environ.get("SLURM_JOB_ID", f"local{os.getpid()}"),
        cluster=os.environ.get("SLURM_CLUSTER_NAME", ""),
        profile=profile,
        node=socket.gethostname(),
        status=Status.CLAIMED,
    )
