"""Run names: a phase run's attempts are `p1-1-lc8`, `p1-1-lc8_2`, ..."""

from __future__ import annotations

import re

from aeselect.sweep.spec import PhaseRun, PhaseSpec

# p1-1-lc8_2 is lc8's second run; experiment keys never contain "_" (spec.EXPERIMENT_KEY).
ATTEMPT_SEPARATOR = "_"
RUN_NAME = re.compile(r"^p[0-9]+-[0-9]+-[a-z0-9][a-z0-9-]*(_[0-9]+)?$")


def parse_run_name(spec: PhaseSpec, name: str) -> tuple[str, int, int] | None:
    """(experiment key, repeat, attempt) of one of the phase's run names (`p1-1-lc8_2`, with
    `repeats` `p1-1-lc8-s1_2`), None for any other name."""
    base, separator, attempt = name.partition(ATTEMPT_SEPARATOR)
    run = {run.name: run for run in spec.runs()}.get(base)
    if run is None:
        return None
    if not separator:
        return run.key, run.repeat, 1
    if not attempt.isdigit() or int(attempt) < 2:
        return None
    return run.key, run.repeat, int(attempt)


def file_order(spec: PhaseSpec, name: str) -> tuple[int, int]:
    """Where one of the phase's run names stands in the phase file (experiment, then seed),
    then its attempt: a phase lists its slowest experiment first so it trains beside the
    others, not alone at the end."""
    key, repeat, attempt = parse_run_name(spec, name)
    runs = [(run.key, run.repeat) for run in spec.runs()]
    return runs.index((key, repeat)), attempt


def run_name(run: PhaseRun, attempt: int) -> str:
    return run.name if attempt == 1 else f"{run.name}{ATTEMPT_SEPARATOR}{attempt}"
