"""The training loop, readable top to bottom: data, model, optimiser, then one `for step` loop.

Host syncs happen only at log and eval intervals: per-step loss terms stay on the device and a
non-finite loss is found, with its exact step and terms, when the window is read.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from dvclive import Live
from tqdm import tqdm

from aeselect.config import Config
from aeselect.data.dataset import PreparedData, StepBatchSampler, make_loader, to_model_input
from aeselect.evaluation import metrics
from aeselect.evaluation.images import reconstruction_grid
from aeselect.model import Autoencoder
from aeselect.runtime import Runtime, seed_everything, select_runtime, step_generator
from aeselect.training import distributed
from aeselect.training.checkpoint import BEST, LAST, save_checkpoint
from aeselect.training.loss import compute_loss
from aeselect.training.resume import Preempted, StopRequest, save_snapshot

TRAIN_LIVE_DIR = Path("results/train")


class NonFiniteLossError(RuntimeError):
    """Training diverged: the message gives the step and every loss term at that step."""


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
def validate(
    model: Autoencoder, data: PreparedData, cfg: Config, runtime: Runtime, num_samples: int
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Val-set MSE, PSNR, KLD and auxiliary scores, plus the first images for a grid."""
    model.eval()
    loader = make_loader(data.dataset("val"), batch_size=cfg.evaluate.batch_size)
    aux = metrics.AuxScore(data.aux_classes, data.aux_task, runtime.device)
    sums: dict[str, float] = {}
    count = 0
    samples: list[torch.Tensor] = []
    recon_samples: list[torch.Tensor] = []
    for raw_images, raw_targets in loader:
        images, targets = to_model_input(
            raw_images, raw_targets, runtime.device, runtime.channels_last
        )
        with runtime.autocast():
            out = model(images)
        reconstruction = out.reconstruction.float().clamp(0, 1)
        aux.update(out.aux_logits, targets)
        batch = {
            "mse": metrics.per_image_mse(images, reconstruction).sum().item(),
            "psnr": metrics.per_image_psnr(images, reconstruction).sum().item(),
        }
        if out.mean is not None:
            batch["kld"] = metrics.gaussian_kld(out.mean.float(), out.logvar.float()).sum().item()
        for key, value in batch.items():
            sums[key] = sums.get(key, 0.0) + value
        count += len(images)
        if sum(len(s) for s in samples) < num_samples:
            samples.append(images.cpu())
            recon_samples.append(reconstruction.cpu())
    model.train()
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


def build_model(
    cfg: Config, aux_classes: int, runtime: Runtime
) -> tuple[Autoencoder, torch.nn.Module, torch.optim.Optimizer]:
    """The model on its device and layout, its (DDP-wrapped, optionally compiled) forward, and
    AdamW."""
    model = Autoencoder(cfg.model, aux_classes).to(runtime.device)
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
    return model, forward, optimizer


def train(
    cfg: Config,
    data: PreparedData,
    models_dir: Path,
    live: Live | None,
    *,
    resume_state: dict | None = None,
    snapshot: Path | None = None,
) -> TrainResult:
    """Train from scratch, or from `resume_state`; with `snapshot` set, SIGUSR1/SIGTERM stop the
    run at the next log boundary with a resume snapshot there (raises Preempted).

    Under torchrun every rank calls this; rank 0 alone gets `live` and writes anything.
    """
    rank = distributed.this_rank()
    runtime = select_runtime(cfg.train)
    seed_everything(cfg.train.seed)
    print(f"[train] device {runtime.describe()}, bf16={runtime.bf16}", file=sys.stderr)

    model, forward, optimizer = build_model(cfg, data.aux_classes, runtime)

    best_val_mse, best_step = float("inf"), -1
    loss_history: list[float] = []
    val_history: list[float] = []
    train_seconds = 0.0
    start_step = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        start_step = resume_state["step"]
        best_val_mse, best_step = resume_state["best_val_mse"], resume_state["best_step"]
        loss_history, val_history = resume_state["loss_history"], resume_state["val_history"]
        train_seconds = resume_state["train_seconds"]
        print(f"[train] resumed at step {start_step} from {snapshot}", file=sys.stderr)
    stop = StopRequest(announce=rank.is_main) if snapshot is not None else None
    sampler = StepBatchSampler(
        len(data.dataset("train")),
        cfg.train.batch_size,
        cfg.train.seed,
        start_step,
        cfg.train.max_steps,
    )
    loader = make_loader(
        data.dataset("train"),
        batch_sampler=distributed.shard(sampler),
        num_workers=cfg.train.num_workers,
        pin_memory=runtime.device.type == "cuda",
    )

    window: list[dict[str, torch.Tensor]] = []
    progress = tqdm(
        total=cfg.train.max_steps,
        initial=start_step,
        disable=not (rank.is_main and sys.stderr.isatty()),
    )
    stop_now = False
    model.train()
    tick = time.perf_counter()
    for step, (raw_images, raw_targets) in enumerate(loader, start=start_step):
        images, targets = to_model_input(
            raw_images, raw_targets, runtime.device, runtime.channels_last
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)

        with runtime.autocast():
            out = forward(
                images,
                generator=step_generator(cfg.train.seed, step, runtime.device),
                batch_rows=distributed.batch_rows(len(images)),
            )
        loss, terms = compute_loss(out, images, targets, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        window.append(terms)
        progress.update(1)

        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps:
            window = distributed.mean_over_ranks(window)
            _raise_if_nonfinite(window, done - len(window))
            loss_history += torch.stack([t["total"] for t in window]).tolist()
            if live is not None:
                live.step = done
                for name in window[0]:
                    live.log_metric(
                        f"loss/{name}", torch.stack([t[name] for t in window]).mean().item()
                    )
                live.log_metric("lr", lr_at(step, cfg))
            progress.set_postfix(loss=f"{float(window[-1]['total']):.4f}")
            window = []
            # Every rank stops at the same boundary when any one of them was signalled.
            stop_now = stop is not None and distributed.any_rank(
                stop.requested is not None, runtime.device
            )

        if live is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
            train_seconds += time.perf_counter() - tick
            val, originals, reconstructions = validate(
                forward, data, cfg, runtime, cfg.evaluate.num_sample_images
            )
            val_history.append(val["mse"])
            live.step = done
            for name, value in val.items():
                live.log_metric(f"val/{name}", value)
            live.log_image(
                f"val_reconstructions/step_{done:06d}.png",
                reconstruction_grid(originals, reconstructions, with_error=False),
            )
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": done,
                "val_mse": val["mse"],
                "config": cfg.to_dict(),
                "aux_task": data.aux_task,
                "aux_classes": data.aux_classes,
            }
            if val["mse"] < best_val_mse:
                best_val_mse, best_step = val["mse"], done
                save_checkpoint(models_dir / BEST, **checkpoint)
            save_checkpoint(
                models_dir / LAST, **checkpoint, best_val_mse=best_val_mse, best_step=best_step
            )
            tick = time.perf_counter()

        if stop_now:
            train_seconds += time.perf_counter() - tick
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": done,
                "best_val_mse": best_val_mse,
                "best_step": best_step,
                "loss_history": loss_history,
                "val_history": val_history,
                "train_seconds": train_seconds,
            }
            if live is not None:
                live.make_summary()
                save_snapshot(snapshot, state, [models_dir, Path(live.dir)])
            distributed.barrier()  # the others exit only once rank 0's snapshot is complete
            progress.close()
            raise Preempted(
                f"stopped at step {done} on signal {stop.requested or 'to another rank'}; "
                f"resume: {snapshot}"
            )
    progress.close()

    # train_seconds spans every segment of a resumed run, so the steps counted must too.
    images_per_s = cfg.train.max_steps * cfg.train.batch_size / max(train_seconds, 1e-9)
    result = TrainResult(best_val_mse, best_step, train_seconds, images_per_s)
    if live is None:
        return result
    live.log_metric("best/val_mse", best_val_mse, plot=False)
    live.log_metric("best/step", best_step, plot=False)
    live.log_metric("train_time_s", train_seconds, plot=False)
    live.log_metric("images_per_s", images_per_s, plot=False)
    processes = f", {rank.world_size} processes (DDP)" if rank.distributed else ""
    live.log_metric("device", runtime.describe() + processes, plot=False)
    for name, value in metrics.training_stability(loss_history, val_history).items():
        live.log_metric(f"stability/{name}", value, plot=False)
    live.make_summary()  # records the final step (a resumed Live would keep the snapshot's)
    return result
