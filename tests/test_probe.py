"""The diffusability probe (aeselect.probe) on synthetic latents with known structure, and its stage
under `dvc exp run`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from aeselect.config import ConfigError, ProbeConfig, apply_overrides, from_dict
from aeselect.dvc import run_dvc
from aeselect.probe.denoiser import sample, score, train_probe
from aeselect.probe.spectrum import high_frequency_share

# Small enough for a test: 8x8x4 latents, a narrow net.
SMALL = ProbeConfig(width=16, blocks=2, steps=150, batch_size=32, noise_levels=6, sample_images=2)


def gaussian(count: int, seed: int, std=(0.5, 1.0, 2.0, 3.0)) -> torch.Tensor:
    """I.i.d. Gaussian latents, unequal channel variances: no structure beyond them."""
    noise = torch.randn((count, len(std), 8, 8), generator=torch.Generator().manual_seed(seed))
    return noise * torch.tensor(std).view(1, -1, 1, 1) + 0.3


def smooth(count: int, seed: int) -> torch.Tensor:
    """Low-pass noise: neighbouring positions strongly correlated, unit variance."""
    noise = torch.randn((count, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    blurred = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    return blurred / blurred.std()


def sign_flipped(latents: torch.Tensor) -> torch.Tensor:
    """The same latents times a fixed pseudo-random sign per position: same per-channel moments,
    structure a translation-equivariant denoiser cannot exploit."""
    signs = torch.randint(0, 2, latents.shape[1:], generator=torch.Generator().manual_seed(7))
    return latents * (2 * signs - 1)


def probe_loss(cfg: ProbeConfig, train: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    probe, _ = train_probe(cfg, train)
    return score(probe, val, cfg).mean(dim=1)


def standard_error(values: torch.Tensor) -> float:
    return float(values.std() / len(values) ** 0.5)


def test_the_probe_is_deterministic():
    cfg = ProbeConfig(**{**SMALL.__dict__, "steps": 20})
    train, val = smooth(128, 0), smooth(32, 1)
    first, second = scores_and_samples(cfg, train, val), scores_and_samples(cfg, train, val)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other = scores_and_samples(ProbeConfig(**{**cfg.__dict__, "seed": 1}), train, val)
    assert not torch.equal(first[0], other[0])  # the seed reaches the draws


def scores_and_samples(cfg, train, val):
    probe, _ = train_probe(cfg, train)
    return score(probe, val, cfg), sample(probe, cfg, (8, 8))


def test_an_unfitted_probe_scores_the_gaussian_optimum():
    """0 steps: the prediction is the per-channel Gaussian posterior mean, whose error is the
    normaliser; on Gaussian latents it reads 1.0 at every level, whatever the channel scales."""
    cfg = ProbeConfig(**{**SMALL.__dict__, "steps": 0})
    losses = score(train_probe(cfg, gaussian(1024, 0))[0], gaussian(512, 1), cfg)
    assert round(float(losses.mean()), 2) == 1.0
    assert torch.allclose(
        losses.mean(dim=0), torch.ones(cfg.noise_levels, dtype=torch.float64), atol=0.02
    )


def test_a_trained_probe_finds_no_structure_in_gaussian_noise():
    per_image = probe_loss(SMALL, gaussian(1024, 0), gaussian(256, 1))
    assert abs(float(per_image.mean()) - 1.0) <= 2 * standard_error(per_image)


def test_a_harder_latent_ranks_worse_outside_the_interval():
    train, val = smooth(1024, 0), smooth(256, 1)
    easy = probe_loss(SMALL, train, val)
    hard = probe_loss(SMALL, sign_flipped(train), sign_flipped(val))
    difference = hard - easy  # paired: the same val latents, flipped
    assert float(easy.mean()) < 0.9  # it found the smooth latents' structure
    assert float(difference.mean()) > 3 * standard_error(difference)


def test_high_frequency_share_of_noise_smooth_and_constant_maps():
    noise = torch.randn((64, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert abs(float(high_frequency_share(noise).mean()) - (1 - torch.pi / 16)) < 0.02
    assert float(high_frequency_share(smooth(64, 0)).mean()) < 0.5 * float(
        high_frequency_share(noise).mean()
    )
    assert torch.equal(
        high_frequency_share(torch.ones(2, 3, 8, 8)), torch.zeros(2, dtype=torch.float64)
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("probe.width", 12, "probe.width: must be a multiple of 8"),
        ("probe.steps", -1, "probe.steps: must be >= 0"),
        ("probe.train_images", 0, "probe.train_images: must be >= 1"),
        ("probe.schedule", "linear", "probe.schedule: must be one of ['cosine']"),
    ],
)
def test_bad_probe_params_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict(apply_overrides({}, {key: value}))


@pytest.mark.slow
def test_the_probe_stage_runs_under_dvc_and_reruns_alone(project):
    run_dvc(["exp", "run"], cwd=project)
    metrics = json.loads((project / "results/probe/metrics.json").read_text())
    # 19 train latents of 4x4x4: the probe may overfit them, reading above 1 (README).
    assert math.isfinite(metrics["probe"]["loss"]) and metrics["probe"]["loss"] > 0
    assert 0 <= metrics["latent"]["hf_energy"] <= 1 and 0 <= metrics["image"]["hf_energy"] <= 1
    rows = (project / "results/probe/per_image.csv").read_text().splitlines()
    evaluated = (project / "results/evaluate/per_image.csv").read_text().splitlines()
    assert rows[0] == "path,probe.loss" and len(rows) == len(evaluated)
    assert (project / "results/probe/plots/images/probe_samples.png").is_file()
    rerun = run_dvc(["exp", "run", "-S", "probe.steps=3"], cwd=project).stdout
    assert "Running stage 'probe'" in rerun
    assert "Running stage 'train'" not in rerun and "Running stage 'evaluate'" not in rerun
