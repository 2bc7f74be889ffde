"""aeselect performance benchmarks: `make bench` (= .venv/bin/python bench/run.py).

Prints a table and writes bench/results.json. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, Figure, log

BENCHMARKS = {
    "matmul": "1. matmul peak and the training step's achieved FLOP/s",
    "train": "2. train() stage vs a bare loop of the same steps",
    "loader": "3. data loader vs the training step's consumption",
    "dvc": "4. DVC overhead per experiment vs its empty-stage floor",
    "queue": "5. 4 queued tiny experiments, -j 1 vs -j 2",
    "throughput": "6. evaluate and prepare throughput",
    "ddp": "7. train stage: 1 process vs N DDP processes (torchrun)",
    "history": "8. phase status and compare at 1,000 commits and 50 experiments, old vs new",
}
RESULTS = Path(__file__).resolve().parent / "results.json"


def runner(name: str):
    import compute
    import history
    import pipeline

    module = {"dvc": pipeline, "queue": pipeline, "history": history}.get(name, compute)
    return getattr(module, f"bench_{name}")


def machine() -> dict:
    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), ""
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "cpu": cpu,
        **({"gpu": torch.cuda.get_device_name(0)} if torch.cuda.is_available() else {}),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def fmt(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(figures: list[Figure]) -> str:
    rows = [("benchmark", "figure", "median", "min", "max", "unit", "target", "")]
    for f in figures:
        if f.stats is None:
            rows.append((f.bench, f.name, "-", "", "", f.unit, f.target, f"skipped: {f.note}"))
            continue
        verdict = "" if f.ok is None else ("OK" if f.ok else "MISS")
        values = f.stats.values
        numbers = (fmt(v) for v in (f.stats.median, min(values), max(values)))
        rows.append((f.bench, f.name, *numbers, f.unit, f.target, verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [
            c.rjust(w) if 2 <= j <= 4 else c.ljust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_all(names: list[str], workdir: Path, quick: bool) -> tuple[list[Figure], dict, list]:
    """Each benchmark in turn; a failing one is reported and the others still run."""
    figures: list[Figure] = []
    reports: dict = {}
    failed = []
    for name in names:
        log(f"{BENCHMARKS[name]} ...")
        start = time.perf_counter()
        try:
            result = runner(name)(workdir, quick)
        except Exception as err:  # report, keep going with the other benchmarks
            traceback.print_exc()
            failed.append(name)
            reports[name] = {"error": f"{type(err).__name__}: {err}"}
            figures.append(Figure(name, "FAILED", None, "", note=str(err).splitlines()[0]))
            continue
        seconds = time.perf_counter() - start
        log(f"{name} done in {seconds:.0f} s")
        figures += result.figures
        reports[name] = {
            "seconds": seconds,
            "figures": [f.as_dict() for f in result.figures],
            "details": result.details,
        }
    return figures, reports, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke test")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp work dir")
    parser.add_argument("--output", type=Path, default=RESULTS, help="results JSON path")
    args = parser.parse_args(argv)

    os.environ["DVC_NO_ANALYTICS"] = "1"
    # SIGTERM (e.g. a timeout) exits through the finally below, which deletes the work dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="aeselect-bench-"))
    previous_cwd = Path.cwd()
    os.chdir(workdir)  # dvclive and the stages write relative paths; keep them out of the repo
    started = time.perf_counter()
    report = {"mode": "quick" if args.quick else "default", "machine": machine()}
    report["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        figures, report["benchmarks"], failed = run_all(
            args.only or list(BENCHMARKS), workdir, args.quick
        )
    finally:
        os.chdir(previous_cwd)
        if args.keep:
            log(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["total_seconds"] = time.perf_counter() - started
    report["table"] = table(figures)
    print(report["table"])
    print(f"\ntotal {report['total_seconds']:.0f} s; results in {args.output}")
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
