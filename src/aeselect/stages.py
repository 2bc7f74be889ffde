"""The DVC stages as thin entries over library code: each takes the validated config and delegates.

Imports happen inside each entry so a stage loads only what it uses (prepare needs no dvclive).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aeselect.config import Config


def open_live(directory: Path):
    """dvclive as a stage output: no dvc.yaml rewriting, no experiment saving of its own."""
    from dvclive import Live

    return Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None)


def run_prepare(cfg: Config) -> None:
    from aeselect.data.dataset import PREPARED_DIR
    from aeselect.data.prepare import prepare

    summary = prepare(cfg, PREPARED_DIR)
    print(f"[prepare] {summary}", file=sys.stderr)


def run_train(cfg: Config) -> None:
    from aeselect.data.dataset import PREPARED_DIR, PreparedData
    from aeselect.training.checkpoint import MODELS_DIR
    from aeselect.training.loop import TRAIN_LIVE_DIR, train

    data = PreparedData.load(PREPARED_DIR)
    with open_live(TRAIN_LIVE_DIR) as live:
        result = train(cfg, data, MODELS_DIR, live)
    print(f"[train] {json.dumps(result.__dict__)}", file=sys.stderr)


def run_evaluate(cfg: Config) -> None:
    from aeselect.data.dataset import PREPARED_DIR, PreparedData
    from aeselect.evaluation.evaluate import EVALUATE_LIVE_DIR, evaluate
    from aeselect.training.checkpoint import MODELS_DIR

    data = PreparedData.load(PREPARED_DIR)
    with open_live(EVALUATE_LIVE_DIR) as live:
        summary = evaluate(cfg, data, MODELS_DIR, live)
    headline = {key: summary[key] for key in ("mse", "psnr", "ssim", "edge_f1")}
    print(f"[evaluate] latent {summary['latent']['shape']} {json.dumps(headline)}", file=sys.stderr)
