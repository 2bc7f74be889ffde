"""The evaluate stage in-process, on a tiny model trained here: its precision and what it writes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, TINY
from torch.nn.modules.module import register_module_forward_hook

from aeselect.config import apply_overrides, flatten, from_dict, read_yaml
from aeselect.data.dataset import PreparedData
from aeselect.evaluation import evaluate as evaluate_stage
from aeselect.evaluation.gates import gate_bounds
from aeselect.paths import (
    BEST_CHECKPOINT,
    EVALUATE_LIVE_DIR,
    EVALUATE_METRICS,
    PREPARED_DIR,
    TRAIN_METRICS,
)
from aeselect.runtime import Runtime
from aeselect.stages import open_live, run_prepare, run_train

# What CUDA's training runtime is, on the CPU: bf16 autocast on.
BF16_RUNTIME = Runtime(torch.device("cpu"), bf16=True, channels_last=False, compile=False)


# Two steps are enough: evaluation needs a checkpoint, not a good one.
TWO_STEPS = {"train.max_steps": 2, "train.eval_every": 2, "train.log_every": 2}


def _evaluate(cfg) -> dict:
    with open_live(EVALUATE_LIVE_DIR) as live:
        return evaluate_stage.evaluate(cfg, PreparedData.load(PREPARED_DIR), BEST_CHECKPOINT, live)


def _without_timings(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key != "cost"}


def test_evaluation_is_fp32_and_writes_both_psnrs_and_every_gate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the stages read and write relative to the working directory
    cfg = from_dict(apply_overrides(read_yaml(ROOT / "params.yaml"), TINY | TWO_STEPS))
    run_prepare(cfg)
    run_train(cfg)
    fp32_summary = _evaluate(cfg)

    # The mean of per-image PSNRs is never below the PSNR of the mean MSE (Jensen).
    assert fp32_summary["psnr"] >= fp32_summary["psnr_pooled"] > 0
    written = json.loads(EVALUATE_METRICS.read_text())
    assert written["psnr_pooled"] == pytest.approx(fp32_summary["psnr_pooled"])
    # Each gate's metrics exist under the names the phase tables flatten both metrics files to.
    trained_metrics = json.loads(TRAIN_METRICS.read_text())
    flat = flatten(trained_metrics) | flatten(written)
    for gate, bounds in gate_bounds(cfg.evaluate).items():
        expected = all(bound.holds(flat[bound.metric]) for bound in bounds)
        assert written["gates"][f"pass_{gate}"] is expected

    # A runtime with bf16 autocast, as CUDA's, inside a caller's autocast: still plain fp32.
    monkeypatch.setattr(evaluate_stage, "select_runtime", lambda _: BF16_RUNTIME)
    calls: list[tuple[bool, torch.dtype]] = []

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            calls.append((torch.is_autocast_enabled("cpu"), output.dtype))

    hook = register_module_forward_hook(record)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            summary = _evaluate(cfg)
    finally:
        hook.remove()
    assert calls
    assert set(calls) == {(False, torch.float32)}
    # The same numbers as without autocast: metrics and scale factor are fp32's.
    assert _without_timings(summary) == _without_timings(fp32_summary)
