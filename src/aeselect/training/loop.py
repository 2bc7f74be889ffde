"""The training loop, readable top to bottom: data, model, optimiser, then one `for step` loop that
ends at `train.max_steps` or, on a stop request, at the next log boundary.

Host syncs happen only at log and eval intervals: per-step loss terms stay on the device and a
non-finite loss is found, with its exact step and terms, when the window is read. A run's objects
(config, data, runtime, rank, model, optimiser, outputs) travel together as one `Run`; what it
continues from is its `TrainState`, whose snapshot round trip (training.resume) is the preemption
snapshot that `resume_state` gives back.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from dvclive import Live
from tqdm import tqdm

from aeselect.config import Config
from aeselect.data.dataset import (
    CacheDataset,
    PreparedData,
    StepBatchSampler,
    make_loader,
    to_model_input,
)
from aeselect.model import Autoencoder
from aeselect.model.checkpoint import save_checkpoint
from aeselect.paths import BEST_CHECKPOINT, LAST_CHECKPOINT
from aeselect.runtime import Runtime, seed_everything, select_runtime, step_generator
from aeselect.scoring import metrics
from aeselect.scoring.images import reconstruction_grid
from aeselect.scoring.validation import val_batches
from aeselect.training import distributed
from aeselect.training.loss import compute_loss
from aeselect.training.resume import Preempted, Snapshot, StopRequest, TrainState, save_snapshot
from aeselect.training.rungs import PausedAtRung, RungPlan, write_rung_scores

SHORTCUT_SAMPLE = 512  # training images the block-PCA shortcut is fitted to (64px: all 256)


class NonFiniteLossError(RuntimeError):
    """Training diverged: the message gives the step and every loss term at that step."""


@dataclass
class Run:
    """One training run's objects, built once (`build_run`) and passed together.

    `model` owns the parameters and `forward` runs them (they differ when it is DDP-wrapped or
    compiled). `live` and `models_dir` are the main rank's outputs: None on the other ranks, and
    where no outputs are written (the bench's bare steps)."""

    cfg: Config
    data: PreparedData
    runtime: Runtime
    rank: distributed.Rank
    model: Autoencoder
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    live: Live | None = None
    models_dir: Path | None = None


@dataclass
class TrainResult:
    best_val_mse: float
    best_step: int
    train_time_s: float
    images_per_s: float


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to `min_lr_fraction` of the peak at `max_steps`."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_fraction + (1.0 - t.min_lr_fraction) * cosine)


@torch.no_grad()
def validate(run: Run) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Val-set MSE, PSNR, KLD and auxiliary scores, plus the first images for a grid."""
    data, runtime = run.data, run.runtime
    num_samples = run.cfg.evaluate.num_sample_images
    run.forward.eval()
    aux = metrics.AuxScore(data.aux_classes, data.aux_task, runtime.device)
    sums: dict[str, float] = {}
    count = 0
    samples: list[torch.Tensor] = []
    recon_samples: list[torch.Tensor] = []
    for images, targets, out, reconstruction in val_batches(
        run.forward, data, run.cfg.evaluate.batch_size, runtime
    ):
        aux.update(out.aux_logits, targets)
        batch = {
            "mse": metrics.per_image_mse(images, reconstruction).sum().item(),
            "psnr": metrics.per_image_psnr(images, reconstruction).sum().item(),
        }
        if out.posterior is not None:
            batch["kld"] = out.posterior.kl().sum().item()
        for key, value in batch.items():
            sums[key] = sums.get(key, 0.0) + value
        count += len(images)
        if sum(len(s) for s in samples) < num_samples:
            samples.append(images.cpu())
            recon_samples.append(reconstruction.cpu())
    run.forward.train()
    return (
        {key: value / count for key, value in sums.items()} | aux.compute(),
        torch.cat(samples)[:num_samples],
        torch.cat(recon_samples)[:num_samples],
    )


def _raise_if_nonfinite(window: list[dict[str, torch.Tensor]], first_step: int) -> None:
    totals = torch.stack([terms["total"] for terms in window])
    bad = (~torch.isfinite(totals)).nonzero()
    if len(bad):
        offset = int(bad[0])
        terms = {name: float(value) for name, value in window[offset].items()}
        raise NonFiniteLossError(
            f"non-finite loss at step {first_step + offset}: "
            + ", ".join(f"{name}={value:.6g}" for name, value in terms.items())
            + "; lower train.lr or raise train.grad_clip protection (train.grad_clip > 0)"
        )


def build_run(
    cfg: Config,
    data: PreparedData,
    runtime: Runtime,
    live: Live | None = None,
    models_dir: Path | None = None,
) -> Run:
    """The run with its model (the shortcut fitted to the training images, where it has one) on
    its device and layout, the (DDP-wrapped, optionally compiled) forward, and AdamW."""
    model = Autoencoder(cfg.model, data.aux_classes)
    if cfg.model.pca_shortcut:
        model.fit_shortcut(shortcut_sample(data))
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    trained = distributed.wrap(model, runtime.device)
    forward = torch.compile(trained) if runtime.compile else trained
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        betas=(0.9, 0.99),
        weight_decay=cfg.train.weight_decay,
        fused=runtime.device.type == "cuda",
    )
    rank = distributed.this_rank()
    return Run(cfg, data, runtime, rank, model, forward, optimizer, live, models_dir)


def shortcut_sample(data: PreparedData) -> Iterator[torch.Tensor]:
    """Batches in [0, 1] of up to SHORTCUT_SAMPLE training images, evenly spaced over the split
    (a folder's files are in path order): what the block PCA is fitted to. Never val images."""
    train_rows = data.split_indices("train")
    rows = train_rows[:: max(1, len(train_rows) // SHORTCUT_SAMPLE)][:SHORTCUT_SAMPLE]
    cpu = torch.device("cpu")
    for raw_images, raw_targets in make_loader(
        CacheDataset(data.images, data.targets, rows), batch_size=32
    ):
        yield to_model_input(raw_images, raw_targets, cpu)[0]


def train_step(
    run: Run, images: torch.Tensor, targets: torch.Tensor, step: int
) -> dict[str, torch.Tensor]:
    """One optimisation step at `step` (lr schedule, forward, loss, backward, clipping, AdamW);
    returns the loss terms, still on the device."""
    cfg, runtime = run.cfg, run.runtime
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    with runtime.autocast():
        out = run.forward(
            images,
            generator=step_generator(cfg.train.seed, step, runtime.device),
            rows=distributed.batch_rows(len(images)),
        )
    loss, terms = compute_loss(out, images, targets, cfg.loss)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
    run.optimizer.step()
    return terms


def train(
    cfg: Config,
    data: PreparedData,
    models_dir: Path,
    live: Live | None,
    *,
    resume_state: Snapshot | None = None,
    snapshot: Path | None = None,
    rungs: RungPlan | None = None,
) -> TrainResult:
    """Train from scratch, or from the snapshot `resume_state`; with `snapshot` (its directory)
    set, SIGUSR1/SIGTERM stop the run at the next log boundary with a resume snapshot there
    (raises Preempted), and so does each step of `rungs` after its val scores (PausedAtRung).

    Under torchrun every rank calls this; the main rank (rank 0) alone gets `live` and writes.
    """
    rank = distributed.this_rank()
    if (live is not None) != rank.is_main:
        raise ValueError(f"rank {rank.rank}: the main rank alone, and always, writes to a Live")
    runtime = select_runtime(cfg.train)
    seed_everything(cfg.train.seed)
    print(f"[train] device {runtime.describe()}, bf16={runtime.bf16}", file=sys.stderr)
    run = build_run(cfg, data, runtime, live, models_dir)
    state = _start_state(run, resume_state, snapshot)
    stop = StopRequest(announce=rank.is_main) if snapshot is not None else None
    loader = train_loader(cfg, data, state.step, runtime)
    quiet = not (rank.is_main and sys.stderr.isatty())  # no progress bar in logs
    progress = tqdm(total=cfg.train.max_steps, initial=state.step, disable=quiet)
    window: list[dict[str, torch.Tensor]] = []
    stopping = at_rung = False
    run.model.train()
    tick = time.perf_counter()
    for step, (images, targets) in enumerate(loader, start=state.step):
        images, targets = to_model_input(images, targets, runtime.device, runtime.channels_last)
        window.append(train_step(run, images, targets, step))
        progress.update(1)
        state.step = done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            _log_window(run, state, distributed.mean_over_ranks(window), progress)
            window = []
            # Every rank stops at the same boundary when any one of them was signalled.
            stopping = stop is not None and distributed.any_rank(
                stop.requested is not None, runtime.device
            )
        if rank.is_main and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
            state.train_seconds += time.perf_counter() - tick
            val = _validate_and_log(run, state)
            _save_checkpoints(run, state, val["mse"])
            tick = time.perf_counter()
        at_rung = rungs is not None and done in rungs.steps  # every rank knows the rungs
        if stopping or at_rung:
            state.train_seconds += time.perf_counter() - tick
            break
    progress.close()
    if at_rung:
        _pause_at_rung(run, state, snapshot, rungs.scores_path(state.step), rank.is_main)
    if stopping:
        _stop_with_snapshot(run, state, snapshot, stop.reason)
    return _finish(run, state)


def _pause_at_rung(
    run: Run, state: TrainState, snapshot: Path, scores: Path, is_main: bool
) -> None:
    """Score the val set per image on the rung's weights, then stop with the resume snapshot."""
    if is_main:
        write_rung_scores(run.forward, run.data, run.cfg, run.runtime, scores)
    _stop_with_snapshot(run, state, snapshot, f"at rung step {state.step}", PausedAtRung)


def _start_state(run: Run, resume_state: Snapshot | None, snapshot: Path | None) -> TrainState:
    """A fresh run's state, or the resumed one's with the model and optimiser restored."""
    if resume_state is None:
        return TrainState()
    state = TrainState.resume(resume_state, run.model, run.optimizer)
    print(f"[train] resumed at step {state.step} from {snapshot}", file=sys.stderr)
    return state


def train_loader(cfg: Config, data: PreparedData, start_step: int, runtime: Runtime):
    """The batches of steps start_step .. max_steps - 1, this rank's share of each."""
    sampler = StepBatchSampler(
        len(data.dataset("train")),
        cfg.train.batch_size,
        cfg.train.seed,
        start_step,
        cfg.train.max_steps,
    )
    return make_loader(
        data.dataset("train"),
        batch_sampler=distributed.shard(sampler),
        num_workers=cfg.train.num_workers,
        pin_memory=runtime.device.type == "cuda",
    )


def _log_window(
    run: Run, state: TrainState, window: list[dict[str, torch.Tensor]], progress: tqdm
) -> None:
    """The window's loss terms (averaged over ranks): checked, kept, logged as means."""
    done = state.step
    _raise_if_nonfinite(window, done - len(window))
    state.loss_history += torch.stack([t["total"] for t in window]).tolist()
    if run.rank.is_main:
        run.live.step = done
        for name in window[0]:
            value = torch.stack([t[name] for t in window]).mean().item()
            run.live.log_metric(f"loss/{name}", value)
        run.live.log_metric("lr", lr_at(done - 1, run.cfg))
    progress.set_postfix(loss=f"{float(window[-1]['total']):.4f}")


def _validate_and_log(run: Run, state: TrainState) -> dict[str, float]:
    """Score the val set, log the scores and a reconstruction grid at the current step."""
    done = state.step
    val, originals, reconstructions = validate(run)
    state.val_history.append(val["mse"])
    run.live.step = done
    for name, value in val.items():
        run.live.log_metric(f"val/{name}", value)
    run.live.log_image(
        f"val_reconstructions/step_{done:06d}.png",
        reconstruction_grid(originals, reconstructions, with_error=False),
    )
    return val


def _save_checkpoints(run: Run, state: TrainState, val_mse: float) -> None:
    """last.pt at every evaluation, best.pt when the val MSE is the lowest so far."""
    checkpoint = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "step": state.step,
        "val_mse": val_mse,
        "config": run.cfg.trained_dict(),
        "aux_task": run.data.aux_task,
        "aux_classes": run.data.aux_classes,
    }
    if val_mse < state.best_val_mse:
        state.best_val_mse, state.best_step = val_mse, state.step
        save_checkpoint(run.models_dir / BEST_CHECKPOINT.name, **checkpoint)
    best = {"best_val_mse": state.best_val_mse, "best_step": state.best_step}
    save_checkpoint(run.models_dir / LAST_CHECKPOINT.name, **checkpoint, **best)


def _stop_with_snapshot(
    run: Run, state: TrainState, directory: Path, why: str, raised: type[Preempted] = Preempted
) -> None:
    """The main rank saves the resume snapshot (state, weights, optimiser, and copies of its
    outputs) in `directory`; all ranks raise `raised` once it is complete."""
    if run.rank.is_main:
        run.live.make_summary()
        outputs = [run.models_dir, Path(run.live.dir)]
        save_snapshot(directory, state.snapshot(run.model, run.optimizer), outputs)
    distributed.barrier()  # the others exit only once the main rank's snapshot is complete
    raise raised(f"stopped at step {state.step} {why}; resume: {directory}")


def _finish(run: Run, state: TrainState) -> TrainResult:
    """The result, and (main rank) the run's summary metrics: best, time, speed, stability."""
    cfg, live, rank = run.cfg, run.live, run.rank
    # train_seconds spans every segment of a resumed run, so the steps counted must too.
    seconds = state.train_seconds
    images_per_s = cfg.train.max_steps * cfg.train.batch_size / max(seconds, 1e-9)
    result = TrainResult(state.best_val_mse, state.best_step, seconds, images_per_s)
    if not rank.is_main:
        return result
    live.log_metric("best/val_mse", result.best_val_mse, plot=False)
    live.log_metric("best/step", result.best_step, plot=False)
    live.log_metric("train_time_s", seconds, plot=False)
    live.log_metric("images_per_s", images_per_s, plot=False)
    processes = f", {rank.world_size} processes (DDP)" if rank.distributed else ""
    live.log_metric("device", run.runtime.describe() + processes, plot=False)
    stability = metrics.training_stability(state.loss_history, state.val_history)
    for name, value in stability.items():
        live.log_metric(f"stability/{name}", value, plot=False)
    live.make_summary()  # records the final step (a resumed Live would keep the snapshot's)
    return result
