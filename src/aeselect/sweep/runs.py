"""A phase's runs in DVC, judged against today's baseline.

A phase run (`spec.runs()`: an experiment, or with `repeats` an experiment under one training
seed) may have several attempts (`sweep.names`). An attempt counts only while it is *fresh*: the
params it recorded equal params.yaml at HEAD plus its experiment's set plus the sweep's --set,
and every stage's definition and deps are HEAD's (`sweep.freshness`). Every other run is stale.
`dvc exp show` lists a failed experiment with an error and no metrics (dvc 3.67.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aeselect.config import PARAMS_FILE, ConfigError, apply_overrides, flatten, from_dict
from aeselect.dvc import exp_show as dvc_exp_show
from aeselect.dvc import experiment_baselines
from aeselect.git import git
from aeselect.paths import EVALUATE_METRICS, PROBE_METRICS, TRAIN_METRICS
from aeselect.sweep.claim_states import claim_records, claim_state
from aeselect.sweep.freshness import stale_deps
from aeselect.sweep.names import RUN_NAME, parse_run_name, run_name
from aeselect.sweep.spec import PhaseError, PhaseRun, PhaseSpec
from aeselect.sweep.status import Status
from aeselect.sweep.tasks import TaskState, queue_states

METRICS_FILES = tuple(p.as_posix() for p in (EVALUATE_METRICS, TRAIN_METRICS, PROBE_METRICS))


def experiment_params(spec: PhaseSpec, run: PhaseRun, extra: dict[str, Any]) -> dict[str, Any]:
    """What one run sets on top of params.yaml: its experiment's params (and, with `repeats`,
    its training seed), then the sweep's --set."""
    clash = sorted(set(extra) & set(run.params))
    if clash:
        raise PhaseError(
            f"--set {', '.join(clash)}: phase {spec.id} run {run.name!r} sets this itself "
            f"({spec.path}: its experiment {run.key!r} or `repeats`); drop it from --set"
        )
    return {**run.params, **extra}


def canonical_params(tree: dict[str, Any]) -> dict[str, Any] | None:
    """Flattened params as the stages see them (validated, types coerced), so that `8` and
    `8.0` or `1e-3` and `0.001` compare equal; None when today's code would reject them."""
    try:
        return from_dict(tree).flat()
    except ConfigError:
        return None


@dataclass(frozen=True)
class Baseline:
    """What a run must have recorded to count for a phase today: HEAD's params.yaml with the
    sweep's --set, and HEAD's pipeline (its commit)."""

    commit: str
    params: dict[str, Any]  # params.yaml at HEAD, nested, as DVC parsed it
    sweep: dict[str, Any]

    def expected(self, spec: PhaseSpec, run: PhaseRun) -> dict[str, Any]:
        """The canonical params of one phase run; raises, naming the file, if invalid."""
        merged = apply_overrides(self.params, experiment_params(spec, run, self.sweep))
        try:
            return from_dict(merged).flat()
        except ConfigError as err:
            raise PhaseError(
                f"{spec.path}: experiment {run.key!r} on top of {PARAMS_FILE}: {err}"
            ) from None


@dataclass(frozen=True)
class Run:
    """One attempt at a phase run (`PhaseRun`) under its own DVC experiment name: queued,
    running or finished."""

    name: str
    key: str
    repeat: int  # the PhaseRun's training seed index (0 without `repeats`)
    attempt: int  # 1 for p1-1-lc8, 2 for p1-1-lc8_2, ...
    status: Status
    task: TaskState | None  # DVC's queue entry or the drainer's claim, if either knows it
    rev: str | None = None
    baseline: str | None = None  # the commit it was queued on
    timestamp: str = ""
    params: dict[str, Any] | None = None  # canonical recorded params
    metrics: dict[str, Any] = field(default_factory=dict)
    fresh: bool = False  # its params and pipeline match today's baseline
    stale_why: str = ""  # what differs from today's baseline, when it is not fresh

    @property
    def ran_on(self) -> str:
        return (self.baseline or "unknown commit")[:7]


@dataclass(frozen=True)
class PhaseRuns:
    """Every run of a phase that DVC or the drainer knows, judged against today's baseline."""

    spec: PhaseSpec
    baseline: Baseline
    runs: list[Run]
    taken: frozenset[str]  # every name in use, also by runs DVC no longer shows

    def of(self, phase_run: PhaseRun) -> list[Run]:
        """The attempts at one phase run (an experiment, or one of its training seeds)."""
        return sorted(
            (r for r in self.runs if (r.key, r.repeat) == (phase_run.key, phase_run.repeat)),
            key=lambda r: r.attempt,
        )

    def current(self, phase_run: PhaseRun) -> Run | None:
        """The fresh attempt that speaks for a phase run: its newest success, else its newest
        attempt (queued, running, failed or stuck)."""
        fresh = [r for r in self.of(phase_run) if r.fresh]
        done = [r for r in fresh if r.status == Status.SUCCESS]
        return (done or fresh or [None])[-1]

    def stale(self, phase_run: PhaseRun) -> list[Run]:
        return [r for r in self.of(phase_run) if not r.fresh]

    def wants_new_run(self, phase_run: PhaseRun, retry_failed: bool) -> bool:
        """No fresh run done or under way, or (with `retry_failed`) its fresh run failed."""
        run = self.current(phase_run)
        return run is None or (run.status == Status.FAILED and retry_failed)

    def next_name(self, phase_run: PhaseRun) -> str:
        """The attempt after the last one any record of this clone knows: runs are told apart
        by name in DVC's queue, the drainer's claims and `dvc exp show`, so a name is never
        given twice, and a higher attempt is always the newer run."""
        parsed = [parse_run_name(self.spec, name) for name in self.taken]
        mine = (phase_run.key, phase_run.repeat)
        last = max((p[2] for p in parsed if p and p[:2] == mine), default=0)
        name = run_name(phase_run, last + 1)
        if not RUN_NAME.match(name):  # it reaches `dvc exp run -n` and Git ref names
            raise PhaseError(f"{name!r} is not a valid experiment name")
        return name


def _params_tree(data: dict[str, Any]) -> dict[str, Any]:
    return (data.get("params") or {}).get("params.yaml", {}).get("data") or {}


def _metrics(data: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in METRICS_FILES:
        metrics = (data.get("metrics") or {}).get(path, {}).get("data") or {}
        found |= {k: v for k, v in flatten(metrics).items() if k not in found}
    return found


def load_phase_runs(repo: Path, spec: PhaseSpec, sweep: dict[str, Any]) -> PhaseRuns:
    """The phase's runs, each marked fresh when its recorded params equal what the phase asks
    for today and, stage by stage, its pipeline's definition and deps are HEAD's."""
    shown = exp_show(repo)
    baseline = head_baseline(repo, shown, sweep)
    expected = {(run.key, run.repeat): baseline.expected(spec, run) for run in spec.runs()}
    records = shown_runs(spec, shown)
    claims = claim_records(repo)
    queued = queue_states(repo)
    taken = frozenset(records.keys() | claims.keys() | queued.keys())
    known = []
    for name in sorted(taken):
        parsed = parse_run_name(spec, name)
        if parsed is None:
            continue  # another phase's
        run = _known_run(name, parsed, records.get(name), claims.get(name), queued)
        if run is not None:  # else only DVC's queue history remembers it: its experiment is gone
            known.append(run)
    # A finished run's deps are in the dvc.lock of its experiment commit; any other run's are
    # its baseline's (`dvc exp run --queue` snapshots the clean workspace of that commit).
    commits = dict(_pipeline_commit(run) for run in known)
    changed = stale_deps(repo, baseline.commit, {c: lock for c, lock in commits.items() if c})
    runs = []
    for run in known:
        commit, _ = _pipeline_commit(run)
        why = _stale_why(run, expected[run.key, run.repeat], changed.get(commit or ""))
        runs.append(replace(run, fresh=not why, stale_why=why))
    return PhaseRuns(spec, baseline, runs, taken)


def _pipeline_commit(run: Run) -> tuple[str | None, bool]:
    """The commit whose pipeline `run` ran (or will run), and whether DVC wrote its dvc.lock
    for the run: a finished run's experiment commit, else the commit it was queued on."""
    if run.status == Status.SUCCESS and run.rev:
        return run.rev, True
    return run.baseline, False


def _stale_why(run: Run, expected: dict[str, Any], changed: list[str] | None) -> str:
    """Why `run` does not count today ("" when it does): its params, else its pipeline."""
    if run.params is None:
        return "its params are invalid today"
    differ = sorted(
        k for k in expected.keys() | run.params.keys() if expected.get(k) != run.params.get(k)
    )
    if differ:
        return f"{_listed(differ)} differ from today's params"
    if changed is None:
        return "the commit it ran on is unknown"
    return f"{_listed(changed)} changed since the run" if changed else ""


def _listed(items: list[str], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return f"{shown} and {len(items) - most} more" if len(items) > most else shown


def head_baseline(repo: Path, shown: list[dict[str, Any]], sweep: dict[str, Any]) -> Baseline:
    """HEAD's params (as `dvc exp show` parsed them), with the sweep's --set."""
    head = git(repo, "rev-parse", "HEAD").strip()
    head_entry = next((b for b in shown if b.get("rev") == head), None)
    if head_entry is None:
        raise PhaseError(f"`dvc exp show --rev HEAD` does not list HEAD ({head[:7]}) in {repo}")
    return Baseline(head, _params_tree(head_entry.get("data") or {}), sweep)


def shown_runs(spec: PhaseSpec, shown: list[dict[str, Any]]) -> dict[str, Run]:
    """The phase's experiments in `dvc exp show`: one per name, the newest."""
    records: dict[str, Run] = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            parsed = parse_run_name(spec, exp.get("name") or "")
            if parsed is None:
                continue
            rev = exp["revs"][0]
            data = rev.get("data") or {}
            failed = bool(rev.get("error"))
            run = Run(
                exp["name"],
                *parsed,
                status=Status.FAILED if failed else Status.SUCCESS,
                task=None,
                rev=rev.get("rev"),
                baseline=entry.get("rev"),
                timestamp=data.get("timestamp") or "",
                params=canonical_params(_params_tree(data)),
                metrics={} if failed else _metrics(data),
            )
            if run.name not in records or run.timestamp >= records[run.name].timestamp:
                records[run.name] = run
    return records


def _known_run(
    name: str,
    parsed: tuple[str, int, int],
    record: Run | None,
    claim: dict[str, Any] | None,
    queued: dict[str, TaskState],
) -> Run | None:
    """One run as its newest source knows it: the drainer's claim when newer than DVC's record
    of the name, else DVC's record with its queue state; None when neither knows it."""
    if claim is not None and (record is None or record.timestamp < claim.get("claimed_at", "")):
        return Run(
            name,
            *parsed,
            status=claim_state(claim).status,
            task=claim_state(claim),
            rev=record.rev if record else None,
            baseline=claim.get("baseline") or None,
            timestamp=claim.get("claimed_at", ""),
            params=record.params if record else claim.get("params"),
            metrics=record.metrics if record else {},
        )
    if record is None:
        return None
    task = queued.get(name)
    status = task.status if task and task.status != Status.SUCCESS else record.status
    return replace(record, status=status, task=task)


def exp_show(repo: Path) -> list[dict[str, Any]]:
    """`dvc exp show --json` of HEAD and of every commit an experiment derives from, as
    `dvc exp show -A` lists them (promoted phases drop out of a plain exp show), without walking
    the whole history: a phase command takes the same time at 10 or 10,000 commits."""
    head = git(repo, "rev-parse", "HEAD").strip()
    return dvc_exp_show(repo, [head, *sorted(experiment_baselines(repo) - {head})])
