"""A phase shared between jobs: the proportional plan and the claims on the Git remote (exactly
one job per experiment, however many race for it; a requeued job resumes its own claim first)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import git

from aeselect.cluster import home
from aeselect.cluster.claims import Claim, read_claims
from aeselect.cluster.drain import SharedDrainer
from aeselect.cluster.share import (
    ClaimRecord,
    Plan,
    SharedClaims,
    local_plans,
    publish_plan,
    read_plan,
    share_out,
)
from aeselect.sweep.spec import PhaseError, load_phase

NAMES = [f"p1-1-e{i}" for i in range(6)]
PHASE = """\
id: "1.1"
title: shared
requires: null
selects: [model.latent_channels]
decide: {metric: mse, direction: min, tolerance: 0.05, tie_breakers: []}
experiments:
""" + "".join(f"  e{i}: {{model.latent_channels: {i + 1}}}\n" for i in range(6))


@pytest.mark.parametrize(
    ("count", "weights", "sizes"),
    [
        (5, {"v100": 4, "l40s": 2}, {"v100": 3, "l40s": 2}),  # 3.33 and 1.67: l40s rounds up
        (6, {"v100": 4, "l40s": 2}, {"v100": 4, "l40s": 2}),
        (3, {"a": 1, "b": 1}, {"a": 2, "b": 1}),  # a tie goes to the earlier share
        (1, {"v100": 4, "l40s": 2}, {"v100": 1, "l40s": 0}),
        (7, {"a": 1, "b": 1, "c": 1}, {"a": 3, "b": 2, "c": 2}),
    ],
)
def test_shares_are_proportional_to_parallel_jobs(count, weights, sizes):
    names = NAMES[:count] if count <= len(NAMES) else [f"x{i}" for i in range(count)]
    shares = share_out(names, weights)
    assert {share: len(got) for share, got in shares.items()} == sizes
    assert [name for got in shares.values() for name in got] == names  # each once, in order


def test_a_job_steals_from_the_other_shares_ends():
    plan = plan_of("base", {"v100": NAMES[:3], "l40s": NAMES[3:5], "a100": NAMES[5:]})
    assert plan.order_for("l40s") == [*NAMES[3:5], NAMES[5], *reversed(NAMES[:3])]


def plan_of(base: str, shares: dict[str, list[str]]) -> Plan:
    names = [name for got in shares.values() for name in got]
    return Plan(
        id="phase1_1-20260101T000000",
        phase="1.1",
        base=base,
        git_remote="origin",
        git_url="unused",
        dvc_remote="store",
        dvc_url="unused",
        experiments={name: {"overrides": {}, "params": {}} for name in names},
        shares=shares,
    )


@pytest.fixture
def shared(tmp_path) -> tuple[Path, Plan]:
    """A bare Git remote holding a published plan, and the clone that published it."""
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    user = tmp_path / "user"
    user.mkdir()
    git(user, "init", "-q", "-b", "main")
    (user / "README").write_text("x\n")
    git(user, "add", "-A")
    git(user, "commit", "-q", "-m", "base")
    git(user, "remote", "add", "origin", str(remote))
    git(user, "push", "-q", "origin", "main")
    plan = plan_of(git(user, "rev-parse", "HEAD").strip(), {"a": NAMES[:4], "b": NAMES[4:]})
    publish_plan(user, plan)
    (user / "phases").mkdir()
    (user / "phases" / "phase1_1.yaml").write_text(PHASE)
    return user, plan


def job_clone(tmp_path: Path, plan: Plan, job: str) -> Path:
    """What the batch script makes: a clone of the remote with the plan ref, at its base."""
    clone = tmp_path / f"job-{job}"
    ref = f"refs/aeselect/plans/{plan.id}"
    subprocess.run(["git", "clone", "-q", str(tmp_path / "remote.git"), str(clone)], check=True)
    git(clone, "fetch", "-q", "origin", f"+{ref}:{ref}")
    git(clone, "checkout", "-q", "--detach", f"{ref}^")
    return clone


def record(job: str, status: str = "claimed") -> ClaimRecord:
    return ClaimRecord(job=job, cluster="c", profile="a", node="n", status=status)


def test_the_plan_travels_with_its_commit(shared, tmp_path):
    user, plan = shared
    clone = job_clone(tmp_path, plan, "1")
    assert read_plan(clone, plan.id) == plan
    assert git(clone, "rev-parse", "HEAD").strip() == plan.base
    assert local_plans(user, "phase1_1") == [plan] and local_plans(user, "phase1_2") == []


def test_each_experiment_goes_to_exactly_one_of_racing_jobs(shared, tmp_path):
    _, plan = shared
    jobs = [str(job) for job in range(4)]
    clones = {job: SharedClaims(job_clone(tmp_path, plan, job), plan) for job in jobs}

    def claim_all(job: str) -> list[str]:
        order = NAMES if int(job) % 2 else NAMES[::-1]  # racing from both ends
        return [name for name in order if clones[job].take(name, record(job))]

    with ThreadPoolExecutor(len(jobs)) as pool:
        won = dict(zip(jobs, pool.map(claim_all, jobs), strict=True))
    winners = sorted(name for names in won.values() for name in names)
    assert winners == sorted(NAMES), won  # every experiment once, none twice
    on_remote = clones["0"].fetch()
    assert {name: r.job for name, (_, r) in on_remote.items()} == {
        name: job for job, names in won.items() for name in names
    }
    # Progress is a compare-and-swap on the holder's last update; nobody else may write.
    name, holder = NAMES[0], on_remote[NAMES[0]][1].job
    clones[holder].update(name, record(holder, "running"))
    other = next(job for job in jobs if job != holder)
    with pytest.raises(PhaseError, match=f"is not held by job {other}"):
        clones[other].update(name, record(other, "success"))
    assert clones[other].fetch()[name][1].status == "running"


def drainer(repo: Path, plan: Plan, profile: str, monkeypatch, job: str) -> SharedDrainer:
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "c")
    return SharedDrainer(repo, load_phase("1.1", tmp_phases(repo)), 1, plan, profile)


def tmp_phases(repo: Path) -> Path:
    (repo / "phases").mkdir(exist_ok=True)
    (repo / "phases" / "phase1_1.yaml").write_text(PHASE)
    return repo / "phases"


def test_a_requeued_job_resumes_its_own_claim_and_never_another_jobs(shared, tmp_path, monkeypatch):
    _, plan = shared
    first = drainer(job_clone(tmp_path, plan, "7"), plan, "a", monkeypatch, "7")
    taken = first.take_next()
    assert taken.name == NAMES[0] and taken.plan == plan.id
    first.shared.update(taken.name, first.me.now(status="interrupted"))
    # Job 8 (share b) finished its share: it steals from the end of a's, not a's running one.
    thief = drainer(job_clone(tmp_path, plan, "8"), plan, "b", monkeypatch, "8")
    assert [thief.take_next().name for _ in range(3)] == [NAMES[4], NAMES[5], NAMES[3]]
    # Job 8 was stopped after NAMES[4] succeeded, before its claim said so.
    thief.local_claim(NAMES[4]).status, thief.claims[NAMES[4]].returncode = "success", 0
    thief.shared.update(NAMES[4], thief.me.now(status="running"))
    # Job 7, requeued (same id, same clone): its interrupted claim first, then its share.
    again = drainer(first.repo, plan, "a", monkeypatch, "7")
    assert again.take_next().name == NAMES[0]
    assert again.take_next().name == NAMES[1]
    holders = {name: r.job for name, (_, r) in again.shared.fetch().items()}
    assert holders == {NAMES[0]: "7", NAMES[1]: "7", NAMES[3]: "8", NAMES[4]: "8", NAMES[5]: "8"}
    # Job 8 requeued: it tells the claim how NAMES[4] ended instead of running it again (its
    # push fails here: this repository has no DVC; the job would end 1, `not pushed`).
    thief_again = drainer(thief.repo, plan, "b", monkeypatch, "8")
    thief_again.claims = thief.claims
    assert thief_again.take_next().name == NAMES[5]  # then its claimed ones, as they come
    assert thief_again.shared.fetch()[NAMES[4]][1].status == "success"


def test_the_users_clone_sees_who_holds_what_and_a_dead_jobs_claim_as_failed(
    shared, tmp_path, monkeypatch
):
    user, plan = shared
    spec = load_phase("1.1", user / "phases")
    for name in plan.experiments:
        Claim(name, {}, plan=plan.id).save(user)  # as `phase submit` leaves them
    job = SharedClaims(job_clone(tmp_path, plan, "5"), plan)
    job.take(NAMES[0], record("5", "running"))
    job.take(NAMES[1], record("6", "running"))
    monkeypatch.setattr(home, "job_ended", lambda r: r.job == "6")  # SLURM: job 6 is gone
    assert home.follow(user, spec) == [plan]
    claims = read_claims(user, spec)
    assert (claims[NAMES[0]].status, claims[NAMES[0]].job) == ("running", "5")
    assert claims[NAMES[1]].status == "failed"  # reported; the next submit runs it again
    assert "job 6 ended without finishing it" in claims[NAMES[1]].log
    assert (claims[NAMES[2]].status, claims[NAMES[2]].job) == ("claimed", "")  # unstarted


def test_a_success_that_never_reached_the_remotes_is_named_not_ranked(shared, tmp_path):
    user, plan = shared
    spec = load_phase("1.1", user / "phases")
    subprocess.run(["dvc", "init", "-q"], cwd=user, check=True)
    store = ["dvc", "remote", "add", "-d", "store", str(tmp_path / "store")]
    subprocess.run(store, cwd=user, check=True, capture_output=True)
    Claim(NAMES[3], {}, plan=plan.id).save(user)
    job = SharedClaims(job_clone(tmp_path, plan, "5"), plan)
    job.take(NAMES[3], record("5", "success"))  # its `dvc exp push` failed: pushed stays False
    with pytest.raises(PhaseError, match=rf"`dvc exp push origin {NAMES[3]}` in the job's clone"):
        home.bring_home(user, spec)
    assert read_claims(user, spec)[NAMES[3]].job == "5"


@pytest.mark.slow
def test_a_pulled_experiment_counts_only_while_it_passes_the_baseline_check(tmp_path):
    """A job's drainer (no SLURM: its clone and claims as a job has them) runs the plan and
    pushes; the user's clone pulls it, and judges it like a local run: stale once src changes."""
    from conftest import TINY, make_project

    from aeselect.sweep.results import collect_results
    from aeselect.sweep.sweep_record import recorded_sweep

    user = make_project(tmp_path / "user", TINY)
    for path in (user / "phases").glob("phase*.yaml"):
        path.unlink()
    (user / "phases" / "phase1_1.yaml").write_text(PHASE.split("  e1:")[0])  # e0 alone
    remote = ["git", "init", "-q", "--bare", "-b", "main", str(tmp_path / "remote.git")]
    subprocess.run(remote, check=True)
    git(user, "remote", "add", "origin", str(tmp_path / "remote.git"))
    store = ["dvc", "remote", "add", "-d", "store", str(tmp_path / "store")]
    subprocess.run(store, cwd=user, check=True, capture_output=True)
    git(user, "add", "-A")
    git(user, "commit", "-q", "-m", "phase and remotes")
    git(user, "push", "-q", "origin", "main")
    queued = subprocess.run(
        [sys.executable, "-m", "aeselect", "phase", "queue", "1.1", "--repo", str(user)],
        capture_output=True,
        text=True,
    )
    assert queued.returncode == 0, queued.stderr
    spec = load_phase("1.1", user / "phases")
    plan = home.make_plan(user, spec, {"a": 1})
    assert plan.shares == {"a": [NAMES[0]]}

    clone = job_clone(tmp_path, plan, "11")
    command = [sys.executable, "-m", "aeselect", "phase", "drain", "1.1", "--repo", str(clone)]
    drain = subprocess.run(
        [*command, "--plan", plan.id, "--profile", "a"],
        env=os.environ | {"SLURM_JOB_ID": "11", "PYTHONPATH": str(clone / "src")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert drain.returncode == 0, drain.stderr
    assert f"[drain] {NAMES[0]}: pushed to origin" in drain.stderr

    def state() -> str:
        frame = collect_results(user, spec, recorded_sweep(user, spec))
        return frame.set_index("experiment").loc[NAMES[0], "state"]

    assert home.where_ran(user, spec) == {}  # not followed yet
    assert home.bring_home(user, spec, echo=lambda _: None) == [NAMES[0]]
    assert home.where_ran(user, spec)[NAMES[0]].startswith("job 11 on ")
    assert state() == "Success"
    (user / "src" / "aeselect" / "__init__.py").write_text('"""changed code"""\n')
    git(user, "commit", "-q", "-am", "code change")
    assert home.bring_home(user, spec) == []  # already here
    assert state() == "Stale"
