"""Model shapes for every phase configuration, the variational/deterministic contract, and the
two init/normalisation choices that decide whether the demo's small models learn at all."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from aeselect.config import from_dict
from aeselect.model import Autoencoder, DiagonalGaussian, count_parameters
from aeselect.model.autoencoder import ResBlock, group_norm

# (image_size, downsampling_steps, latent_channels, base_channels, variational): Phase 1's sweeps
# at demo scale, plus the 512px shapes of phase 1.2 checked on the encoder arithmetic alone.
PHASE_CONFIGS = [
    (64, 3, 4, 32, False),
    (64, 3, 8, 32, False),
    (64, 3, 16, 32, False),
    (64, 3, 8, 16, False),
    (64, 3, 8, 64, False),
    (64, 4, 8, 32, False),
    (64, 5, 8, 32, False),
    (64, 3, 4, 32, True),
    (32, 3, 4, 16, True),
]


def build(image_size, steps, latent, base, variational, aux_classes=5, blocks=1, pca=False):
    cfg = from_dict(
        {
            "data": {"image_size": image_size},
            "model": {
                "downsampling_steps": steps,
                "latent_channels": latent,
                "base_channels": base,
                "variational": variational,
                "num_res_blocks": blocks,
                "pca_shortcut": pca,
            },
        }
    )
    return cfg, Autoencoder(cfg.model, aux_classes)


@pytest.mark.parametrize(("size", "steps", "latent", "base", "variational"), PHASE_CONFIGS)
def test_shapes(size, steps, latent, base, variational):
    cfg, model = build(size, steps, latent, base, variational)
    images = torch.rand(2, 3, size, size)
    model.train()
    out = model(images, generator=torch.Generator().manual_seed(0))
    h, w, c = cfg.latent_shape
    assert out.latent.shape == (2, c, h, w)
    assert out.reconstruction.shape == images.shape
    assert out.aux_logits.shape == (2, 5, size, size)
    assert (out.mean is not None) == variational
    assert model.encode(images).shape == (2, c, h, w)
    assert model.decode(model.encode(images)).shape == images.shape


@pytest.mark.parametrize(("steps", "latent_hw"), [(3, 64), (4, 32), (5, 16)])
def test_phase_1_2_latents_at_512px(steps, latent_hw):
    cfg, model = build(512, steps, 4, 8, False, blocks=1)
    assert cfg.latent_shape == (latent_hw, latent_hw, 4)
    with torch.no_grad():
        assert model.encode(torch.rand(1, 3, 512, 512)).shape == (1, 4, latent_hw, latent_hw)


def test_variational_samples_in_training_and_uses_the_mean_in_eval():
    _, model = build(32, 3, 4, 16, True)
    images = torch.rand(2, 3, 32, 32)
    model.train()
    a = model(images, generator=torch.Generator().manual_seed(1)).latent
    b = model(images, generator=torch.Generator().manual_seed(2)).latent
    c = model(images, generator=torch.Generator().manual_seed(1)).latent
    assert not torch.allclose(a, b)
    assert torch.equal(a, c)
    model.eval()
    with torch.no_grad():
        out = model(images)
        assert torch.equal(out.latent, out.mean)
        assert torch.equal(out.latent, model.encode(images))


def test_more_base_channels_means_more_parameters():
    counts = [
        sum(p.numel() for p in build(64, 3, 8, base, False)[1].parameters())
        for base in (16, 32, 64)
    ]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize("channels", [8, 16, 32, 64, 128])
def test_group_norm_keeps_each_images_channel_means(channels):
    """Spatially constant channels with distinct values survive the norm (instance norm, one
    channel per group, maps them all to zero: the colour of a flat region would be lost)."""
    features = (
        torch.arange(channels, dtype=torch.float32)
        .view(1, channels, 1, 1)
        .expand(1, channels, 8, 8)
    )
    assert group_norm(channels)(features).abs().mean() > 0.5


def test_a_new_models_res_blocks_are_the_identity_or_their_shortcut():
    """Residual branches start at zero, so a new network is shallow from latent to pixels."""
    torch.manual_seed(0)
    _, model = build(32, 3, 4, 8, False)
    blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert len(blocks) >= 8
    for block in blocks:
        x = torch.randn(2, block.conv1.in_channels, 8, 8)
        with torch.no_grad():
            assert torch.equal(block(x), block.shortcut(x))


def test_convs_start_variance_preserving_outside_the_residual_ends():
    """Every encoder/decoder conv but a residual branch's last starts at He's fan-in scale (weight
    std 1/sqrt(fan_in)), not PyTorch's default (1/sqrt(3 fan_in)), which left the demo's models
    reconstructing in grey; the residual ends stay exactly zero."""
    torch.manual_seed(0)
    _, model = build(64, 3, 8, 32, False)
    ends = {id(m.conv2) for m in model.modules() if isinstance(m, ResBlock)}
    convs = [
        m for m in (*model.encoder.modules(), *model.decoder.modules()) if isinstance(m, nn.Conv2d)
    ]
    for conv in convs:
        if id(conv) in ends:
            assert not conv.weight.any() and not conv.bias.any()
            continue
        fan_in = conv.weight[0].numel()
        if conv.weight.numel() >= 1000:  # enough weights for a std within 15%
            assert conv.weight.std().item() == pytest.approx(fan_in**-0.5, rel=0.15)
        assert not conv.bias.any()
    assert sum(id(conv) not in ends for conv in convs) >= 10


def _kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return DiagonalGaussian(mean, logvar).kl()


def test_gaussian_kld_closed_form():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.allclose(_kl(zeros, zeros), torch.zeros(2), atol=1e-7)

    mean = torch.zeros(2, 4, 3, 3)
    mean[0] = 2.0
    mean[1, :2] = 2.0  # half the elements of image 1
    # KL(N(m, 1) || N(0, 1)) = m^2 / 2 per element, averaged per image.
    assert torch.allclose(_kl(mean, zeros), torch.tensor([2.0, 1.0]))

    logvar = torch.full((1, 4, 3, 3), math.log(0.25))
    expected = 0.5 * (0.25 - 1.0 - math.log(0.25))
    assert _kl(torch.zeros_like(logvar), logvar).item() == pytest.approx(expected)


def test_gaussian_kld_propagates_nan_instead_of_raising():
    logvar = torch.full((1, 1, 2, 2), float("nan"))
    assert torch.isnan(_kl(torch.zeros_like(logvar), logvar)).all()


def test_count_parameters():
    assert count_parameters(nn.Linear(3, 2)) == 3 * 2 + 2


def smooth_images(count, size, seed=0):
    """Low-frequency colour images in [0, 1]: a few latent channels explain most of each patch."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")


def block_pca_error(images, factor, kept):
    """Reference: val MSE of the best linear code of `kept` numbers per factor x factor patch,
    fitted to the same images (numpy SVD of the centred patch matrix)."""
    x = images.double() * 2 - 1
    patches = (
        nn.functional.pixel_unshuffle(x, factor).permute(0, 2, 3, 1).reshape(-1, 3 * factor**2)
    )
    centred = (patches - patches.mean(0)).numpy()
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:kept]
    residual = centred - centred @ basis.T @ basis
    return float((residual**2).mean()) / 4  # [-1, 1] -> [0, 1] scale


@pytest.mark.parametrize(("steps", "latent", "variational"), [(3, 4, False), (2, 8, True)])
def test_a_fitted_shortcut_starts_the_model_at_the_block_pca(steps, latent, variational):
    _, model = build(32, steps, latent, 16, variational, pca=True)
    images = smooth_images(24, 32)
    model.fit_shortcut([images[:16], images[16:]])
    model.eval()
    with torch.no_grad():
        reconstruction = model(images).reconstruction
    mse = float(((reconstruction.double() - images.double()) ** 2).mean())
    assert mse == pytest.approx(block_pca_error(images, 2**steps, latent), rel=1e-4)
    assert mse < 0.2 * float(images.var())  # the code carries the images, not their mean


def test_the_shortcut_fit_is_reproducible_and_keeps_extra_channels_at_zero():
    # A 2x2x3 patch has 12 dimensions: channels 12-15 of a 16-channel latent get no component.
    images = smooth_images(8, 16, seed=1)
    fits = []
    for _ in range(2):
        _, model = build(16, 1, 16, 8, False, pca=True)
        model.fit_shortcut([images])
        fits.append(model.shortcut.state_dict())
    for key in fits[0]:
        assert torch.equal(fits[0][key], fits[1][key])
    assert torch.count_nonzero(fits[0]["to_latent.weight"][12:]) == 0
    assert torch.count_nonzero(fits[0]["to_latent.weight"][:12]) > 0


def test_a_shortcut_model_starts_as_its_shortcut_with_the_plain_models_other_weights():
    """With a shortcut the deep networks' last convs start at zero (the model is the block code
    alone, zero until fitted); every other weight is the plain model's of the same seed, so
    model.pca_shortcut alone differs between the two."""
    torch.manual_seed(0)
    _, plain = build(32, 3, 4, 16, False)
    torch.manual_seed(0)
    _, with_shortcut = build(32, 3, 4, 16, False, pca=True)
    starts_at_zero = {"encoder.conv_out", "decoder.conv_out", "shortcut.to_latent"}
    starts_at_zero |= {"shortcut.to_patches"}
    plain_weights = plain.state_dict()
    for key, value in with_shortcut.state_dict().items():
        if key.rsplit(".", 1)[0] in starts_at_zero:
            assert not value.any(), key
        else:
            assert torch.equal(value, plain_weights[key]), key
    assert plain.encoder.conv_out.weight.any() and plain.decoder.conv_out.weight.any()
    images = smooth_images(2, 32)
    with torch.no_grad():
        assert not with_shortcut.eval()(images).reconstruction.sub(0.5).any()
    with pytest.raises(ValueError, match="pca_shortcut is false"):
        plain.fit_shortcut([images])


def test_a_posterior_sample_is_mean_plus_std_times_the_generators_noise():
    mean = torch.randn(3, 2, 4, 4)
    logvar = torch.full_like(mean, math.log(0.25))
    sample = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(3))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample, mean + 0.5 * noise)
    # A slice of a batch of 5 (rows 1..3) gets those rows of the whole batch's noise.
    rows = DiagonalGaussian(mean, logvar).sample(torch.Generator().manual_seed(3), rows=(1, 5))
    whole = torch.randn((5, *mean.shape[1:]), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(rows, mean + 0.5 * whole[1:4])
