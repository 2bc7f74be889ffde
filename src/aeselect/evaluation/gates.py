"""The success gates: which metric must stay on which side of which bound.

The bounds are params.yaml's `evaluate` section and nowhere else, and every bound is inclusive:
a value equal to its bound passes, a NaN fails. The evaluate stage writes one boolean per gate
(`gates.pass_*` in results/evaluate/metrics.json); the phase hand-off (final.yaml) reads those
booleans and prints the bounds with `Bound.__str__`, so nothing compares a second time.

Metric names are the flattened names of `dvc exp show` (evaluate's and train's metrics.json).
No torch here: the phase commands import this module.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from aeselect.config import EvaluateConfig

# The one comparison per kind of bound: its symbol and its operator, inclusive both ways.
_COMPARISONS = {"max": ("<=", operator.le), "min": (">=", operator.ge)}


@dataclass(frozen=True)
class Bound:
    metric: str
    kind: Literal["max", "min"]
    limit: float

    def holds(self, value: float) -> bool:
        """Inclusive; NaN compares False either way, so a NaN metric fails its gate."""
        return bool(_COMPARISONS[self.kind][1](value, self.limit))

    def __str__(self) -> str:
        return f"{self.metric} {_COMPARISONS[self.kind][0]} {self.limit:g}"


def gate_bounds(cfg: EvaluateConfig) -> dict[str, tuple[Bound, ...]]:
    """Gate name -> the bounds that must all hold for it to pass."""
    return {
        "mse": (Bound("mse", "max", cfg.max_mse),),
        "psnr": (Bound("psnr", "min", cfg.min_psnr),),
        "latent_size": (Bound("latent.compression_ratio", "min", cfg.min_compression_ratio),),
        "stability": (
            Bound("stability.nonfinite_count", "max", 0),
            Bound("stability.max_spike_ratio", "max", cfg.max_spike_ratio),
        ),
    }


def success_gates(metrics: Mapping[str, float], cfg: EvaluateConfig) -> dict[str, bool]:
    """{"pass_<gate>": ..., "pass_all": ...} for `metrics` keyed by the bounds' metric names."""
    gates = {
        f"pass_{name}": all(bound.holds(metrics[bound.metric]) for bound in bounds)
        for name, bounds in gate_bounds(cfg).items()
    }
    return {**gates, "pass_all": all(gates.values())}
