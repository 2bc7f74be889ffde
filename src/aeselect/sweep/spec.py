"""Phase files (`phases/phase1_*.yaml`) as validated data: what a sweep runs and how it decides.

A user changes a sweep by editing these files, never code; every mistake is reported with the
file and the key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aeselect.config import (
    Config,
    ConfigError,
    apply_overrides,
    from_dict,
    read_yaml,
    unknown_key,
    valid_keys,
)
from aeselect.evaluation.gates import Bound, gate_bounds
from aeselect.sweep.metric_names import STAGE_METRICS, is_stage_metric

PHASES_DIR = Path("phases")
DECISIONS_DIR = PHASES_DIR / "decisions"
REPORTS_DIR = PHASES_DIR / "reports"
# Experiment keys become part of DVC experiment names, i.e. Git ref names: keep them plain.
EXPERIMENT_KEY = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
PHASE_ID = re.compile(r"^\d+\.\d+$")
# The key a phase's `repeats` varies: training randomness only, so every run sees the same data.
REPEAT_SEED_KEY = "train.seed"
# The keys a phase file must hold; those it may hold (the optional `repeats` only); those of
# `decide:` and of one criterion.
REQUIRED_PHASE_KEYS = ("id", "title", "requires", "selects", "experiments", "decide")
PHASE_KEYS = (*REQUIRED_PHASE_KEYS, "repeats", "budget")
BUDGET_KEYS = ("rungs", "prune", "slack")
DECIDE_KEYS = ("metric", "direction", "tolerance", "tie_breakers", "requirements")
CRITERION_KEYS = ("metric", "param", "direction")
REQUIREMENT_KEYS = ("metric", "min", "max", "gate")
TEXT_METRICS = ("latent.shape", "device")  # the stage metrics that are not numbers: no bound


class PhaseError(ValueError):
    """A phase file or phase command that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class Criterion:
    """One ordering key: a metric from the evaluate/train summaries, or a param."""

    key: str
    direction: str  # "min" or "max"
    source: str = "metric"  # "metric" or "param"

    def describe(self) -> str:
        better = "lower" if self.direction == "min" else "higher"
        return f"{self.key} ({better} is better)"


@dataclass(frozen=True)
class Requirement:
    """A bound every candidate must meet to be ranked at all: a metric's `min` or `max`, or an
    evaluate gate, whose bounds are the candidate's own params (`evaluate.*` of params.yaml)."""

    metric: str = ""
    kind: str = ""  # "min" (value >= limit) or "max" (value <= limit), with `metric`
    limit: float = 0.0
    gate: str = ""

    def bounds(self, cfg: Config) -> tuple[Bound, ...]:
        if self.gate:
            return gate_bounds(cfg.evaluate)[self.gate]
        return (Bound(self.metric, self.kind, self.limit),)

    def describe(self) -> str:
        return f"gate {self.gate}" if self.gate else f"{self.metric} {self.kind} {self.limit:g}"


# Metrics a candidate's params alone determine: a requirement on them is decided before training.
PARAMS_METRICS = {"latent.compression_ratio": lambda cfg: cfg.compression_ratio}


@dataclass(frozen=True)
class DecisionRule:
    primary: Criterion
    tolerance: float
    tie_breakers: tuple[Criterion, ...]
    requirements: tuple[Requirement, ...] = ()


@dataclass(frozen=True)
class Budget:
    """Rungs where a sweep's trainings pause so that clear losers can be pruned (phases.prune)."""

    rungs: tuple[float, ...]  # fractions of train.max_steps, increasing, in (0, 1)
    prune: bool  # False: pause and score at the rungs, prune nothing (a dry run of the rule)
    # Relative tolerance added at a rung for the training still ahead: a rung at fraction f
    # prunes only beyond `decide.tolerance + slack * (1 - f)`. Wider models lag early on a
    # cosine schedule and catch up late (README, "Budget"), which the final tolerance ignores.
    slack: float = 0.0
    where: str = field(default="budget", compare=False)  # `<phase file>: budget`, for errors

    def allowance(self, rung: int) -> float:
        """The extra relative tolerance at rung index `rung`."""
        return self.slack * (1 - self.rungs[rung])

    def steps(self, max_steps: int, log_every: int) -> tuple[int, ...]:
        """Each rung as a training step: the fraction of `max_steps`, rounded to a log boundary
        (a training pauses only there); refused when two rungs or a rung and the end collapse."""
        steps = tuple(round(f * max_steps / log_every) * log_every for f in self.rungs)
        if steps[0] <= 0 or steps[-1] >= max_steps or len(set(steps)) != len(steps):
            raise PhaseError(
                f"{self.where}.rungs: {list(self.rungs)} of train.max_steps={max_steps} at "
                f"train.log_every={log_every} give steps {list(steps)}; rungs need distinct "
                f"steps strictly between 0 and {max_steps}: space the fractions at least "
                f"{log_every / max_steps:.3g} apart and away from 0 and 1"
            )
        return steps


@dataclass(frozen=True)
class PhaseRun:
    """One DVC experiment of a phase: an experiment of the phase file under one training seed."""

    name: str  # the DVC experiment name
    key: str  # the experiment's key in the phase file
    repeat: int  # 0 .. repeats - 1
    params: dict[str, Any]  # the experiment's params, plus REPEAT_SEED_KEY when the phase repeats


@dataclass(frozen=True)
class PhaseSpec:
    id: str
    title: str
    requires: str | None
    selects: tuple[str, ...]
    experiments: dict[str, dict[str, Any]]
    decide: DecisionRule
    path: Path = field(compare=False)
    repeats: int = 1  # training seeds per experiment (REPEAT_SEED_KEY = 0 .. repeats - 1)
    budget: Budget | None = None  # rungs for pruning clear losers early; None: train all fully

    @property
    def slug(self) -> str:
        return "p" + self.id.replace(".", "-")

    def experiment_name(self, key: str) -> str:
        """The DVC experiment name, e.g. `p1-1-lc8-bc16`: unique per phase, a valid Git ref."""
        return f"{self.slug}-{key}"

    def runs(self) -> list[PhaseRun]:
        """Every DVC experiment the phase runs: one per experiment, or with `repeats: N` one per
        experiment and training seed, named `<experiment name>-s<seed>`."""
        if self.repeats == 1:
            return [
                PhaseRun(self.experiment_name(key), key, 0, dict(params))
                for key, params in self.experiments.items()
            ]
        return [
            PhaseRun(
                f"{self.experiment_name(key)}-s{seed}", key, seed, {**params, REPEAT_SEED_KEY: seed}
            )
            for key, params in self.experiments.items()
            for seed in range(self.repeats)
        ]

    def names(self) -> dict[str, str]:
        """DVC experiment name -> experiment key, for every run."""
        return {run.name: run.key for run in self.runs()}


def phase_path(phase_id: str, phases_dir: Path = PHASES_DIR) -> Path:
    if not PHASE_ID.match(phase_id):
        raise PhaseError(f"phase id {phase_id!r}: expected a number like 1.1")
    return phases_dir / f"phase{phase_id.replace('.', '_')}.yaml"


def _check_keys(raw: dict, allowed: Collection[str], where: str) -> None:
    """Refuse a key outside `allowed`, naming the closest valid one (a typo is never dropped)."""
    for key in raw:
        if key not in allowed:
            raise PhaseError(f"{where}: {unknown_key(str(key), list(allowed))}")


def _criterion(raw: Any, where: str) -> Criterion:
    if not isinstance(raw, dict):
        raise PhaseError(f"{where}: expected a mapping like {{metric: mse, direction: min}}")
    _check_keys(raw, CRITERION_KEYS, where)
    if len({"metric", "param"} & set(raw)) != 1:
        raise PhaseError(f"{where}: give exactly one of `metric:` or `param:`, plus `direction:`")
    direction = raw.get("direction")
    if direction not in ("min", "max"):
        raise PhaseError(f"{where}.direction: must be min or max, got {direction!r}")
    source = "metric" if "metric" in raw else "param"
    key = str(raw[source])
    if source == "param" and key not in valid_keys():
        raise PhaseError(f"{where}.param: {key!r} is not a params.yaml key")
    if source == "metric" and not is_stage_metric(key):
        known = unknown_key(key, list(STAGE_METRICS), what="metric of the train/evaluate stages")
        raise PhaseError(f"{where}.metric: {known}")
    return Criterion(key, direction, source)


def _requirement(raw: Any, where: str) -> Requirement:
    example = "{metric: latent.compression_ratio, min: 24} or {gate: latent_size}"
    if not isinstance(raw, dict):
        raise PhaseError(f"{where}: expected a mapping like {example}")
    _check_keys(raw, REQUIREMENT_KEYS, where)
    if "gate" in raw:
        gates = list(gate_bounds(from_dict({}).evaluate))
        if set(raw) != {"gate"}:
            raise PhaseError(f"{where}: a gate takes its bounds from params.yaml; give only gate:")
        if raw["gate"] not in gates:
            known = unknown_key(str(raw["gate"]), gates, what="gate")
            raise PhaseError(f"{where}.gate: {known}")
        return Requirement(gate=str(raw["gate"]))
    kinds = [k for k in ("min", "max") if k in raw]
    if "metric" not in raw or len(kinds) != 1:
        raise PhaseError(f"{where}: give a metric with exactly one of min: or max:, e.g. {example}")
    metric, kind = str(raw["metric"]), kinds[0]
    if not is_stage_metric(metric):
        known = unknown_key(metric, list(STAGE_METRICS), what="metric of the train/evaluate stages")
        raise PhaseError(f"{where}.metric: {known}")
    if metric in TEXT_METRICS:
        raise PhaseError(f"{where}.metric: {metric} is text, not a number, so it has no bound")
    limit = raw[kind]
    if isinstance(limit, bool) or not isinstance(limit, int | float) or math.isnan(limit):
        raise PhaseError(f"{where}.{kind}: must be a number, got {limit!r}")
    return Requirement(metric=metric, kind=kind, limit=float(limit))


def _decision_rule(raw: Any, path: Path) -> DecisionRule:
    where = f"{path}: decide"
    if not isinstance(raw, dict):
        raise PhaseError(f"{where}: expected a mapping with {', '.join(DECIDE_KEYS)}")
    _check_keys(raw, DECIDE_KEYS, where)
    for key in ("metric", "direction"):
        if key not in raw:
            raise PhaseError(f"{where}: missing key {key!r}")
    tolerance = raw.get("tolerance", 0.0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise PhaseError(f"{where}.tolerance: must be a number in [0, 1), got {tolerance!r}")
    if not 0 <= tolerance < 1:
        raise PhaseError(f"{where}.tolerance: must be in [0, 1), got {tolerance}")
    tie_breakers = raw.get("tie_breakers") or []
    if not isinstance(tie_breakers, list):
        raise PhaseError(f"{where}.tie_breakers: expected a list of {{metric|param, direction}}")
    requirements = raw.get("requirements") or []
    if not isinstance(requirements, list):
        raise PhaseError(f"{where}.requirements: expected a list of {{metric, min|max}}, {{gate}}")
    return DecisionRule(
        requirements=tuple(
            _requirement(item, f"{where}.requirements[{i}]") for i, item in enumerate(requirements)
        ),
        primary=_criterion({"metric": raw.get("metric"), "direction": raw.get("direction")}, where),
        tolerance=float(tolerance),
        tie_breakers=tuple(
            _criterion(item, f"{where}.tie_breakers[{i}]") for i, item in enumerate(tie_breakers)
        ),
    )


def _required_phase(raw: Any, phase_id: str, path: Path, phases_dir: Path) -> str | None:
    """`requires:` names an existing phase file (or is null), never this phase itself."""
    if raw is None:
        return None
    required = str(raw)
    if not PHASE_ID.match(required):
        raise PhaseError(f"{path}: requires: expected a phase id like 1.1 or null, got {raw!r}")
    if required == phase_id:
        raise PhaseError(f"{path}: requires: a phase cannot require itself")
    if not phase_path(required, phases_dir).exists():
        known = sorted(p.stem for p in phases_dir.glob("phase*.yaml"))
        raise PhaseError(
            f"{path}: requires: phase {required} has no file "
            f"{phase_path(required, phases_dir)} (phase files here: {', '.join(known)})"
        )
    return required


def load_phase(phase_id: str, phases_dir: Path = PHASES_DIR) -> PhaseSpec:
    """Read and fully validate one phase file: every mistake is reported here, before any run."""
    path = phase_path(phase_id, phases_dir)
    raw = _read_phase_file(path, phase_id, phases_dir)
    repeats = _repeats(raw.get("repeats", 1), path)
    selects = _selects(raw["selects"], path)
    experiments = raw["experiments"]
    if not isinstance(experiments, dict) or not experiments:
        raise PhaseError(f"{path}: experiments must be a non-empty mapping of name -> params")
    for name, params in experiments.items():
        _check_experiment(f"{path}: experiments.{name}", name, params, selects, repeats)
    return PhaseSpec(
        id=phase_id,
        title=str(raw["title"]),
        requires=_required_phase(raw["requires"], phase_id, path, phases_dir),
        selects=selects,
        experiments={str(k): dict(v) for k, v in experiments.items()},
        decide=_decision_rule(raw["decide"], path),
        path=path,
        repeats=repeats,
        budget=_budget(raw.get("budget"), path),
    )


def _read_phase_file(path: Path, phase_id: str, phases_dir: Path) -> dict[str, Any]:
    """The phase file as a mapping with every required key, no unknown one, and its own id."""
    if not path.exists():
        known = sorted(p.stem for p in phases_dir.glob("phase*.yaml"))
        raise PhaseError(f"{path}: no such phase file (phase files here: {', '.join(known)})")
    try:
        raw = read_yaml(path)  # duplicate keys (e.g. two experiments of one name) refused
    except ConfigError as err:
        raise PhaseError(str(err)) from None
    if not isinstance(raw, dict):
        raise PhaseError(f"{path}: expected a mapping with {', '.join(REQUIRED_PHASE_KEYS)}")
    _check_keys(raw, PHASE_KEYS, str(path))
    for key in REQUIRED_PHASE_KEYS:
        if key not in raw:
            raise PhaseError(f"{path}: missing key {key!r}")
    if str(raw["id"]) != phase_id:
        raise PhaseError(f"{path}: id is {raw['id']!r} but the file name says {phase_id}")
    return raw


def _repeats(raw: Any, path: Path) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise PhaseError(
            f"{path}: repeats must be a whole number >= 1 (training seeds per experiment), "
            f"got {raw!r}"
        )
    return raw


def _budget(raw: Any, path: Path) -> Budget | None:
    """`budget: {rungs: [0.25, 0.5], prune: true, slack: 0.0}`; absent or null: no rungs."""
    where = f"{path}: budget"
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise PhaseError(f"{where}: expected a mapping like {{rungs: [0.25, 0.5], prune: true}}")
    _check_keys(raw, BUDGET_KEYS, where)
    rungs, prune = raw.get("rungs"), raw.get("prune", True)
    if not isinstance(rungs, list) or not rungs:
        raise PhaseError(f"{where}.rungs: expected a non-empty list of fractions, got {rungs!r}")
    for rung in rungs:
        if isinstance(rung, bool) or not isinstance(rung, int | float) or not 0 < rung < 1:
            raise PhaseError(
                f"{where}.rungs: {rung!r} is not a fraction of train.max_steps in (0, 1)"
            )
    if rungs != sorted(set(rungs)):
        raise PhaseError(f"{where}.rungs: fractions must increase, got {rungs}")
    if not isinstance(prune, bool):
        raise PhaseError(f"{where}.prune: must be true or false, got {prune!r}")
    slack = raw.get("slack", 0.0)
    if isinstance(slack, bool) or not isinstance(slack, int | float) or not 0 <= slack < 1:
        raise PhaseError(
            f"{where}.slack: must be a relative tolerance in [0, 1) (0.04 = 4%), got {slack!r}"
        )
    return Budget(tuple(float(r) for r in rungs), prune, float(slack), where)


def _selects(raw: Any, path: Path) -> tuple[str, ...]:
    selects = tuple(raw or ())
    keys = valid_keys()
    for key in selects:
        if key not in keys:
            raise PhaseError(f"{path}: selects {key!r}, which is not a params.yaml key")
    return selects


def _check_experiment(
    where: str, name: Any, params: Any, selects: tuple[str, ...], repeats: int
) -> None:
    """One experiment: a plain name, and valid params that are exactly what the phase selects
    (plus nothing `repeats` sets itself)."""
    if not EXPERIMENT_KEY.match(str(name)):
        raise PhaseError(f"{where}: names use a-z, 0-9 and '-' (they become Git ref names)")
    if not isinstance(params, dict):
        raise PhaseError(f"{where}: expected a mapping of params.yaml keys to values")
    keys = valid_keys()
    for key in params:
        if key not in keys:
            raise PhaseError(f"{where}: {key!r} is not a params.yaml key")
    for key in selects:
        if key not in params:
            raise PhaseError(f"{where}: does not set {key!r}, which this phase selects")
    if repeats > 1 and REPEAT_SEED_KEY in params:
        raise PhaseError(
            f"{where}: sets {REPEAT_SEED_KEY!r}, which `repeats: {repeats}` sets for each run "
            f"(0 .. {repeats - 1}); drop it here or drop repeats"
        )
    for key in params:
        if key not in selects:
            raise PhaseError(
                f"{where}: sets {key!r}, which this phase does not select, so promote would "
                f"never write it to params.yaml; add it to selects, or pass it to every "
                f"experiment with `--set {key}=...`"
            )
    try:
        from_dict(apply_overrides({}, params))
    except ConfigError as err:
        raise PhaseError(f"{where}: {err}") from None


def all_phases(phases_dir: Path = PHASES_DIR) -> list[PhaseSpec]:
    """Every phase file, in id order."""
    ids = sorted(
        (p.stem.removeprefix("phase").replace("_", ".") for p in phases_dir.glob("phase*.yaml")),
        key=lambda i: tuple(int(x) for x in i.split(".")),
    )
    return [load_phase(i, phases_dir) for i in ids]
