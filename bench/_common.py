"""Shared helpers of the benchmarks: statistics, figures, timing, subprocesses, demo data."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from aeselect.dvc import dvc_env, dvc_executable  # noqa: E402  (after the path set-up)

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "aeselect bench",
    "GIT_AUTHOR_EMAIL": "bench@aeselect.invalid",
    "GIT_COMMITTER_NAME": "aeselect bench",
    "GIT_COMMITTER_EMAIL": "bench@aeselect.invalid",
}


class BenchError(RuntimeError):
    """A benchmark could not measure what it should; the message says what failed and where."""


@dataclass
class Stats:
    """Repeated measurements: the table shows their median, min and max."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict[str, Any]:
        values = self.values
        return {"median": self.median, "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class Figure:
    """One row of the table: a measured figure, its spread and (optionally) its target."""

    bench: str
    name: str
    stats: Stats | None  # None: skipped, `note` says why
    unit: str
    target: str = ""
    ok: bool | None = None  # None: no target (informational)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.__dict__.items() if k != "stats"}
        if self.stats is None:
            return fields
        return fields | self.stats.as_dict() | {"values": self.stats.values}


@dataclass
class Result:
    """What one benchmark returns: table rows plus free-form details for results.json."""

    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Figure:
        self.figures.append(Figure(*args, **kwargs))
        return self.figures[-1]


def ratio_stats(numerators: Sequence[float], denominators: Sequence[float]) -> Stats:
    """Per-pair ratios (pairs measured back to back), so machine drift cancels within a pair."""
    return Stats([a / b for a, b in zip(numerators, denominators, strict=True)])


def alternate(repeats: int, a: Callable[[], Any], b: Callable[[], Any]) -> tuple[list, list]:
    """Run a and b `repeats` times each, ABBA order (A B, B A, A B...), results in call order."""
    results_a, results_b = [], []
    for r in range(repeats):
        order = ((a, results_a), (b, results_b))
        for fn, sink in order if r % 2 == 0 else reversed(order):
            sink.append(fn())
    return results_a, results_b


def mean_seconds(fn: Callable[[], object], number: int) -> float:
    """Seconds per call, the mean of `number` calls after 2 warm-up calls, the accelerator
    synchronised (torch.utils.benchmark.Timer), on all of torch's threads (Timer's default is 1)."""
    import torch
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(number).mean


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Subprocess env: aeselect's dvc environment plus the bench's own Git identity."""
    return dvc_env({**GIT_IDENTITY, **(extra or {})})


def dvc(*args: str) -> list[str]:
    return [dvc_executable(), *args]


def run_cmd(
    args: Sequence[str],
    cwd: Path,
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> tuple[float, subprocess.CompletedProcess]:
    """Run with a timeout; returns (wall seconds, result). Failures raise with the output tail."""
    start = time.perf_counter()
    try:
        result = subprocess.run(
            list(args),
            cwd=cwd,
            env=env or tool_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        tail = err.stdout or b""  # bytes even with text=True
        tail = (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)[-3000:]
        message = f"`{' '.join(args)}` timed out after {timeout:.0f} s in {cwd}:\n{tail}"
        raise BenchError(message) from None
    wall = time.perf_counter() - start
    if check and result.returncode != 0:
        raise BenchError(
            f"`{' '.join(args)}` failed (exit {result.returncode}) in {cwd}:\n"
            f"{result.stdout[-3000:]}"
        )
    return wall, result


def make_project(directory: Path) -> Path:
    """A committed Git+DVC copy of this project at the tests' TINY params (aeselect.sandbox)."""
    from aeselect.sandbox import TINY, make_project

    for key, value in GIT_IDENTITY.items():
        os.environ.setdefault(key, value)
    os.environ["DVC_NO_ANALYTICS"] = "1"
    return make_project(directory, TINY)


def demo_config(overrides: dict[str, Any] | None = None):
    """The shipped params.yaml (demo scale), with dotted-key overrides."""
    from aeselect.config import apply_overrides, from_dict, read_yaml

    return from_dict(apply_overrides(read_yaml(ROOT / "params.yaml"), overrides or {}))


_PREPARED: dict[str, Any] = {}


def demo_data(workdir: Path):
    """The demo dataset prepared once per bench run (synthetic, demo params)."""
    if "data" not in _PREPARED:
        from aeselect.data.dataset import PreparedData
        from aeselect.data.prepare import prepare

        out = workdir / "demo_prepared"
        start = time.perf_counter()
        prepare(demo_config(), out)
        log(f"prepared the demo dataset in {time.perf_counter() - start:.1f} s ({out})")
        _PREPARED["data"] = PreparedData.load(out)
    return _PREPARED["data"]
