"""In-process benchmarks: matmul peak vs training FLOP/s, train vs bare loop, loader, throughput."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

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
    ratio_stats,
    run_cmd,
    tool_env,
)

# ---------------------------------------------------------------------------------------------
# Hardware


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 matmuls have hardware units here, and why we think so."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"torch.cuda.is_bf16_supported() = {ok}"
    units = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = torch.backends.mkldnn.is_available() and bool(units)
    if units and onednn:
        return True, f"CPU flags {', '.join(units)} and oneDNN bf16 support"
    return False, "no avx512_bf16/amx_bf16 CPU flag (or no oneDNN bf16): bf16 peak skipped"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of one n x n x n matmul, the mean over `repeats` back-to-back calls."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# One training step, exactly the loop's math (aeselect.training.loop.train) without the loop.


class StepRunner:
    """Model, optimiser and one fixed batch; `step()` is one training step as train() does it."""

    def __init__(self, cfg, data, autocast_bf16: bool | None = None):
        from aeselect.data.dataset import StepBatchSampler, make_loader, to_model_input
        from aeselect.model import Autoencoder
        from aeselect.runtime import seed_everything, select_runtime

        self.cfg, self.runtime = cfg, select_runtime(cfg.train)
        seed_everything(cfg.train.seed)
        device = self.runtime.device
        self.model = Autoencoder(cfg.model, data.aux_classes).to(device)
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=cfg.train.lr,
            betas=(0.9, 0.99),
            weight_decay=cfg.train.weight_decay,
            fused=device.type == "cuda",
        )
        train_set = data.dataset("train")
        sampler = StepBatchSampler(len(train_set), cfg.train.batch_size, cfg.train.seed, 0, 1)
        raw = next(iter(make_loader(train_set, batch_sampler=sampler)))
        self.images, self.targets = to_model_input(*raw, device, self.runtime.channels_last)
        bf16 = self.runtime.bf16 if autocast_bf16 is None else autocast_bf16
        self.bf16 = bf16
        self.autocast = (
            (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
            if bf16
            else contextlib.nullcontext
        )

    def forward_backward(self) -> torch.Tensor:
        from aeselect.training.loss import compute_loss

        with self.autocast():
            out = self.model(self.images)
        loss, _ = compute_loss(out, self.images, self.targets, self.cfg.loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def step(self) -> None:
        self.forward_backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()

    def flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.forward_backward()
        return counter.get_total_flops()

    def time_steps(self, steps: int) -> float:
        """Seconds per step, mean of `steps` steps (device synchronised)."""
        sync(self.runtime.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.runtime.device)
        return (time.perf_counter() - start) / steps


def bench_matmul(workdir: Path, quick: bool) -> Result:
    """Benchmark 1: matmul peak (fp32, bf16 where supported) and the step's FLOP/s against it."""
    res = Result()
    cfg = demo_config()
    data = demo_data(workdir)
    step = StepRunner(cfg, data)
    device = step.runtime.device
    rounds = 3 if quick else 7
    sizes = [4096, 8192] if device.type == "cuda" else [1024, 2048]
    mm_repeats = 20 if device.type == "cuda" else 4
    bf16_ok, bf16_why = bf16_support(device)
    res.details["bf16"] = {"supported": bf16_ok, "why": bf16_why}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # true fp32 peak; the loop uses bf16

    # The machine peak: best size, median over rounds; fp32 and bf16 interleaved per round.
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if name == "bf16" and not bf16_ok:
                continue
            peaks[name].append(max(matmul_flops(n, dtype, device, mm_repeats) for n in sizes))
    fp32_peak = Stats(peaks["fp32"])
    res.add(
        "matmul",
        f"matmul peak fp32 ({device.type})",
        Stats([v / 1e9 for v in peaks["fp32"]]),
        "GFLOP/s",
        note=f"n in {sizes}, best size per round",
    )
    if bf16_ok:
        res.add(
            "matmul",
            f"matmul peak bf16 ({device.type})",
            Stats([v / 1e9 for v in peaks["bf16"]]),
            "GFLOP/s",
            note=bf16_why,
        )
    else:
        res.add("matmul", "matmul peak bf16", None, "GFLOP/s", note=bf16_why)

    # The training step at demo params: FLOPs counted once, time measured per round.
    flops = step.flops()
    res.details["step_flops"] = flops
    steps_per_round = 5 if quick else 10
    for _ in range(3):
        step.step()  # warm-up: oneDNN primitives, allocator
    alt = None
    if device.type == "cpu" and bf16_ok:
        # Informational: the same step under CPU bf16 autocast (train() runs fp32 on the CPU).
        alt = StepRunner(cfg, data, autocast_bf16=True)
        for _ in range(3):
            alt.step()
        fp32_times, bf16_times = alternate(
            rounds,
            lambda: step.time_steps(steps_per_round),
            lambda: alt.time_steps(steps_per_round),
        )
    else:
        fp32_times = [step.time_steps(steps_per_round) for _ in range(rounds)]
        bf16_times = []
    step_name = "bf16 autocast" if step.bf16 else "fp32"
    res.add(
        "matmul",
        f"train step ({step_name}), demo params",
        Stats([t * 1e3 for t in fp32_times]),
        "ms/step",
        note=f"{flops / 1e9:.2f} GFLOP fwd+bwd per step (FlopCounterMode)",
    )
    achieved = Stats([flops / t / 1e9 for t in fp32_times])
    res.add("matmul", "train step achieved", achieved, "GFLOP/s")
    peak_for_step = peaks["bf16"] if step.bf16 else peaks["fp32"]
    fraction = ratio_stats([flops / t for t in fp32_times], peak_for_step[: len(fp32_times)])
    fraction = Stats([v * 100 for v in fraction.values])
    res.add(
        "matmul",
        f"train step / {'bf16' if step.bf16 else 'fp32'} matmul peak",
        fraction,
        "%",
        target=">= 70%",
        ok=fraction.median >= 70,
    )
    res.details["fp32_peak_median_gflops"] = fp32_peak.median / 1e9
    if alt is not None:
        speedup = ratio_stats(fp32_times, bf16_times)
        res.add(
            "matmul",
            "step fp32 / step bf16 autocast (CPU, info)",
            speedup,
            "x",
            note="train() runs fp32 on the CPU (runtime.select_runtime)",
        )
        bf16_frac = ratio_stats([flops / t for t in bf16_times], peaks["bf16"][: len(bf16_times)])
        res.add(
            "matmul",
            "step bf16 autocast / bf16 matmul peak (info)",
            Stats([v * 100 for v in bf16_frac.values]),
            "%",
        )
    breakdown = op_breakdown(step)
    res.details["breakdown"] = breakdown
    conv_share = breakdown["conv_share_of_self_cpu_time"]
    res.add(
        "matmul",
        "conv ops' share of step time (profiler)",
        Stats([conv_share * 100]),
        "%",
        note="the rest: GroupNorm, SiLU, elementwise, optimiser (0 FLOPs counted)",
    )
    conv_only = [
        flops / (t * conv_share) / p * 100 for t, p in zip(fp32_times, peak_for_step, strict=False)
    ]
    res.add("matmul", "conv ops alone / matmul peak (estimate)", Stats(conv_only), "%")
    return res


@contextlib.contextmanager
def quiet_stderr():
    """Silence fd 2 (the profiler's C++ start/stop chatter), restoring it afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def op_breakdown(step: StepRunner, steps: int = 3) -> dict[str, Any]:
    """Share of the step's CPU time per op (self time): where a low FLOP/s fraction comes from."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if step.runtime.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with quiet_stderr(), profile(activities=activities) as prof:
        for _ in range(steps):
            step.step()
        sync(step.runtime.device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    return {
        "conv_share_of_self_cpu_time": conv / total,
        "top_ops_share_of_self_cpu_time": {
            e.key: round(e.self_cpu_time_total / total, 4) for e in top
        },
    }


# ---------------------------------------------------------------------------------------------
# Benchmark 2: the train stage against a bare loop


def bare_train(cfg, data) -> float:
    """Same model, data order, steps, optimiser, lr schedule and clipping; nothing else."""
    from aeselect.data.dataset import StepBatchSampler, make_loader, to_model_input
    from aeselect.runtime import seed_everything, select_runtime
    from aeselect.training.loop import build_model, lr_at
    from aeselect.training.loss import compute_loss

    start = time.perf_counter()
    runtime = select_runtime(cfg.train)
    seed_everything(cfg.train.seed)
    model, forward, optimizer = build_model(cfg, data.aux_classes, runtime)
    train_set = data.dataset("train")
    sampler = StepBatchSampler(
        len(train_set), cfg.train.batch_size, cfg.train.seed, 0, cfg.train.max_steps
    )
    loader = make_loader(train_set, batch_sampler=sampler, num_workers=cfg.train.num_workers)
    model.train()
    for step, raw in enumerate(loader):
        images, targets = to_model_input(*raw, runtime.device, runtime.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        with runtime.autocast():
            out = forward(images)
        loss, _ = compute_loss(out, images, targets, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
    sync(runtime.device)
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
    overrides = (
        {"train.max_steps": 20, "train.eval_every": 20} if quick else {"train.max_steps": 100}
    )
    cfg = demo_config(overrides)
    data = demo_data(workdir)
    repeats = 1 if quick else 2  # ABBA: 2 pairs; each run is ~25 s at demo params
    runs: list[tuple[float, float]] = []

    def staged() -> float:
        directory = workdir / f"train_stage_{len(runs)}"
        wall, loop_s = stage_train(cfg, data, directory)
        runs.append((wall, loop_s))
        return wall

    bare_train(demo_config({"train.max_steps": 5}), data)  # warm-up (oneDNN, allocator)
    stage_walls, bare_walls = alternate(repeats, staged, lambda: bare_train(cfg, data))
    steps = cfg.train.max_steps
    res.add(
        "train",
        f"train() stage, {steps} steps",
        Stats(stage_walls),
        "s",
        note=f"eval+checkpoint every {cfg.train.eval_every}, log every {cfg.train.log_every}",
    )
    res.add("train", f"bare loop, {steps} steps", Stats(bare_walls), "s")
    ratio = ratio_stats(stage_walls, bare_walls)
    res.add("train", "train() / bare loop", ratio, "x", target="<= 1.10x", ok=ratio.median <= 1.10)
    outside = Stats([wall - loop for wall, loop in runs])
    res.add(
        "train",
        "train() time outside its train_time_s",
        outside,
        "s",
        note="eval + checkpoints + dvclive + setup",
    )
    res.details["train_time_s"] = [loop for _, loop in runs]
    return res


# ---------------------------------------------------------------------------------------------
# Benchmark 3: the data loader against the step's consumption


def loader_images_per_s(cfg, data, batches: int) -> float:
    from aeselect.data.dataset import StepBatchSampler, make_loader, to_model_input
    from aeselect.runtime import select_runtime

    runtime = select_runtime(cfg.train)
    train_set = data.dataset("train")
    sampler = StepBatchSampler(len(train_set), cfg.train.batch_size, cfg.train.seed, 0, batches)
    loader = make_loader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.train.num_workers,
        pin_memory=runtime.device.type == "cuda",
    )
    start = time.perf_counter()
    count = 0
    for raw in loader:
        images, _ = to_model_input(*raw, runtime.device, runtime.channels_last)
        count += len(images)
    sync(runtime.device)
    return count / (time.perf_counter() - start)


def bench_loader(workdir: Path, quick: bool) -> Result:
    res = Result()
    cfg = demo_config()
    data = demo_data(workdir)
    step = StepRunner(cfg, data)
    for _ in range(3):
        step.step()
    rounds, batches, steps = (3, 100, 5) if quick else (7, 400, 10)
    batch = cfg.train.batch_size
    loads, step_times = alternate(
        rounds, lambda: loader_images_per_s(cfg, data, batches), lambda: step.time_steps(steps)
    )
    consumes = [batch / t for t in step_times]
    res.add(
        "loader",
        "loader + to_model_input",
        Stats(loads),
        "images/s",
        note=f"{batches} batches of {batch}, num_workers={cfg.train.num_workers}",
    )
    res.add("loader", "train step consumption", Stats(consumes), "images/s")
    ratio = ratio_stats(loads, consumes)
    res.add("loader", "loader / step", ratio, "x", target=">= 10x", ok=ratio.median >= 10)
    return res


# ---------------------------------------------------------------------------------------------
# Benchmark 6: evaluate and prepare throughput


def _fake_checkpoint(cfg, data, models_dir: Path) -> None:
    """best.pt of an untrained model: evaluation cost does not depend on the weights."""
    from aeselect.training.checkpoint import BEST, save_checkpoint

    from aeselect.model import Autoencoder

    torch.manual_seed(cfg.train.seed)
    model = Autoencoder(cfg.model, data.aux_classes)
    save_checkpoint(
        models_dir / BEST,
        model=model.state_dict(),
        step=0,
        val_mse=1.0,
        config=cfg.to_dict(),
        aux_task=data.aux_task,
        aux_classes=data.aux_classes,
    )


class _Timed:
    """Wrap a module function to add up its wall time (the bench's view into evaluate())."""

    def __init__(self, module, name: str):
        self.module, self.name, self.fn, self.seconds = module, name, getattr(module, name), 0.0

    def __enter__(self):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.module, self.name, self.fn)


def evaluate_once(cfg, data, directory: Path) -> tuple[float, float]:
    """evaluate() as the stage runs it (cwd = a project dir): (wall s, s in _cost+_smoothness)."""
    import aeselect.evaluation.evaluate as module
    from aeselect.evaluation.evaluate import evaluate
    from aeselect.stages import open_live

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results" / "train").mkdir(parents=True, exist_ok=True)
    (directory / "results" / "train" / "metrics.json").write_text(json.dumps({"stability": {}}))
    _fake_checkpoint(cfg, data, directory / "models")
    previous = Path.cwd()
    os.chdir(directory)  # evaluate() reads results/train and writes results/evaluate there
    try:
        with _Timed(module, "_cost") as cost, _Timed(module, "_smoothness") as smooth:
            start = time.perf_counter()
            with open_live(Path("results/evaluate")) as live:
                evaluate(cfg, data, Path("models"), live)
            wall = time.perf_counter() - start
    finally:
        os.chdir(previous)
    return wall, cost.seconds + smooth.seconds


def make_image_folder(directory: Path, count: int, size: int) -> dict[str, int]:
    """`count` scenes at `size` px: every other one re-saved as JPEG (masks stay PNG)."""
    from PIL import Image

    from aeselect.data.synthetic import generate_scenes

    generate_scenes(directory, count, size, 5, seed=1)
    kinds = {"png": 0, "jpeg": 0}
    for i, path in enumerate(sorted((directory / "images").glob("*.png"))):
        if i % 2:
            with Image.open(path) as image:
                image.convert("RGB").save(path.with_suffix(".jpg"), quality=92)
            path.unlink()
            kinds["jpeg"] += 1
        else:
            kinds["png"] += 1
    return kinds


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
    count = summary.num_train + summary.num_val
    if summary.num_rejected:
        raise BenchError(f"prepare rejected {summary.num_rejected} bench images: see {out}")
    return count / wall


def bench_throughput(workdir: Path, quick: bool) -> Result:
    res = Result()
    cfg = demo_config()
    data = demo_data(workdir)
    rounds = 2 if quick else 3
    runs = [evaluate_once(cfg, data, workdir / f"evaluate_{r}") for r in range(rounds + 1)][1:]
    val = len(data.split_indices("val"))
    res.add(
        "throughput",
        "evaluate() on the val split",
        Stats([val / w for w, _ in runs]),
        "images/s",
        note=f"{val} val images, demo params, first run discarded",
    )
    res.add(
        "throughput",
        "  share in _cost + _smoothness (fixed cost)",
        Stats([100 * c / w for w, c in runs]),
        "%",
        note="throughput timing + latent probes: constant, not per image",
    )
    res.add(
        "throughput",
        "evaluate() per-image part",
        Stats([val / (w - c) for w, c in runs]),
        "images/s",
        note="wall minus _cost and _smoothness",
    )

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
    res.add(
        "throughput", "prepare() 512px -> 512 (real study)", Stats(at512), "images/s", note=note
    )
    res.add("throughput", "prepare() 512px -> 64 (demo size)", Stats(at64), "images/s")
    return res


# ---------------------------------------------------------------------------------------------
# Benchmark 7: the train stage as 1 process against N DDP processes (torchrun)


def train_stage_images_per_s(workspace: Path, processes: int, threads: int) -> float:
    """`python -m aeselect train` as `processes` ranks; the images/s it logs (no eval time)."""
    from aeselect.envvars import NPROC_ENV, THREADS_ENV

    shutil.rmtree(workspace / "results", ignore_errors=True)
    shutil.rmtree(workspace / "models", ignore_errors=True)
    env = {"PYTHONPATH": str(ROOT / "src"), NPROC_ENV: str(processes), THREADS_ENV: str(threads)}
    run_cmd([sys.executable, "-m", "aeselect", "train"], workspace, timeout=1200, env=tool_env(env))
    return json.loads((workspace / "results/train/metrics.json").read_text())["images_per_s"]


def bench_ddp(workdir: Path, quick: bool) -> Result:
    import yaml

    from aeselect.config import apply_overrides, read_yaml

    res = Result()
    gpus = torch.cuda.device_count()
    processes = max(2, gpus)
    # The ideal speed-up: N on N GPUs; 1 on the CPU, where the ranks share the same cores.
    ideal = processes if gpus else 1
    cores = len(os.sched_getaffinity(0))
    steps = 20 if quick else 100
    overrides = {"train.max_steps": steps, "train.eval_every": steps}
    workspace = workdir / "ddp"
    (workspace / "data").mkdir(parents=True)
    (workspace / "data/prepared").symlink_to(demo_data(workdir).directory.resolve())
    raw = apply_overrides(read_yaml(ROOT / "params.yaml"), overrides)
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
    res.add(
        "ddp",
        "scaling efficiency",
        efficiency,
        "x",
        note=f"speed-up / {ideal} (ideal); batch {raw['train']['batch_size']}, {steps} steps",
    )
    return res
