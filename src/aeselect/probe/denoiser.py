"""The probe's denoiser: ε-prediction on a variance-preserving cosine schedule, scored as a fraction
of the best a model can do on a latent with no structure beyond each channel's own variance.

With x_t = sqrt(ab) x0 + sqrt(1 - ab) ε and x0 of channel c Gaussian (mean m_c, variance v_c),
the best ε estimate is the Gaussian posterior mean, with expected squared error
ab v_c / (ab v_c + 1 - ab) per element: the *optimum*. The probe predicts that posterior mean
plus sqrt(optimum) times a small conv net's output, whose last layer starts at zero, and trains
on the squared error divided by the optimum, which is also its score. So an unfitted probe
scores 1.0 ("no structure found"), a score below 1 is structure the net found (lower = easier
to diffuse), and the score compares latents of any shape, channel count or scale.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from aeselect.config import ProbeConfig

COSINE_OFFSET = 0.008  # s of Nichol & Dhariwal 2021: keeps ab(0) just below 1
LEVEL_FEATURES = 8  # sin/cos pairs of the noise level fed to the net
MIN_VARIANCE = 1e-6  # a dead (constant) channel: its ε is exact, its optimum ~0
# Independent random streams from the one probe.seed (`random_stream`).
INIT_STREAM, TRAIN_STREAM, SCORE_STREAM, SAMPLE_STREAM = STREAMS = range(4)
CPU = torch.device("cpu")  # the probe runs in fp32 on the CPU: the same numbers everywhere


def random_stream(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * len(STREAMS) + stream)


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """The cosine schedule's signal fraction ab(t) for t in [0, 1]: 1 at 0, 0 at 1."""
    s = COSINE_OFFSET
    return (torch.cos((t + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)) ** 2


def level_grid(levels: int) -> torch.Tensor:
    """The scoring grid: the centres of `levels` equal bins of t, avoiding ab = 1 and ab = 0."""
    return (torch.arange(levels, dtype=torch.float32) + 0.5) / levels


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, width), nn.GroupNorm(8, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.level = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        r = self.conv1(F.silu(self.norm1(h))) + self.level(level)[:, :, None, None]
        return h + self.conv2(F.silu(self.norm2(r)))


class Denoiser(nn.Module):
    """Stem, `blocks` residual blocks told the noise level, and a head whose last conv is zero."""

    def __init__(self, channels: int, width: int, blocks: int):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(2 * LEVEL_FEATURES, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(blocks))
        self.norm = nn.GroupNorm(8, width)
        self.head = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * (2.0 ** torch.arange(LEVEL_FEATURES)) * math.pi
        level = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.stem(z)
        for block in self.blocks:
            h = block(h, level)
        return self.head(F.silu(self.norm(h)))


class Probe(nn.Module):
    """The Gaussian posterior mean of ε (per-channel moments of the train latents) plus the net."""

    def __init__(self, cfg: ProbeConfig, mean: torch.Tensor, variance: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().view(1, -1, 1, 1))
        self.register_buffer("variance", variance.float().clamp_min(MIN_VARIANCE).view(1, -1, 1, 1))
        self.net = Denoiser(len(mean), cfg.width, cfg.blocks)

    @classmethod
    def fitted_to(cls, cfg: ProbeConfig, latents: torch.Tensor) -> Probe:
        """A probe at the Gaussian optimum of these (train) latents: the net's output is zero."""
        moments = latents.double().transpose(0, 1).flatten(1)
        with torch.random.fork_rng():
            torch.manual_seed(random_stream(cfg.seed, INIT_STREAM).initial_seed())
            return cls(cfg, moments.mean(1), moments.var(1, correction=0))

    def optimum(self, ab: torch.Tensor) -> torch.Tensor:
        """Per element, the Gaussian posterior's expected squared ε error at signal fraction ab."""
        return ab * self.variance / (ab * self.variance + 1 - ab)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε predicted from x_t at levels t (N,)."""
        ab = alpha_bar(t)[:, None, None, None]
        marginal = ab * self.variance + 1 - ab  # the variance of x_t under the Gaussian model
        z = (noisy - ab.sqrt() * self.mean) / marginal.sqrt()
        gaussian = (1 - ab).sqrt() * z / marginal.sqrt()
        return gaussian + self.optimum(ab).sqrt() * self.net(z, t)

    def normalised_error(
        self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """(N, C, h, w) squared ε errors divided by the optimum: 1 on average at no structure."""
        ab = alpha_bar(t)[:, None, None, None]
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        return (self(noisy, t) - noise).square() / self.optimum(ab)


def train_probe(cfg: ProbeConfig, latents: torch.Tensor) -> tuple[Probe, float]:
    """Train on random latents, levels (uniform in t over the scoring grid's span) and noise; the
    loss is the score's normalised error. Returns the probe and the mean loss of its last tenth."""
    probe = Probe.fitted_to(cfg, latents)
    optimizer = torch.optim.AdamW(probe.net.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.steps, 1))
    generator = random_stream(cfg.seed, TRAIN_STREAM)
    grid = level_grid(cfg.noise_levels)
    low, span = grid[0], grid[-1] - grid[0]
    tail: list[float] = []
    for step in range(cfg.steps):
        rows = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        t = low + span * torch.rand(cfg.batch_size, generator=generator)
        batch = latents[rows]
        noise = torch.randn(batch.shape, generator=generator)
        loss = probe.normalised_error(batch, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step >= cfg.steps - max(1, cfg.steps // 10):
            tail.append(loss.item())
    return probe.eval(), (sum(tail) / len(tail) if tail else math.nan)


@torch.no_grad()
def score(
    probe: Probe, latents: torch.Tensor, cfg: ProbeConfig, batch_size: int = 256
) -> torch.Tensor:
    """(N, levels): each latent's mean normalised error at each grid level, under noise drawn from
    the seed level by level for the whole set, so every candidate is scored on fixed draws."""
    generator = random_stream(cfg.seed, SCORE_STREAM)
    columns = []
    for level in level_grid(cfg.noise_levels):
        noise = torch.randn(latents.shape, generator=generator)
        errors = [
            probe.normalised_error(x, level.expand(len(x)), n).mean(dim=(1, 2, 3))
            for x, n in zip(latents.split(batch_size), noise.split(batch_size), strict=True)
        ]
        columns.append(torch.cat(errors).double())
    return torch.stack(columns, dim=1)


@torch.no_grad()
def sample(probe: Probe, cfg: ProbeConfig, shape: tuple[int, int]) -> torch.Tensor:
    """(sample_images, C, *shape) latents by deterministic DDIM (η = 0) from the Gaussian marginal
    at the grid's noisiest level to the x0 estimate at its cleanest; seeded, so they repeat."""
    generator = random_stream(cfg.seed, SAMPLE_STREAM)
    grid = level_grid(cfg.noise_levels)
    times = torch.linspace(float(grid[-1]), float(grid[0]), cfg.sample_steps)
    ab = alpha_bar(times[0])
    start = torch.randn((cfg.sample_images, probe.mean.shape[1], *shape), generator=generator)
    x = ab.sqrt() * probe.mean + (ab * probe.variance + 1 - ab).sqrt() * start

    def estimate(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = probe(x, t.expand(len(x)))
        return (x - (1 - alpha_bar(t)).sqrt() * eps) / alpha_bar(t).sqrt(), eps

    for t, following in itertools.pairwise(times):
        clean, eps = estimate(t)
        x = alpha_bar(following).sqrt() * clean + (1 - alpha_bar(following)).sqrt() * eps
    return estimate(times[-1])[0]
