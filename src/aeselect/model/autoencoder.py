"""A configurable convolutional autoencoder in the style of latent-diffusion's Encoder/Decoder.

Images enter and leave in [0, 1]; the network works on [-1, 1] internally (as SD's VAE does).
The channel schedule is derived from `model.downsampling_steps` (see ModelConfig.channel_schedule)
so a phase can change the number of steps alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from aeselect.config import ModelConfig

LOGVAR_RANGE = (-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution


MIN_CHANNELS_PER_GROUP = 4


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups (SD's), each of at least MIN_CHANNELS_PER_GROUP channels.

    One channel per group is instance norm, which makes a layer blind to each channel's mean
    and scale over the image: the network then cannot carry an image's colour past it and
    smuggles it through spikes instead (StyleGAN2's droplets), seen as colour casts, dots at
    fixed positions and a frame along the border at the demo's narrow widths (16 channels).
    """
    groups = math.gcd(32, max(1, channels // MIN_CHANNELS_PER_GROUP))
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(*convs: nn.Conv2d) -> None:
    """Weights and biases to zero: the layer adds nothing until training moves it."""
    for conv in convs:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a 1x1 shortcut when the width changes. In an
    Autoencoder the residual branch starts at zero (`conv2`, see Autoencoder.init_weights)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv with SD's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class BlockPCA(nn.Module):
    """A linear block code beside the deep networks: each f x f x 3 patch <-> C latent numbers.

    It starts at zero; `fit` sets it to the training images' block PCA, the best linear code of
    the latent's size. As the deep encoder's and decoder's last convs start at zero beside it
    (Autoencoder.init_weights), a new autoencoder then reconstructs exactly as well as that code
    and the deep networks learn only what a linear code cannot. Trained from scratch, every demo
    model stayed below this code at the demo's compute, and the latent's size did not show in
    its MSE (README, "The block-PCA shortcut", with the measurements).
    """

    def __init__(self, factor: int, latent_channels: int):
        super().__init__()
        self.factor = factor
        self.to_latent = nn.Conv2d(3 * factor * factor, latent_channels, 1)
        self.to_patches = nn.Conv2d(latent_channels, 3 * factor * factor, 1)
        zero_init(self.to_latent, self.to_patches)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(F.pixel_unshuffle(x, self.factor))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.to_patches(z), self.factor)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Principal components of the patches of `batches` ((N, 3, H, W) in [-1, 1]), in float64;
        each component's sign is fixed (largest entry positive) so the fit is reproducible."""
        dim, wanted = self.to_latent.in_channels, self.to_latent.out_channels
        total = torch.zeros(dim, dtype=torch.float64)
        outer = torch.zeros(dim, dim, dtype=torch.float64)
        count = 0
        for batch in batches:
            patches = F.pixel_unshuffle(batch.double().cpu(), self.factor)
            patches = patches.permute(0, 2, 3, 1).reshape(-1, dim)
            total += patches.sum(0)
            outer += patches.T @ patches
            count += len(patches)
        mean = total / count
        _, vectors = torch.linalg.eigh(outer / count - torch.outer(mean, mean))
        components = vectors.flip(1)[:, :wanted].T  # (kept, dim), largest variance first
        largest = components.gather(1, components.abs().argmax(1, keepdim=True))
        components = (components * torch.sign(largest)).float()
        kept = len(components)  # a latent wider than a patch keeps its extra channels at zero
        zero_init(self.to_latent, self.to_patches)
        self.to_latent.weight[:kept, :, 0, 0] = components
        self.to_latent.bias[:kept] = -(components @ mean.float())
        self.to_patches.weight[:, :kept, 0, 0] = components.T
        self.to_patches.bias.copy_(mean.float())


def _stage(in_channels: int, out_channels: int, num_blocks: int) -> list[nn.Module]:
    return [
        ResBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(num_blocks)
    ]


class Encoder(nn.Module):
    """stem -> per level: res blocks (+ stride-2 conv except at the last level) -> mid -> latent."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = cfg.channel_schedule()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        previous = widths[0]
        for level, width in enumerate(widths):
            layers += _stage(previous, width, cfg.num_res_blocks)
            previous = width
            if level < cfg.downsampling_steps:
                layers.append(Downsample(width))
        layers.append(ResBlock(previous, previous))  # mid block
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(previous)
        moments = 2 if cfg.variational else 1
        self.conv_out = nn.Conv2d(previous, moments * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.stem(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """The encoder mirrored: latent -> mid -> per level: res blocks (+ upsample) -> RGB."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        widths = list(reversed(cfg.channel_schedule()))
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = [ResBlock(widths[0], widths[0])]  # mid block
        previous = widths[0]
        for level, width in enumerate(widths):
            layers += _stage(previous, width, cfg.num_res_blocks)
            previous = width
            if level < cfg.downsampling_steps:
                layers.append(Upsample(width))
        self.body = nn.Sequential(*layers)
        self.norm_out = group_norm(previous)
        self.conv_out = nn.Conv2d(previous, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))


class AuxHead(nn.Module):
    """Per-pixel class logits at full resolution, predicted from the latent alone.

    Deliberately small, so the auxiliary loss shapes the latent (it must carry the layout a
    ControlNet will condition on) instead of the head doing the work.
    """

    def __init__(self, latent_channels: int, hidden: int, num_classes: int, scale: int):
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, hidden, 3, padding=1),
            group_norm(hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, num_classes, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.net(z)
        return F.interpolate(logits, scale_factor=float(self.scale), mode="bilinear")


@dataclass(frozen=True)
class DiagonalGaussian:
    """A VAE's posterior N(mean, exp(logvar)) per latent element (diffusers'
    DiagonalGaussianDistribution): it owns its KL, so the loss and the metrics share one rule."""

    mean: torch.Tensor  # (N, C, h, w)
    logvar: torch.Tensor  # (N, C, h, w), clamped to LOGVAR_RANGE by the encoder

    def kl(self) -> torch.Tensor:
        """(N,) KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged over (C, h, w).

        Averaged, not summed as in SD's VAE, so `loss.kl_weight` means the same for every latent
        size; the batch mean of this is the training loss's KL term. Arguments are not validated,
        so a diverged run yields NaN here instead of an exception.
        """
        posterior = Normal(
            self.mean.float(), torch.exp(0.5 * self.logvar.float()), validate_args=False
        )
        prior = Normal(torch.zeros_like(posterior.loc), torch.ones_like(posterior.scale))
        return kl_divergence(posterior, prior).flatten(1).mean(dim=1)

    def sample(
        self, generator: torch.Generator | None, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """mean + std * noise, the noise drawn from `generator` (explicit, so sampling follows
        the training seed). `rows` = (first row, size of the whole batch) when this posterior is
        one DDP rank's slice of a batch: the whole batch's noise is drawn and this slice kept, so
        each row gets the noise the unsplit batch would give it."""
        first, total = rows or (0, len(self.mean))
        noise = torch.randn(
            (total, *self.mean.shape[1:]),
            generator=generator,
            device=self.mean.device,
            dtype=self.mean.dtype,
        )[first : first + len(self.mean)]
        return self.mean + torch.exp(0.5 * self.logvar) * noise


@dataclass
class AutoencoderOutput:
    reconstruction: torch.Tensor  # (N, 3, H, W), [0, 1] scale (not clamped while training)
    latent: torch.Tensor  # (N, C, h, w): the sample in training, the mean at evaluation
    aux_logits: torch.Tensor  # (N, K, H, W)
    mean: torch.Tensor | None  # variational only
    logvar: torch.Tensor | None  # variational only

    @property
    def posterior(self) -> DiagonalGaussian | None:
        """The posterior of a variational model; None for a deterministic one."""
        if self.mean is None or self.logvar is None:
            return None
        return DiagonalGaussian(self.mean, self.logvar)


class Autoencoder(nn.Module):
    def __init__(self, cfg: ModelConfig, aux_classes: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # The global generator's draws, and so every weight a seed gives, come in this order: the
        # deep networks (built, then init_weights), then the aux head, then the shortcut.
        self.init_weights()
        self.aux_head = AuxHead(  # PyTorch's default init
            cfg.latent_channels, cfg.aux_hidden_channels, aux_classes, 2**cfg.downsampling_steps
        )
        self.shortcut = (  # zero until fit_shortcut
            BlockPCA(2**cfg.downsampling_steps, cfg.latent_channels) if cfg.pca_shortcut else None
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        """The deep encoder's and decoder's start, in this order (the README's "Why the residual
        branches start at zero", "Colour, and why the convs are He-initialised" and "The block-PCA
        shortcut" have the measurements):

        1. Each conv, in module order: a residual branch's last conv (ResBlock.conv2) zero, as in
           guided-diffusion, so a new network is a shallow path from input to output (else the
           deeper models collapse to the mean image); every other conv He-initialised (fan-in,
           unit gain; bias zero). PyTorch's default scales each conv's output by about
           1/sqrt(3), so the ~10 convs outside the residual branches would start as a deep linear
           map that shrinks its input ~200x, whose weak directions (colour) wait on long plateaus.
        2. With a block-PCA shortcut, the deep encoder's and decoder's last convs then zero: the
           model starts as the shortcut alone (its block PCA once fitted), and the networks learn
           what that code misses. Zeroed after their He draw, so that every other weight is the
           one the same seed gives the model without a shortcut.
        """
        residual_ends = {block.conv2 for block in self.modules() if isinstance(block, ResBlock)}
        for network in (self.encoder, self.decoder):
            for conv in network.modules():
                if not isinstance(conv, nn.Conv2d):
                    continue
                if conv in residual_ends:
                    zero_init(conv)
                else:
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="linear")
                    nn.init.zeros_(conv.bias)
        if self.cfg.pca_shortcut:
            zero_init(self.encoder.conv_out, self.decoder.conv_out)

    @torch.no_grad()
    def fit_shortcut(self, images: Iterable[torch.Tensor]) -> None:
        """Set the shortcut to the block PCA of `images` ((N, 3, H, W) batches in [0, 1])."""
        if self.shortcut is None:
            raise ValueError("model.pca_shortcut is false: this model has no shortcut to fit")
        self.shortcut.fit(batch * 2.0 - 1.0 for batch in images)

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, logvar) for a variational model, (latent, None) for a deterministic one."""
        x = images * 2.0 - 1.0
        h = self.encoder(x)
        mean, logvar = h.chunk(2, dim=1) if self.cfg.variational else (h, None)
        if self.shortcut is not None:
            mean = mean + self.shortcut.encode(x)
        return mean, None if logvar is None else logvar.clamp(*LOGVAR_RANGE)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (the posterior mean for a VAE), as a diffusion model would use."""
        return self.encode_moments(images)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        h = self.decoder(latents)
        if self.shortcut is not None:
            h = h + self.shortcut.decode(latents)
        return h * 0.5 + 0.5

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        rows: tuple[int, int] | None = None,
    ) -> AutoencoderOutput:
        """In training a VAE's latent is a posterior sample (`generator`, `rows`: see
        DiagonalGaussian.sample); otherwise, and always for a deterministic model, the mean."""
        mean, logvar = self.encode_moments(images)
        latent = mean
        if logvar is not None and self.training:
            latent = DiagonalGaussian(mean, logvar).sample(generator, rows)
        return AutoencoderOutput(
            reconstruction=self.decode(latent),
            latent=latent,
            aux_logits=self.aux_head(latent),
            mean=mean if logvar is not None else None,
            logvar=logvar,
        )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
