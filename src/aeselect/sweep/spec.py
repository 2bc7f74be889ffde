"""Phase files (`phases/phase1_*.yaml`) as validated data: what a sweep runs and how it decides.

A user changes a sweep by editing these files, never code; every mistake is reported with the
file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aeselect.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    read_yaml,
    unknown_key,
    valid_keys,
)
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
PHASE_KEYS = (*REQUIRED_PHASE_KEYS, "repeats")
DECIDE_KEYS = ("metric", "direction", "tolerance", "tie_breakers")
CRITERION_KEYS = ("metric", "param", "direction")


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
class DecisionRule:
    primary: Criterion
    tolerance: float
    tie_breakers: tuple[Criterion, ...]


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
    return DecisionRule(
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
