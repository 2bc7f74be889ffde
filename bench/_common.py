"""Shared helpers of the benchmarks: paths, statistics, figures, subprocesses, temp projects."""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

VENV_BIN = Path(sys.executable).parent
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
    """Median, min and max of repeated measurements."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.lo,
            "max": self.hi,
            "n": len(self.values),
            "values": self.values,
        }


@dataclass
class Figure:
    """One row of the table: a measured figure, its spread and (optionally) its target."""

    bench: str
    name: str
    stats: Stats | None
    unit: str
    target: str = ""
    ok: bool | None = None  # None: no target (informational)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "name": self.name,
            "unit": self.unit,
            "target": self.target,
            "ok": self.ok,
            "note": self.note,
            **(self.stats.as_dict() if self.stats else {}),
        }


@dataclass
class Result:
    """What one benchmark returns: table rows plus free-form details for results.json."""

    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Figure:
        figure = Figure(*args, **kwargs)
        self.figures.append(figure)
        return figure


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


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Subprocess env: aeselect's dvc environment plus the bench's own Git identity."""
    from aeselect.dvc import dvc_env

    return dvc_env({**GIT_IDENTITY, **(extra or {})})


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
        tail = (err.stdout or b"")[-3000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise BenchError(
            f"`{' '.join(args)}` timed out after {timeout:.0f} s in {cwd}:\n{tail}"
        ) from None
    wall = time.perf_counter() - start
    if check and result.returncode != 0:
        raise BenchError(
            f"`{' '.join(args)}` failed (exit {result.returncode}) in {cwd}:\n"
            f"{result.stdout[-3000:]}"
        )
    return wall, result


def dvc(*args: str) -> list[str]:
    beside = VENV_BIN / "dvc"
    return [str(beside) if beside.exists() else (shutil.which("dvc") or "dvc"), *args]


def _load_conftest():
    """tests/conftest.py as a module: its make_project and TINY are the project's one definition."""
    path = ROOT / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_aeselect_tests_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_params() -> dict[str, Any]:
    return dict(_load_conftest().TINY)


def make_project(directory: Path, params: dict[str, Any]) -> tuple[Path, str]:
    """A committed Git+DVC copy of this project, built by tests/conftest.py's make_project.

    Returns (directory, which implementation built it). The Git identity comes from the env.
    """
    for key, value in GIT_IDENTITY.items():
        os.environ.setdefault(key, value)
    os.environ["DVC_NO_ANALYTICS"] = "1"
    return _load_conftest().make_project(directory, params), "tests/conftest.py:make_project"


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

        cfg = demo_config()
        out = workdir / "demo_prepared"
        start = time.perf_counter()
        prepare(cfg, out)
        log(f"prepared the demo dataset in {time.perf_counter() - start:.1f} s ({out})")
        _PREPARED["data"] = PreparedData.load(out)
    return _PREPARED["data"]
