"""Each metric on inputs whose answer is known in closed form, computed here independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchmetrics.image import StructuralSimilarityIndexMeasure

from aeselect.config import EvaluateConfig
from aeselect.evaluation.gates import gate_bounds, success_gates
from aeselect.scoring import metrics


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _blocky(seed: int = 0) -> torch.Tensor:
    """(2, 3, 32, 32) images of random 2x2-pixel blocks in [0.25, 0.75]: dense, strong edges."""
    blocks = 0.25 + 0.5 * _rand(2, 3, 16, 16, seed=seed)
    return blocks.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _step(column: int) -> torch.Tensor:
    """(1, 3, 16, 16) grey image: 0.2 left of `column`, 0.8 from it on (a vertical edge)."""
    image = torch.full((1, 3, 16, 16), 0.2)
    image[..., column:] = 0.8
    return image


def test_identical_images_score_perfectly():
    images = _blocky()
    assert torch.equal(metrics.per_image_mse(images, images), torch.zeros(2))
    assert torch.equal(metrics.per_image_mae(images, images), torch.zeros(2))
    assert torch.equal(
        metrics.per_image_psnr(images, images), torch.full((2,), metrics.PSNR_CAP_DB)
    )
    assert torch.equal(metrics.high_frequency_psnr(images, images), torch.full((2,), 100.0))
    assert torch.allclose(metrics.per_image_ssim(images, images), torch.ones(2), atol=1e-5)
    assert torch.equal(metrics.edge_f1(images, images), torch.ones(2))


def test_constant_offset_gives_closed_form_mse_and_psnr():
    images = 0.2 + 0.6 * _rand(3, 3, 16, 16)
    offset = 0.1
    shifted = images + offset
    assert torch.allclose(metrics.per_image_mse(images, shifted), torch.full((3,), offset**2))
    assert torch.allclose(metrics.per_image_mae(images, shifted), torch.full((3,), offset))
    expected_psnr = -10 * math.log10(offset**2)
    assert torch.allclose(metrics.per_image_psnr(images, shifted), torch.full((3,), expected_psnr))


def test_metrics_are_per_image():
    images = _rand(2, 3, 16, 16)
    reconstruction = images.clone()
    reconstruction[1] += 0.05
    assert metrics.per_image_mse(images, reconstruction)[0] == 0
    assert metrics.per_image_psnr(images, reconstruction)[0] == metrics.PSNR_CAP_DB
    assert metrics.per_image_psnr(images, reconstruction)[1] == pytest.approx(26.0206, abs=1e-3)


def test_pooled_psnr_is_the_psnr_of_the_set_mse_not_the_mean_of_per_image_psnr():
    images = torch.full((2, 3, 16, 16), 0.5)
    reconstruction = images + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)  # MSE 1e-2 and 1e-4
    per_image = metrics.per_image_psnr(images, reconstruction)
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert float(per_image.mean()) == pytest.approx(30.0, abs=1e-3)
    # Pooled: one MSE over all pixels, (1e-2 + 1e-4) / 2, so the bad image dominates.
    pooled = metrics.pooled_psnr(metrics.per_image_mse(images, reconstruction))
    assert pooled == pytest.approx(-10 * math.log10((1e-2 + 1e-4) / 2), abs=1e-3)
    assert pooled == pytest.approx(22.967, abs=1e-3)
    assert metrics.pooled_psnr(torch.zeros(3)) == metrics.PSNR_CAP_DB


def _wang_ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM of Wang et al. 2004 written out: 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03, data range 1, in float64; the mean over every pixel, with the windows at the border
    reflect-padded (torchmetrics' convention; Wang's own code averages inner windows only)."""
    offsets = torch.arange(11, dtype=torch.float64) - 5
    gauss = torch.exp(-(offsets**2) / (2 * 1.5**2))
    gauss /= gauss.sum()
    window = (gauss[:, None] * gauss[None, :]).expand(3, 1, 11, 11)

    def local_mean(t):
        return nn.functional.conv2d(nn.functional.pad(t, (5, 5, 5, 5), "reflect"), window, groups=3)

    x, y = original.double(), reconstruction.double()
    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mean_x**2
    var_y = local_mean(y * y) - mean_y**2
    cov = local_mean(x * y) - mean_x * mean_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1)


def test_ssim_is_the_standard_definition_and_torchmetrics_default():
    images = _blocky()
    blurred = TF.gaussian_blur(images, kernel_size=[5, 5], sigma=[1.0, 1.0])
    ssim = metrics.per_image_ssim(images, blurred)
    assert ssim.tolist() == pytest.approx(_wang_ssim(images, blurred).tolist(), abs=1e-5)
    default = StructuralSimilarityIndexMeasure(data_range=1.0)(blurred, images)
    assert float(ssim.mean()) == pytest.approx(float(default), abs=1e-6)
    # The standard window is 11 px: a 12 px image still gets a value.
    assert metrics.per_image_ssim(images[..., :12, :12], blurred[..., :12, :12]).shape == (2,)


def test_blur_is_punished_by_detail_metrics_but_a_colour_shift_of_equal_mse_is_not():
    images = _blocky()
    blurred = TF.gaussian_blur(images, kernel_size=[9, 9], sigma=[1.5, 1.5])
    # A uniform brightness shift with exactly the blur's per-image MSE, so plain PSNR ties.
    offset = (blurred - images).square().flatten(1).mean(1).sqrt()
    shifted = images + offset.view(-1, 1, 1, 1)

    psnr_blur = metrics.per_image_psnr(images, blurred)
    psnr_shift = metrics.per_image_psnr(images, shifted)
    assert torch.allclose(psnr_blur, psnr_shift, atol=1e-3)

    hf_blur = metrics.high_frequency_psnr(images, blurred)
    hf_shift = metrics.high_frequency_psnr(images, shifted)
    assert torch.all(hf_shift - hf_blur > 30.0)

    assert torch.equal(metrics.edge_f1(images, shifted), torch.ones(2))
    assert torch.all(metrics.edge_f1(images, blurred) < 0.6)
    assert torch.all(metrics.per_image_ssim(images, blurred) < 0.8)


def test_edge_f1_tolerates_a_one_pixel_shift_only_with_tolerance():
    original, moved = _step(8), _step(9)
    # Sobel marks the two columns either side of a step: {7, 8} and {8, 9}. Exact matching
    # shares column 8 only, so precision = recall = 1/2; within 1 px every edge pixel matches.
    assert metrics.edge_f1(original, moved, tolerance_px=0).item() == pytest.approx(0.5)
    assert metrics.edge_f1(original, moved, tolerance_px=1).item() == 1.0
    assert metrics.edge_f1(original, _step(11), tolerance_px=1).item() == 0.0


def test_edge_f1_without_edges():
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert metrics.edge_f1(flat, flat).item() == 1.0
    assert metrics.edge_f1(flat, _step(8)).item() == 0.0
    assert metrics.edge_f1(_step(8), flat).item() == 0.0


def test_percentiles_match_numpy():
    values = _rand(101) * 10
    expected = np.percentile(values.numpy(), [5, 50, 95])
    result = metrics.percentiles(values)
    assert list(result) == ["p5", "p50", "p95"]
    assert list(result.values()) == pytest.approx(expected.tolist(), rel=1e-6)
    assert metrics.percentiles(values, qs=(2.5,)) == {
        "p2.5": pytest.approx(np.percentile(values, 2.5))
    }


def _one_hot_logits(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    return nn.functional.one_hot(preds, num_classes).permute(0, 3, 1, 2).float()


SEG_TARGETS = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])


def _aux(task, num_classes, *batches):
    score = metrics.AuxScore(num_classes, task)
    for preds, targets in batches:
        score.update(_one_hot_logits(preds, num_classes), targets)
    return score.compute()


def test_segmentation_metrics_perfect_and_half_wrong():
    perfect = _aux("segmentation", 3, (SEG_TARGETS, SEG_TARGETS))
    assert perfect == {"aux_pixel_acc": 1.0, "aux_miou": 1.0}

    # Everything predicted as class 0: half the pixels wrong. IoU(0) = 4 / 8, IoU(1) = 0;
    # class 2 is in neither map and is left out of the mean: (0.5 + 0) / 2.
    half = _aux("segmentation", 3, (torch.zeros_like(SEG_TARGETS), SEG_TARGETS))
    assert half == {"aux_pixel_acc": 0.5, "aux_miou": pytest.approx(0.25)}


def test_aux_score_accumulates_over_batches_at_dataset_level():
    """Unequal batches, one perfect and one all wrong: pixel-weighted, not a batch mean."""
    big = torch.ones(1, 2, 4).long()
    small = torch.tensor([[[1, 1]]])
    result = _aux("segmentation", 2, (big, big), (torch.zeros_like(small), small))
    assert result["aux_pixel_acc"] == pytest.approx(8 / 10)


def test_edge_aux_metrics():
    targets = torch.tensor([[[1, 1, 0, 0]]])
    preds = torch.tensor([[[1, 0, 1, 0]]])
    # tp = 1, fp = 1, fn = 1: F1 = 2 / (2 + 1 + 1); two of four pixels right.
    assert _aux("edges", 2, (preds, targets)) == {
        "aux_pixel_acc": 0.5,
        "aux_f1": pytest.approx(0.5),
    }


@pytest.mark.parametrize(("num_classes", "task"), [(2, "depth"), (3, "edges")])
def test_aux_score_rejects_bad_task(num_classes, task):
    with pytest.raises(ValueError, match=r"edge|task"):
        metrics.AuxScore(num_classes, task)


def test_latent_statistics_on_constant_channels():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    latents = torch.tensor(values, dtype=torch.float32).view(1, 4, 1, 1).expand(2, 4, 3, 3)
    stats = metrics.latent_statistics(latents, image_size=12)
    assert stats["channel_mean"] == pytest.approx(values.tolist())
    assert stats["channel_std"] == pytest.approx([0.0] * 4)
    assert stats["std"] == pytest.approx(np.std(values))
    assert stats["scale_factor"] == pytest.approx(1 / np.std(values))
    assert stats["elements_per_image"] == 4 * 3 * 3
    assert stats["compression_ratio"] == pytest.approx(3 * 12 * 12 / 36)
    wide = metrics.latent_statistics(latents, image_size=(12, 24))
    assert wide["compression_ratio"] == pytest.approx(3 * 12 * 24 / 36)


def test_noise_robustness_with_an_identity_decoder():
    latents = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    offset = 0.2
    images = latents + offset  # so the clean PSNR is finite: MSE = offset^2
    rel_sigma = 0.2
    sigma = rel_sigma * latents.numpy().std()
    # Noise independent of the constant offset: MSE ~ offset^2 + sigma^2, to about 1 % at
    # 16k elements per image, i.e. within 0.05 dB.
    expected = 10 * math.log10((offset**2 + sigma**2) / offset**2)
    drop = metrics.noise_robustness(lambda z: z, latents, images, rel_sigma=rel_sigma)
    assert drop.shape == (2,)
    assert drop.tolist() == pytest.approx([expected] * 2, abs=0.15)
    assert torch.equal(drop, metrics.noise_robustness(lambda z: z, latents, images, rel_sigma))
    assert torch.equal(
        metrics.noise_robustness(lambda z: z, latents, images, rel_sigma=0.0), torch.zeros(2)
    )


def test_interpolation_quality_is_one_for_a_linear_decoder():
    a, b = _rand(2, 3, 4, 4, seed=1), _rand(2, 3, 4, 4, seed=2)
    ratio = metrics.interpolation_quality(lambda z: 2.0 * z + 0.1, a, b)
    assert torch.allclose(ratio, torch.ones(2))


def test_interpolation_quality_measures_the_detour():
    def decode(z):  # (N, 1, h, w) -> (N, 3, h, w): the curve t -> (t, t^2, t)
        return torch.cat([z, z**2, z], dim=1)

    a, b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    start, mid, end = (np.array([t, t**2, t]) for t in (0.0, 0.5, 1.0))
    path = np.linalg.norm(mid - start) + np.linalg.norm(end - mid)
    expected = path / np.linalg.norm(end - start)
    assert metrics.interpolation_quality(decode, a, b).item() == pytest.approx(expected)
    assert expected > 1.01


def test_measure_throughput_counts_images():
    calls = []
    rate = metrics.measure_throughput(calls.append, torch.zeros(4, 3, 8, 8), repeats=3)
    assert len(calls) == 2 + 3  # Timer's warm-up, then the timed calls
    assert rate > 0


def test_peak_memory_on_cpu_is_flagged_approximate():
    with metrics.peak_memory("cpu") as peak:
        torch.ones(1024, 1024).sum()
    assert peak.approximate
    assert peak.bytes >= 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_sees_an_allocation():
    with metrics.peak_memory("cuda") as peak:
        block = torch.empty(1024, 1024, device="cuda")
        del block
    assert not peak.approximate
    assert peak.bytes >= 4 * 1024 * 1024


def test_training_stability_finds_the_spike_and_the_nan():
    losses = [1.0] * 10 + [5.0] + [1.0] * 5 + [float("nan")] + [1.0] * 3 + [float("inf")]
    result = metrics.training_stability(losses, [0.1, 0.08, 0.06, 0.05, 0.04])
    assert result["nonfinite_count"] == 2
    # The EMA of ten losses of 1.0 is 1.0, so the spike is 5x; later ratios are below that.
    assert result["max_spike_ratio"] == pytest.approx(5.0)
    assert result["val_still_improving"] is True


@pytest.mark.parametrize(
    ("val_mse", "improving"),
    [
        ([0.1, 0.05, 0.05, 0.0499, 0.0498], False),  # last two beat the best by < 1 %
        ([0.1, 0.05, 0.05, 0.049, 0.06], True),  # 0.049 < 0.99 * 0.05
        ([0.1, 0.05], True),  # too few evaluations to call it converged
    ],
)
def test_val_still_improving_rule(val_mse, improving):
    assert metrics.training_stability([1.0, 1.0], val_mse)["val_still_improving"] is improving


def test_spike_ratio_is_nan_without_two_finite_losses():
    assert math.isnan(metrics.training_stability([1.0, float("nan")], [0.1])["max_spike_ratio"])


BOUNDARY = {  # every gate's metric exactly at its bound in THRESHOLDS
    "mse": 0.01,
    "psnr": 20.0,
    "latent.compression_ratio": 24.0,
    "stability.max_spike_ratio": 3.0,
    "stability.nonfinite_count": 0,
}
THRESHOLDS = EvaluateConfig(
    max_mse=0.01, min_psnr=20.0, min_compression_ratio=24.0, max_spike_ratio=3.0
)


def test_gates_pass_exactly_at_the_thresholds():
    gates = success_gates(BOUNDARY, THRESHOLDS)
    assert gates == dict.fromkeys(
        ["pass_mse", "pass_psnr", "pass_latent_size", "pass_stability", "pass_all"], True
    )


@pytest.mark.parametrize(
    ("key", "value", "gate"),
    [
        ("mse", 0.0101, "pass_mse"),
        ("mse", float("nan"), "pass_mse"),
        ("psnr", 19.99, "pass_psnr"),
        ("latent.compression_ratio", 23.99, "pass_latent_size"),
        ("stability.max_spike_ratio", 3.01, "pass_stability"),
        ("stability.max_spike_ratio", float("nan"), "pass_stability"),
        ("stability.nonfinite_count", 1, "pass_stability"),
    ],
)
def test_gates_fail_just_past_a_threshold(key, value, gate):
    gates = success_gates({**BOUNDARY, key: value}, THRESHOLDS)
    assert gates[gate] is False
    assert gates["pass_all"] is False
    assert sum(gates.values()) == 3  # the other three gates still pass


def test_gate_bounds_come_from_the_evaluate_config_and_print_their_comparison():
    bounds = gate_bounds(THRESHOLDS)
    assert [str(b) for gate in bounds.values() for b in gate] == [
        "mse <= 0.01",
        "psnr >= 20",
        "latent.compression_ratio >= 24",
        "stability.nonfinite_count <= 0",
        "stability.max_spike_ratio <= 3",
    ]
    assert set(BOUNDARY) == {b.metric for gate in bounds.values() for b in gate}
