"""`aeselect phase ...`: thin commands over aeselect.phases (and, for `drain` and `submit`,
aeselect.cluster); they live above both packages, which never import this module."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from aeselect.config import apply_overrides, from_dict, parse_assignment
from aeselect.git import GitError
from aeselect.sweep.queue import dirty_paths, queue_phase
from aeselect.sweep.runs import load_phase_runs
from aeselect.sweep.spec import PhaseError, PhaseSpec, all_phases, load_phase
from aeselect.sweep.status import Status
from aeselect.sweep.sweep_record import recorded_sweep


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _repo(args: argparse.Namespace) -> Path:
    return Path(args.repo).resolve()


def _spec(args: argparse.Namespace) -> PhaseSpec:
    return load_phase(args.phase, _repo(args) / "phases")


def parse_sets(assignments: list[str]) -> dict:
    extra = dict(parse_assignment(a) for a in assignments)
    from_dict(apply_overrides({}, extra))  # unknown keys and bad values fail here, named
    return extra


def sweep_of(args: argparse.Namespace, repo: Path, spec: PhaseSpec) -> dict:
    """The sweep's --set: as given, else what the phase's last `phase queue` recorded."""
    if args.set:
        return parse_sets(args.set)
    sweep = recorded_sweep(repo, spec)
    if sweep:
        shown = " ".join(f"--set {k}={v}" for k, v in sweep.items())
        print(f"phase {spec.id}: the sweep's recorded {shown}", file=sys.stderr)
    return sweep


def queue(args: argparse.Namespace) -> list[str]:
    """`phase queue`, returning the runs that speak for the phase (for run and submit)."""
    from aeselect.phases.promote import require_decided

    repo, spec = _repo(args), _spec(args)
    require_decided(spec, repo)
    if not args.dry_run and not args.allow_dirty:
        dirty = dirty_paths(repo)
        if dirty:
            raise PhaseError(
                "uncommitted changes that queued experiments would silently snapshot (or drop, if "
                f"untracked): {', '.join(dirty)}. Commit them, or pass --allow-dirty"
            )
    return queue_phase(
        repo,
        spec,
        sweep_of(args, repo, spec),
        retry_failed=not args.no_retry,
        dry_run=args.dry_run,
    )


def cmd_queue(args: argparse.Namespace) -> int:
    queue(args)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Queue, then drain with the drainer a SLURM job runs (aeselect.cluster.drain): one executor
    for both, with its claims, exit codes, resume and budget rungs."""
    from aeselect.cluster.drain import ANOTHER_DRAINER_EXIT_CODE, drain
    from aeselect.cluster.rungs import unprune

    queue(args)
    if args.dry_run:
        return 0
    repo, spec = _repo(args), _spec(args)
    unprune(repo, spec, args.unprune)
    if drain(repo, spec, args.jobs) == ANOTHER_DRAINER_EXIT_CODE:
        return ANOTHER_DRAINER_EXIT_CODE
    return print_outcome(repo, spec)


def print_outcome(repo: Path, spec: PhaseSpec) -> int:
    """Each run that speaks for the phase and how it ended; 1 while one has not succeeded (a
    run pruned at a budget rung has ended: it counts as done)."""
    view = load_phase_runs(repo, spec, recorded_sweep(repo, spec))
    unfinished = []
    for phase_run in spec.runs():
        run = view.current(phase_run)
        status = run.status if run else Status.MISSING
        note = f" {run.task.note}" if run and run.task and run.task.note else ""
        print(f"{run.name if run else phase_run.name}: {status}{note}")
        if status not in (Status.SUCCESS, Status.PRUNED, Status.EXCLUDED):
            unfinished.append(run.name if run else phase_run.name)
    if unfinished:
        _note(
            f"phase {spec.id}: not done: {', '.join(unfinished)}; see `aeselect phase status "
            f"{spec.id}` for their logs, and `aeselect phase run {spec.id}` runs them again"
        )
    return 1 if unfinished else 0


def cmd_status(args: argparse.Namespace) -> int:
    repo = _repo(args)
    if args.phase is None:
        return cmd_show(args)
    from aeselect.cluster.home import follow, where_ran

    spec = _spec(args)
    follow(repo, spec)  # a phase shared between jobs: their claims on the Git remote
    where = where_ran(repo, spec)
    view = load_phase_runs(repo, spec, sweep_of(args, repo, spec))
    bad = 0
    for phase_run in spec.runs():
        current = view.current(phase_run)
        if not view.of(phase_run):
            print(f"{phase_run.name:28s} missing")
        for run in view.of(phase_run):
            if not run.fresh:
                print(f"{run.name:28s} stale (ran on {run.ran_on}): {run.stale_why}")
                continue
            line = f"{run.name:28s} {run.status}"
            if run.task is not None and run.task.note:
                line += f" {run.task.note}"
            if run is not current:
                line += f", superseded by {current.name}"
            elif run.status in (Status.FAILED, Status.STUCK):
                bad += 1
            if run.status in (Status.FAILED, Status.STUCK):
                log = run.task.log_path(repo) if run.task else None
                shown = log.relative_to(repo) if log and log.is_relative_to(repo) else log
                line += f"  log: {shown or '(none)'}"  # a shared job's is in its own clone
            if run is current and run.status == Status.STUCK:
                line += "  (its worker is gone: `dvc queue kill`/`remove` it and queue again)"
            if run.name in where:
                line += f"  {where[run.name]}"
            print(line)
    return 1 if bad else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from aeselect.cluster.home import bring_home
    from aeselect.phases.decide import VERDICTS
    from aeselect.phases.report import compare, display_table

    repo, spec = _repo(args), _spec(args)
    bring_home(repo, spec, echo=_note)
    result = compare(repo, spec, sweep_of(args, repo, spec))
    ranking = result.ranking
    table = ranking.table if ranking else result.phase.experiments
    print(display_table(spec, table).to_string(index=False))
    if ranking:
        print(
            f"\nverdict: {ranking.verdict} ({ranking.winner or 'no winner'}: "
            f"{VERDICTS[ranking.verdict]})"
            f"\nwhy: {ranking.reason}"
        )
    print(f"\nreport: {(result.report_dir / 'report.md').relative_to(repo)}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from aeselect.cluster.home import bring_home
    from aeselect.phases.promote import promote

    repo, spec = _repo(args), _spec(args)
    bring_home(repo, spec, echo=_note)
    decision = promote(repo, spec, sweep_of(args, repo, spec), pick=args.pick, why=args.why)
    print(f"{decision['commit']} {decision['commit_message']}\nwhy: {decision['rationale']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from aeselect.phases.promote import read_decision

    repo = _repo(args)
    next_phase = None
    for spec in all_phases(repo / "phases"):
        decision = read_decision(spec.id, repo)
        if decision:
            chosen = ", ".join(f"{k}={v}" for k, v in decision["selected"].items())
            print(f"{spec.id} {spec.title:22s} decided: {decision['winner']} ({chosen})")
        else:
            print(f"{spec.id} {spec.title:22s} open")
            next_phase = next_phase or spec.id
    print(
        f"next: aeselect phase run {next_phase}"
        if next_phase
        else "Phase 1 is complete: see phases/decisions/final.yaml"
    )
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    from aeselect.cluster.drain import drain
    from aeselect.cluster.rungs import unprune

    unprune(_repo(args), _spec(args), args.unprune)
    return drain(_repo(args), _spec(args), args.jobs, args.plan, args.profile)


def cmd_submit(args: argparse.Namespace) -> int:
    from aeselect.cluster.slurm import check_fits, load_profiles, submit, submit_shared

    repo, spec = _repo(args), _spec(args)
    profiles = load_profiles(repo, args.cluster)
    if len(profiles) > 1:  # one job per profile, sharing the phase
        return submit_shared(
            repo,
            spec,
            args.cluster,
            dry_run=args.dry_run,
            queue=lambda: queue(args),
            sweep=sweep_of(args, repo, spec),
            retry_failed=not args.no_retry,
        )
    # A bad profile must not leave the phase queued.
    check_fits(spec, profiles[0])
    if not args.dry_run:
        if shutil.which("sbatch") is None:
            raise PhaseError(
                "sbatch is not on PATH: submit from a login node (or module load slurm)"
            )
        cmd_queue(args)
    return submit(repo, spec, profiles[0].name, dry_run=args.dry_run)


def add_phase_commands(commands: argparse._SubParsersAction) -> None:
    phase = commands.add_parser(
        "phase", help="Phase 1 sweeps: queue, run, status, compare, promote"
    )
    sub = phase.add_subparsers(dest="phase_command", required=True)
    add_sweep_commands(sub)
    add_result_commands(sub)
    add_cluster_commands(sub)


def add_command(
    sub: argparse._SubParsersAction, name: str, func, help_text: str, phase_arg: str = "required"
) -> argparse.ArgumentParser:
    """A phase subcommand with its phase id ("required", "optional" or "none") and --repo; a
    PhaseError it raises becomes a message and exit code 2."""
    parser = sub.add_parser(name, help=help_text)
    if phase_arg == "required":
        parser.add_argument("phase", help="phase id, e.g. 1.1")
    elif phase_arg == "optional":
        parser.add_argument("phase", nargs="?", help="phase id; omit for all of Phase 1")
    parser.add_argument("--repo", default=".", help="project repository (default: .)")
    parser.set_defaults(func=lambda a: _guard(func, a))
    return parser


def add_unprune_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--unprune",
        action="append",
        default=[],
        metavar="NAME",
        help="train a run pruned at a budget rung to the end, from its rung snapshot",
    )


def add_sweep_commands(sub: argparse._SubParsersAction) -> None:
    """`queue` and `run`: the phase's experiments into DVC's queue, and for `run` through it."""
    queue_parser = add_command(
        sub, "queue", cmd_queue, "queue the phase's experiments (`dvc exp run --queue`)"
    )
    run = add_command(sub, "run", cmd_run, "queue if needed, then drain the queue locally and wait")
    for parser in (queue_parser, run):
        add_queue_options(parser, dry_run_help="print the dvc commands only")
    run.add_argument("-j", "--jobs", type=int, default=1, help="parallel experiments")
    add_unprune_option(run)


def add_result_commands(sub: argparse._SubParsersAction) -> None:
    """`status`, `compare`, `promote` and `show`: what the runs did, and what was decided."""
    add_set(
        add_command(
            sub,
            "status",
            cmd_status,
            "each run: queued/running/success/failed/stuck/stale",
            "optional",
        )
    )
    add_set(
        add_command(
            sub, "compare", cmd_compare, "rank the phase's experiments; write phases/reports/<id>/"
        )
    )
    promote = add_command(
        sub, "promote", cmd_promote, "commit the winner's selected params and the decision"
    )
    add_set(promote)
    promote.add_argument("--pick", help="promote this experiment instead of the rule's winner")
    promote.add_argument("--why", help="reason for --pick, recorded in the decision")
    add_command(sub, "show", cmd_show, "where Phase 1 stands and what to run next", "none")


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """`drain` (inside a SLURM job) and `submit` (from a login node)."""
    drain = add_command(
        sub, "drain", cmd_drain, "inside a SLURM allocation: run the queued experiments"
    )
    drain.add_argument("-j", "--jobs", type=int, default=1, help="parallel experiments (GPUs)")
    drain.add_argument("--plan", help="a job's share of a plan shared between jobs (submit)")
    drain.add_argument("--profile", help="with --plan: the profile whose share this job drains")
    add_unprune_option(drain)
    submit = add_command(
        sub, "submit", cmd_submit, "queue the phase and sbatch its drainer on a cluster"
    )
    submit.add_argument(
        "--cluster",
        action="append",
        required=True,
        help="profile (or group of profiles) in hpc/clusters.yaml; repeat it to share the "
        "phase between one job per profile",
    )
    add_queue_options(submit, dry_run_help="print the sbatch command and script")


def add_queue_options(parser: argparse.ArgumentParser, *, dry_run_help: str) -> None:
    """What every command that queues the phase takes: --set, --dry-run, --allow-dirty,
    --no-retry."""
    add_set(parser)
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="queue even with uncommitted params/code changes",
    )
    parser.add_argument(
        "--no-retry",
        action="store_true",
        help="leave failed experiments failed (by default each gets a new run)",
    )


def add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="param applied to every experiment of the phase (repeatable); "
        "default: the --set of the phase's last `phase queue`",
    )


def _guard(func, args: argparse.Namespace) -> int:
    try:
        return func(args)
    except (PhaseError, GitError) as err:
        print(f"aeselect phase: {err}", file=sys.stderr)
        return 2
