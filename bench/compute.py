"""In-process benchmarks: matmul peak vs the training step's FLOP/s, train() vs a bare loop of
the package's own step, loader vs step, evaluate and prepare throughput, DDP scaling."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from _common import (
    ROOT,
    BenchError,
    Result,
    Stats,
    alternate,
    demo_config,
    demo_data,
    log,
    mean_seconds,
    ratio_stats,
    run_cmd,
    tool_env,
)

# ---------------------------------------------------------------------------------------------
# Benchmark 1: the machine's matmul peak against the training step's achieved FLOP/s


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 matmuls have hardware units here, and why we think so."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"torch.cuda.is_bf16_supported() = {ok}"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    units = sorted(set(flags) & {"avx512_bf16", "amx_bf16"})
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = torch.backends.mkldnn.is_available() and bool(units)
    if units and onednn:
        return True, f"CPU flags {', '.join(units)} and oneDNN bf16 support"
    return False, "no avx512_bf16/amx_bf16 CPU flag (or no oneDNN bf16): bf16 peak skipped"


def matmul_peaks(device: torch.device, rounds: int, bf16: bool) -> dict[str, list[float]]:
    """FLOP/s of square matmuls per round, best size, precisions interleaved."""
    sizes = [4096, 8192] if device.type == "cuda" else [1024, 2048]
    repeats = 20 if device.type == "cuda" else 4
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if bf16 else {})
    peaks: dict[str, list[float]] = {name: [] for name in dtypes}
    for _ in range(rounds):
        for name, dtype in dtypes.items():
            peaks[name].append(max(matmul_flops(n, dtype, device, repeats) for n in sizes))
    return peaks


def matmul_flops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of one n x n x n matmul, the mean over `repeats` calls."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / mean_seconds(lambda: a @ b, repeats)


class StepRunner:
    """The package's training step (`aeselect.training.loop.train_step`) on one fixed batch."""

    def __init__(self, cfg, data, bf16: bool | None = None):
        from dataclasses import replace

        from aeselect.data.dataset import StepBatchSampler, make_loader, to_model_input
        from aeselect.runtime import seed_everything, select_runtime
        from aeselect.training.loop import build_run

        runtime = select_runtime(cfg.train)
        self.runtime = runtime if bf16 is None else replace(runtime, bf16=bf16)
        seed_everything(cfg.train.seed)
        self.run = build_run(cfg, data, self.runtime)
        train_set = data.dataset("train")
        sampler = StepBatchSampler(len(train_set), cfg.train.batch_size, cfg.train.seed, 0, 1)
        raw = next(iter(make_loader(train_set, batch_sampler=sampler)))
        self.batch = to_model_input(*raw, runtime.device, runtime.channels_last)

    def step(self) -> None:
        from aeselect.training.loop import train_step

        train_step(self.run, *self.batch, 0)

    def seconds(self, steps: int) -> float:
        return mean_seconds(self.step, steps)

    def flops(self) -> int:
        """Forward + backward FLOPs (the optimiser's elementwise ops count 0)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()


def bench_matmul(workdir: Path, quick: bool) -> Result:
    res = Result()
    cfg = demo_config()
    data = demo_data(workdir)
    step = StepRunner(cfg, data)
    device = step.runtime.device
    rounds, steps = (3, 5) if quick else (7, 10)
    bf16_ok, bf16_why = bf16_support(device)
    res.details["bf16"] = {"supported": bf16_ok, "why": bf16_why}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 peak; the loop uses bf16
    peaks = matmul_peaks(device, rounds, bf16_ok)
    for name, values in peaks.items():
        gflops = Stats([v / 1e9 for v in values])
        note = bf16_why if name == "bf16" else "best square size per round"
        res.add("matmul", f"matmul peak {name} ({device.type})", gflops, "GFLOP/s", note=note)
    if not bf16_ok:
        res.add("matmul", "matmul peak bf16", None, "GFLOP/s", note=bf16_why)

    flops = step.flops()
    res.details["step_flops"] = flops
    # On a CPU with bf16 units, also the same step under CPU bf16 autocast (train() runs fp32).
    alt = StepRunner(cfg, data, bf16=True) if device.type == "cpu" and bf16_ok else None
    if alt:
        times, alt_times = alternate(
            rounds, lambda: step.seconds(steps), lambda: alt.seconds(steps)
        )
    else:
        times, alt_times = [step.seconds(steps) for _ in range(rounds)], []
    precision = "bf16" if step.runtime.bf16 else "fp32"
    per_step = Stats([t * 1e3 for t in times])
    note = f"{flops / 1e9:.2f} GFLOP fwd+bwd per step (FlopCounterMode)"
    res.add("matmul", f"train step ({precision}), demo params", per_step, "ms/step", note=note)
    res.add("matmul", "train step achieved", Stats([flops / t / 1e9 for t in times]), "GFLOP/s")
    fraction = Stats([100 * flops / t / p for t, p in zip(times, peaks[precision], strict=True)])
    name, ok = f"train step / {precision} matmul peak", fraction.median >= 70
    res.add("matmul", name, fraction, "%", target=">= 70%", ok=ok)
    if alt:
        speedup = ratio_stats(times, alt_times)
        note = "train() runs fp32 on the CPU (runtime.select_runtime)"
        res.add("matmul", "step fp32 / step bf16 autocast (CPU, info)", speedup, "x", note=note)
        bf16_fraction = [100 * flops / t / p for t, p in zip(alt_times, peaks["bf16"], strict=True)]
        res.add("matmul", "step bf16 autocast / bf16 matmul peak (info)", Stats(bf16_fraction), "%")
    return res


# ---------------------------------------------------------------------------------------------
# Benchmark 2: the train stage against a bare loop of the same steps


def bare_train(cfg, data) -> float:
    """Wall seconds of train()'s model, batches and `train_step`, without logging, evaluation,
    checkpoints or preemption checks."""
    from aeselect.data.dataset import to_model_input
    from aeselect.runtime import seed_everything, select_runtime
    from aeselect.training.loop import build_run, train_loader, train_step

    start = time.perf_counter()
    runtime = select_runtime(cfg.train)
    seed_everything(cfg.train.seed)
    run = build_run(cfg, data, runtime)
    run.model.train()
    for step, raw in enumerate(train_loader(cfg, data, 0, runtime)):
        batch = to_model_input(*raw, runtime.device, runtime.channels_last)
        terms = train_step(run, *batch, step)
    float(terms["total"])  # waits for the device
    return time.perf_counter() - start


def stage_train(cfg, data, directory: Path) -> tuple[float, float]:
    """aeselect's train() with a dvclive Live in `directory`; (wall s, its train_time_s)."""
    from aeselect.stages import open_live
    from aeselect.training.loop import train

    start = time.perf_counter()
    with open_live(directory / "results" / "train") as live:
        result = train(cfg, data, directory / "models", live)
    return time.perf_counter() - start, result.train_time_s


def bench_train(workdir: Path, quick: bool) -> Result:
    res = Result()
    # Default intervals (eval_every 100, log_every 10); 100 steps keep the evals-per-step rate
    # of the 300-step demo (3 evals) at a third of the time. --quick: 20 steps, eval at 20.
    steps = {"train.max_steps": 20, "train.eval_every": 20} if quick else {"train.max_steps": 100}
    cfg = demo_config(steps)
    data = demo_data(workdir)
    runs: list[tuple[float, float]] = []

    def staged() -> float:
        runs.append(stage_train(cfg, data, workdir / f"train_stage_{len(runs)}"))
        return runs[-1][0]

    bare_train(demo_config({"train.max_steps": 5}), data)  # warm-up (oneDNN, allocator)
    stage_walls, bare_walls = alternate(1 if quick else 2, staged, lambda: bare_train(cfg, data))
    n, t = cfg.train.max_steps, cfg.train
    note = f"eval+checkpoint every {t.eval_every}, log every {t.log_every}"
    res.add("train", f"train() stage, {n} steps", Stats(stage_walls), "s", note=note)
    res.add("train", f"bare loop, {n} steps", Stats(bare_walls), "s")
    ratio = ratio_stats(stage_walls, bare_walls)
    res.add("train", "train() / bare loop", ratio, "x", target="<= 1.10x", ok=ratio.median <= 1.10)
    outside = Stats([wall - loop for wall, loop in runs])
    note = "eval + checkpoints + dvclive + setup"
    res.add("train", "train() time outside its train_time_s", outside, "s", note=note)
    res.details["train_time_s"] = [loop for _, loop in runs]
    return res


# ---------------------------------------------------------------------------------------------
# Benchmark 3: the data loader against the step's consumption


def loader_images_per_s(cfg, data) -> float:
    """Images/s of train()'s loader and device transfer over `train.max_steps` batches."""
    from aeselect.data.dataset import to_model_input
    from aeselect.runtime import select_runtime
    from aeselect.training.loop import train_loader

    runtime = select_runtime(cfg.train)
    start = time.perf_counter()
    count = 0
    for raw in train_loader(cfg, data, 0, runtime):
        images, _ = to_model_input(*raw, runtime.device, runtime.channels_last)
        count += len(images)
    float(images.sum())  # waits for the device
    return count / (time.perf_counter() - start)


def bench_loader(workdir: Path, quick: bool) -> Result:
    res = Result()
    rounds, batches, steps = (3, 100, 5) if quick else (7, 400, 10)
    cfg = demo_config({"train.max_steps": batches})
    data = demo_data(workdir)
    step = StepRunner(cfg, data)
    loads, step_times = alternate(
        rounds, lambda: loader_images_per_s(cfg, data), lambda: mean_seconds(step.step, steps)
    )
    batch = cfg.train.batch_size
    note = f"{batches} batches of {batch}, num_workers={cfg.train.num_workers}"
    res.add("loader", "loader + to_model_input", Stats(loads), "images/s", note=note)
    consumes = [batch / t for t in step_times]
    res.add("loader", "train step consumption", Stats(consumes), "images/s")
    ratio = ratio_stats(loads, consumes)
    res.add("loader", "loader / step", ratio, "x", target=">= 10x", ok=ratio.median >= 10)
    return res


# ---------------------------------------------------------------------------------------------
# Benchmark 6: evaluate and prepare throughput


def untrained_checkpoint(cfg, data, path: Path) -> None:
    """best.pt of an untrained model: evaluation cost does not depend on the weights."""
    from aeselect.model import Autoencoder
    from aeselect.model.checkpoint import save_checkpoint

    torch.manual_seed(cfg.train.seed)
    model = Autoencoder(cfg.model, data.aux_classes)
    weights, aux = model.state_dict(), {"aux_task": data.aux_task, "aux_classes": data.aux_classes}
    save_checkpoint(path, model=weights, step=0, val_mse=1.0, config=cfg.to_dict(), **aux)


def evaluate_once(cfg, data, directory: Path) -> tuple[float, float]:
    """evaluate() as the stage runs it (cwd = a project dir), and its fixed-cost parts (`cost`,
    `smoothness`) timed alone on the same first val batch: (wall s, fixed-cost s)."""
    from aeselect import paths
    from aeselect.evaluation.evaluate import cost, evaluate, smoothness
    from aeselect.model.checkpoint import load_checkpoint, model_from_checkpoint
    from aeselect.runtime import select_runtime
    from aeselect.scoring.validation import val_batches
    from aeselect.stages import open_live

    directory.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(directory)  # evaluate() reads results/train and writes results/evaluate there
    try:
        paths.TRAIN_METRICS.parent.mkdir(parents=True, exist_ok=True)
        paths.TRAIN_METRICS.write_text(json.dumps({"stability": {}}))
        untrained_checkpoint(cfg, data, paths.BEST_CHECKPOINT)
        start = time.perf_counter()
        with open_live(paths.EVALUATE_LIVE_DIR) as live:
            evaluate(cfg, data, paths.BEST_CHECKPOINT, live)
        wall = time.perf_counter() - start
        model, _ = model_from_checkpoint(load_checkpoint(paths.BEST_CHECKPOINT))
        with select_runtime(cfg.train).fp32() as runtime, torch.no_grad():
            model = model.to(runtime.device)
            batch = next(val_batches(model, data, cfg.evaluate.batch_size, runtime))
            start = time.perf_counter()
            cost(model, batch.images, runtime)
            smoothness(model, batch, cfg.seed)
            fixed = time.perf_counter() - start
    finally:
        os.chdir(previous)
    return wall, fixed


def make_image_folder(directory: Path, count: int, size: int) -> dict[str, int]:
    """`count` scenes at `size` px: every other one re-saved as JPEG (masks stay PNG)."""
    from PIL import Image

    from aeselect.data.synthetic import generate_scenes

    generate_scenes(directory, count, size, 5, seed=1)
    for path in sorted((directory / "images").glob("*.png"))[1::2]:
        with Image.open(path) as image:
            image.convert("RGB").save(path.with_suffix(".jpg"), quality=92)
        path.unlink()
    return {"png": (count + 1) // 2, "jpeg": count // 2}


def prepare_once(folder: Path, out: Path, image_size: int) -> float:
    from aeselect.data.prepare import prepare

    cfg = demo_config(
        {
            "data.source": "folder",
            "data.root": str(folder / "images"),
            "data.mask_root": str(folder / "masks"),
            "data.image_size": image_size,
        }
    )
    start = time.perf_counter()
    summary = prepare(cfg, out)
    wall = time.perf_counter() - start
    if summary.num_rejected:
        raise BenchError(f"prepare rejected {summary.num_rejected} bench images: see {out}")
    return (summary.num_train + summary.num_val) / wall


def bench_throughput(workdir: Path, quick: bool) -> Result:
    res = Result()
    cfg = demo_config()
    data = demo_data(workdir)
    rounds = 2 if quick else 3
    runs = [evaluate_once(cfg, data, workdir / f"evaluate_{r}") for r in range(rounds + 1)][1:]
    val = len(data.split_indices("val"))
    rate, fixed = Stats([val / w for w, _ in runs]), Stats([100 * c / w for w, c in runs])
    note = f"{val} val images, demo params, first run discarded"
    res.add("throughput", "evaluate() on the val split", rate, "images/s", note=note)
    note = "throughput timing + latent probes: constant, not per image"
    res.add("throughput", "  share in cost + smoothness (fixed cost)", fixed, "%", note=note)
    per_image, note = Stats([val / (w - c) for w, c in runs]), "wall minus cost and smoothness"
    res.add("throughput", "evaluate() per-image part", per_image, "images/s", note=note)

    count = 16 if quick else 48
    folder = workdir / "raw512"
    start = time.perf_counter()
    kinds = make_image_folder(folder, count, 512)
    log(f"wrote {count} 512px scenes ({kinds}) in {time.perf_counter() - start:.1f} s")
    res.details["prepare_input"] = {"count": count, "size": 512, **kinds, "masks": "png"}
    at512, at64 = alternate(
        rounds,
        lambda: prepare_once(folder, workdir / "prepared512", 512),
        lambda: prepare_once(folder, workdir / "prepared64", 64),
    )
    note = f"{kinds['png']} PNG + {kinds['jpeg']} JPEG 512x512, PNG masks, {os.cpu_count()} cpus"
    res.add("throughput", "prepare() 512px -> 512 (real study)", Stats(at512), "img/s", note=note)
    res.add("throughput", "prepare() 512px -> 64 (demo size)", Stats(at64), "img/s")
    return res


# ---------------------------------------------------------------------------------------------
# Benchmark 7: the train stage as 1 process against N DDP processes (torchrun)


def train_stage_images_per_s(workspace: Path, processes: int, threads: int) -> float:
    """`python -m aeselect train` as `processes` ranks; the images/s it logs (no eval time)."""
    from aeselect.envvars import NPROC_ENV, THREADS_ENV
    from aeselect.paths import MODELS_DIR, TRAIN_LIVE_DIR, TRAIN_METRICS

    shutil.rmtree(workspace / TRAIN_LIVE_DIR, ignore_errors=True)
    shutil.rmtree(workspace / MODELS_DIR, ignore_errors=True)
    env = {"PYTHONPATH": str(ROOT / "src"), NPROC_ENV: str(processes), THREADS_ENV: str(threads)}
    run_cmd([sys.executable, "-m", "aeselect", "train"], workspace, timeout=1200, env=tool_env(env))
    return json.loads((workspace / TRAIN_METRICS).read_text())["images_per_s"]


def bench_ddp(workdir: Path, quick: bool) -> Result:
    import yaml

    from aeselect.config import apply_overrides, read_yaml
    from aeselect.paths import PREPARED_DIR

    res = Result()
    gpus = torch.cuda.device_count()
    processes = max(2, gpus)
    # The ideal speed-up: N on N GPUs; 1 on the CPU, where the ranks share the same cores.
    ideal = processes if gpus else 1
    cores = len(os.sched_getaffinity(0))
    steps = 20 if quick else 100
    workspace = workdir / "ddp"
    (workspace / PREPARED_DIR).parent.mkdir(parents=True)
    (workspace / PREPARED_DIR).symlink_to(demo_data(workdir).directory.resolve())
    raw = apply_overrides(
        read_yaml(ROOT / "params.yaml"), {"train.max_steps": steps, "train.eval_every": steps}
    )
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw))
    single, multi = alternate(
        1 if quick else 2,
        lambda: train_stage_images_per_s(workspace, 1, cores),
        lambda: train_stage_images_per_s(workspace, processes, cores),
    )
    where = f"{gpus} GPUs" if gpus else f"CPU, {cores} cores shared"
    res.add("ddp", "train stage, 1 process", Stats(single), "img/s", note=where)
    res.add("ddp", f"train stage, {processes} processes (DDP)", Stats(multi), "img/s", note=where)
    if gpus:
        per_gpu = Stats([value / processes for value in multi])
        res.add("ddp", f"  per GPU, {processes} processes", per_gpu, "img/s")
    efficiency = Stats([m / (s * ideal) for m, s in zip(multi, single, strict=True)])
    note = f"speed-up / {ideal} (ideal); batch {raw['train']['batch_size']}, {steps} steps"
    res.add("ddp", "scaling efficiency", efficiency, "x", note=note)
    return res
