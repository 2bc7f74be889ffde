"""The DVC stages as thin entries over library code: each takes the validated config and delegates.

dvc.yaml runs `python -m aeselect.stages <stage>`, not the `aeselect` CLI, whose parser imports
the phase and demo code: a stage's code is this module's top-level imports plus what its own
`run_<stage>` imports, which is what dvc.yaml's deps must list (tests/test_dvc_deps.py checks it).
Imports happen inside each entry so a stage loads only what it uses (prepare needs no dvclive).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from aeselect.config import PARAMS_FILE, Config, ConfigError, load_config
from aeselect.paths import INPUT_DIR

STAGES = ("prepare", "train", "evaluate", "probe")


def open_live(directory: Path, resume: bool = False):
    """dvclive as a stage output: no dvc.yaml rewriting, no experiment saving of its own."""
    from dvclive import Live

    return Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None, resume=resume)


def check_inputs_tracked(cfg: Config) -> None:
    """A folder source must lie inside INPUT_DIR: DVC would not notice changes anywhere else."""
    if cfg.data.source != "folder":
        return
    for key, folder in (("data.root", cfg.data.root), ("data.mask_root", cfg.data.mask_root)):
        if not Path(folder).resolve().is_relative_to(INPUT_DIR.resolve()):
            raise ConfigError(
                f"{key}: {folder} is outside {INPUT_DIR}, the folder the prepare stage depends "
                f"on in dvc.yaml, so DVC would not re-run prepare when its files change; copy "
                f"the files to a folder under {INPUT_DIR} (then `dvc add` it) and point {key} there"
            )


def run_prepare(cfg: Config) -> None:
    from aeselect.data.prepare import prepare
    from aeselect.paths import PREPARED_DIR

    check_inputs_tracked(cfg)
    summary = prepare(cfg, PREPARED_DIR)
    print(f"[prepare] {summary}", file=sys.stderr)


def run_train(cfg: Config) -> None:
    """One training process: the only one, or one rank under torchrun (see
    aeselect.training.distributed), where rank 0 alone touches the outputs and the snapshot."""
    from aeselect.data.dataset import PreparedData
    from aeselect.envvars import PREEMPTED_EXIT_CODE, RUNG_EXIT_CODE
    from aeselect.paths import MODELS_DIR, PREPARED_DIR, TRAIN_LIVE_DIR
    from aeselect.training import distributed, resume
    from aeselect.training.loop import train
    from aeselect.training.rungs import PausedAtRung, rung_plan

    rank = distributed.this_rank()
    distributed.pin_cpu_rank(rank)
    data = PreparedData.load(PREPARED_DIR)
    snapshot = resume.snapshot_dir(cfg, PREPARED_DIR)
    rungs = rung_plan(cfg, snapshot)
    with distributed.process_group(rank):
        if rank.is_main:
            state = resume.restore_snapshot(snapshot, [MODELS_DIR, TRAIN_LIVE_DIR])
            live = open_live(TRAIN_LIVE_DIR, resume=state is not None)
        else:
            state, live = resume.load_snapshot_state(snapshot), contextlib.nullcontext()
        try:
            with live as main_live:
                result = train(
                    cfg,
                    data,
                    MODELS_DIR,
                    main_live,
                    resume_state=state,
                    snapshot=snapshot,
                    rungs=rungs,
                )
        except resume.Preempted as stopped:
            if rank.is_main:
                print(f"[train] {stopped}", file=sys.stderr)
            sys.exit(RUNG_EXIT_CODE if isinstance(stopped, PausedAtRung) else PREEMPTED_EXIT_CODE)
    if rank.is_main:
        resume.discard_snapshot(snapshot)
        print(f"[train] {json.dumps(result.__dict__)}", file=sys.stderr)


def run_evaluate(cfg: Config) -> None:
    from aeselect.data.dataset import PreparedData
    from aeselect.evaluation.evaluate import evaluate
    from aeselect.handoff import export_autoencoder
    from aeselect.paths import BEST_CHECKPOINT, EVALUATE_LIVE_DIR, EXPORT_PATH, PREPARED_DIR

    data = PreparedData.load(PREPARED_DIR)
    with open_live(EVALUATE_LIVE_DIR) as live:
        summary = evaluate(cfg, data, BEST_CHECKPOINT, live)
    # The Phase 2 artifact: weights with the scale factor measured on these same val latents.
    export_autoencoder(BEST_CHECKPOINT, summary["latent"]["scale_factor"], EXPORT_PATH)
    headline = {key: summary[key] for key in ("mse", "psnr", "psnr_pooled", "ssim", "edge_f1")}
    print(f"[evaluate] latent {summary['latent']['shape']} {json.dumps(headline)}", file=sys.stderr)


def run_probe(cfg: Config) -> None:
    from aeselect.data.dataset import PreparedData
    from aeselect.handoff import load_autoencoder
    from aeselect.paths import EXPORT_PATH, PREPARED_DIR, PROBE_LIVE_DIR
    from aeselect.probe.diffusability import run_probe as probe

    data = PreparedData.load(PREPARED_DIR)
    with open_live(PROBE_LIVE_DIR) as live:
        summary = probe(cfg.probe, data, load_autoencoder(EXPORT_PATH), live)
    print(f"[probe] {json.dumps(summary)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m aeselect.stages <stage> [--params FILE]`; a config error exits 2, no traceback."""
    parser = argparse.ArgumentParser(prog="python -m aeselect.stages", description=__doc__)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        cfg = load_config(args.params)  # validated once, before any rank starts
        if args.stage == "train":
            return train_entry(cfg, args.params)
        globals()[f"run_{args.stage}"](cfg)
    except ConfigError as err:
        print(f"aeselect: config error: {err}", file=sys.stderr)
        return 2
    finally:
        # Where an experiment's time goes, in its log (bench/slots.py reads it): the stage's
        # wall, imports included. A torchrun launcher speaks for its ranks.
        if "LOCAL_RANK" not in os.environ:
            elapsed = time.monotonic() - started
            print(f"[{args.stage}] stage process: {elapsed:.2f} s", file=sys.stderr)
    return 0


def train_entry(cfg: Config, params: str) -> int:
    """Asked for several processes (AESELECT_NPROC_PER_NODE), this process becomes their torchrun
    launcher and each rank runs this same command; alone, it trains."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from aeselect.training import distributed

    if distributed.must_launch():
        return distributed.launch(cfg, ["train", "--params", params])
    record(run_train)(cfg)  # a rank's error reaches torchrun's failure report
    return 0


if __name__ == "__main__":
    sys.exit(main())
