"""A phase's results table: one row per phase run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from aeselect.sweep.runs import load_phase_runs
from aeselect.sweep.spec import PhaseSpec
from aeselect.sweep.status import Status


def collect_results(repo: Path, spec: PhaseSpec, sweep: dict[str, Any]) -> pd.DataFrame:
    """One row per run of the phase (`spec.runs()`: `key`, `repeat`), from the fresh attempt
    that speaks for it: state, run name, rev, baseline, canonical params and flattened metrics.

    Failed runs keep their row (state Failed) without metrics, never the baseline's; a run
    whose attempts are all stale is Stale (`stale_on`: the commit its newest ran on), one with
    no attempt at all Missing.
    """
    view = load_phase_runs(repo, spec, sweep)
    rows = []
    for phase_run in spec.runs():
        run = view.current(phase_run)
        identity = {"key": phase_run.key, "repeat": phase_run.repeat}
        if run is None:
            stale = view.stale(phase_run)
            row = {"experiment": phase_run.name, **identity, "state": Status.MISSING.label}
            if stale:
                row |= {"state": Status.STALE.label, "stale_on": stale[-1].ran_on}
        else:
            row = {
                "experiment": run.name,
                **identity,
                "state": run.status.label,
                "rev": run.rev,
                "baseline": run.baseline,
                "timestamp": run.timestamp,
                "note": run.task.note if run.task is not None else "",
            }
            row |= {f"params.{k}": v for k, v in (run.params or {}).items()}
            if run.status == Status.SUCCESS:
                row |= {k: v for k, v in run.metrics.items() if k not in row}
        rows.append(row)
    return pd.DataFrame(rows)
