"""Loss terms, divergence errors, the LR schedule, batch order and GPU claims."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY

from aeselect.config import apply_overrides, from_dict
from aeselect.data.dataset import PreparedData, StepBatchSampler
from aeselect.data.prepare import prepare
from aeselect.envvars import GPU_LOCK_DIR_ENV
from aeselect.model import AutoencoderOutput
from aeselect.model.autoencoder import BlockPCA
from aeselect.model.checkpoint import load_checkpoint
from aeselect.paths import LAST_CHECKPOINT
from aeselect.runtime import select_runtime
from aeselect.stages import open_live
from aeselect.training.loop import (
    NonFiniteLossError,
    _raise_if_nonfinite,
    build_run,
    lr_at,
    train,
)
from aeselect.training.loss import compute_loss
from aeselect.training.resume import TrainState


def output(recon, mean=None, logvar=None, classes=3):
    n, _, h, w = recon.shape
    logits = torch.zeros(n, classes, h, w)
    return AutoencoderOutput(recon, torch.zeros(n, 4, 2, 2), logits, mean, logvar)


def test_loss_is_the_weighted_sum_of_its_terms():
    images = torch.full((2, 3, 4, 4), 0.5)
    recon = images + 0.1
    targets = torch.zeros(2, 4, 4, dtype=torch.long)
    weights = from_dict({"loss": {"mse_weight": 2.0, "l1_weight": 3.0, "aux_weight": 0.5}}).loss
    total, terms = compute_loss(output(recon), images, targets, weights)
    assert terms["mse"].item() == pytest.approx(0.01, rel=1e-5)
    assert terms["l1"].item() == pytest.approx(0.1, rel=1e-5)
    assert terms["aux_ce"].item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-5)
    assert "kl" not in terms
    assert total.item() == pytest.approx(
        2 * 0.01 + 3 * 0.1 + 0.5 * terms["aux_ce"].item(), rel=1e-5
    )


def test_kl_term_only_for_a_variational_model():
    images = torch.zeros(1, 3, 4, 4)
    targets = torch.zeros(1, 4, 4, dtype=torch.long)
    mean, logvar = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    weights = from_dict({"model": {"variational": True}, "loss": {"kl_weight": 0.5}}).loss
    total, terms = compute_loss(output(images, mean, logvar), images, targets, weights)
    assert terms["kl"].item() == pytest.approx(0.5)  # 0.5 * mean^2 per element
    assert total.item() == pytest.approx(0.5 * 0.5 + 0.1 * terms["aux_ce"].item(), rel=1e-5)


def test_non_finite_loss_names_the_step_and_every_term():
    window = [
        {"mse": torch.tensor(0.1), "total": torch.tensor(0.2)},
        {"mse": torch.tensor(float("nan")), "total": torch.tensor(float("nan"))},
    ]
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 41: mse=nan, total=nan"):
        _raise_if_nonfinite(window, first_step=40)
    _raise_if_nonfinite(window[:1], first_step=40)


def test_lr_warms_up_then_decays_to_its_floor():
    cfg = from_dict(
        {"train": {"lr": 1.0, "warmup_steps": 10, "max_steps": 110, "min_lr_fraction": 0.1}}
    )
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_batches_are_a_function_of_seed_and_step():
    full = list(StepBatchSampler(10, 3, seed=5, start_step=0, max_steps=8))
    resumed = list(StepBatchSampler(10, 3, seed=5, start_step=5, max_steps=8))
    assert resumed == full[5:]
    assert list(StepBatchSampler(10, 3, seed=6, start_step=0, max_steps=8)) != full
    for epoch in (full[0:3], full[3:6]):  # 3 full batches per epoch, no repeats inside one
        flat = [i for batch in epoch for i in batch]
        assert len(set(flat)) == 9
    with pytest.raises(ValueError, match=r"train\.batch_size=11 is larger than the 10 training"):
        StepBatchSampler(10, 11, seed=0, start_step=0, max_steps=1)


CLAIM = """
import os, sys, time
from aeselect.gpu import claim_gpu
print(claim_gpu(), os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
sys.stdin.readline()
"""


def claim(**kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLAIM],
        env=os.environ.copy(),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def test_parallel_experiments_claim_different_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setenv(GPU_LOCK_DIR_ENV, str(tmp_path))
    holders = [claim(), claim()]
    claimed = [h.stdout.readline().split() for h in holders]
    assert sorted(c[0] for c in claimed) == ["3", "5"]
    assert all(c[0] == c[1] for c in claimed)  # each sees only its own GPU
    _, err = claim().communicate("\n")
    assert "all GPUs in CUDA_VISIBLE_DEVICES=3,5 are claimed" in err
    for holder in holders:
        holder.communicate("\n")
    out, _ = claim().communicate("\n")
    assert out.split()[0] == "3"  # locks die with their processes


@pytest.fixture
def one_thread():
    """Train on one thread (several threads crawl on a busy 2-core machine); restored after."""
    threads = torch.get_num_threads()
    yield {"train.num_threads": 1, "train.device": "cpu"}
    torch.set_num_threads(threads)


def test_images_per_s_of_a_resumed_run_counts_every_step(tmp_path, one_thread):
    """train_time_s sums the time of every segment, so images_per_s must count all their steps."""
    cfg = from_dict(apply_overrides({}, TINY | one_thread | {"train.max_steps": 3}))
    prepare(cfg, tmp_path / "prepared")
    data = PreparedData.load(tmp_path / "prepared")
    with open_live(tmp_path / "live") as live:
        first = train(cfg, data, tmp_path / "models", live)
    last = load_checkpoint(tmp_path / "models" / LAST_CHECKPOINT.name)
    earlier_seconds = 1000.0  # as if the first segment had run on a slow node
    state = TrainState(
        last["step"], last["best_val_mse"], last["best_step"], [1.0] * 3, [first.best_val_mse]
    )
    state.train_seconds = earlier_seconds
    run = build_run(cfg, data, select_runtime(cfg.train))
    run.model.load_state_dict(last["model"])
    run.optimizer.load_state_dict(last["optimizer"])
    resumed = from_dict(apply_overrides(cfg.to_dict(), {"train.max_steps": 6}))
    snapshot = state.snapshot(run.model, run.optimizer)
    with open_live(tmp_path / "live", resume=True) as live:
        result = train(resumed, data, tmp_path / "models", live, resume_state=snapshot)
    assert result.train_time_s > earlier_seconds
    assert result.images_per_s == pytest.approx(6 * TINY["train.batch_size"] / result.train_time_s)


def test_a_new_model_starts_at_the_block_pca_of_the_training_images_only(tmp_path, one_thread):
    cfg = from_dict(apply_overrides({}, TINY | one_thread | {"model.pca_shortcut": True}))
    prepare(cfg, tmp_path / "prepared")
    data = PreparedData.load(tmp_path / "prepared")
    model = build_run(cfg, data, select_runtime(cfg.train)).model

    def fitted_to(split_rows):
        images = torch.from_numpy(data.images[split_rows]).permute(0, 3, 1, 2).float() / 255
        code = BlockPCA(2**cfg.model.downsampling_steps, cfg.model.latent_channels)
        code.fit([images * 2 - 1])
        return code.to_latent.weight

    train_rows = data.split_indices("train")
    every_row = sorted([*train_rows, *data.split_indices("val")])
    assert torch.allclose(model.shortcut.to_latent.weight, fitted_to(train_rows), atol=1e-6)
    assert not torch.allclose(model.shortcut.to_latent.weight, fitted_to(every_row), atol=1e-3)
    for conv in (model.encoder.conv_out, model.decoder.conv_out):
        assert torch.count_nonzero(conv.weight) == 0


def test_the_main_rank_alone_and_always_writes_to_a_live(tmp_path, one_thread):
    cfg = from_dict(apply_overrides({}, TINY | one_thread))
    prepare(cfg, tmp_path / "prepared")
    data = PreparedData.load(tmp_path / "prepared")
    with pytest.raises(ValueError, match="rank 0: the main rank alone, and always"):
        train(cfg, data, tmp_path / "models", None)
