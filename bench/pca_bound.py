"""The final autoencoder against the best linear code of its own latent size (issue 19's target).

An autoencoder whose deep branches are zero is exactly its block-PCA shortcut fitted to the
training images (`Autoencoder.init_weights`, `BlockPCA`): the best linear code of that latent.
This prepares the data of a decided repository's `params.yaml`, scores that code on the val
images the way evaluate scores a model (`psnr_pooled`, decoded and clamped to [0, 1]), and
prints it beside the final's `psnr_pooled` from `phases/decisions/final.yaml`.

    .venv/bin/python bench/pca_bound.py build/phase1-demo      # after `make run`
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from aeselect.config import load_config
from aeselect.data.dataset import PreparedData, make_loader, to_model_input
from aeselect.data.prepare import prepare
from aeselect.model.autoencoder import Autoencoder
from aeselect.scoring.metrics import pooled_psnr
from aeselect.sweep.spec import DECISIONS_DIR
from aeselect.training.loop import shortcut_sample


@torch.no_grad()
def block_pca_psnr_pooled(repo: Path) -> tuple[float, str]:
    """The val `psnr_pooled` of the block PCA of `repo`'s params.yaml latent, and that shape."""
    cfg = load_config(repo / "params.yaml")
    if not cfg.model.pca_shortcut:
        raise SystemExit(f"{repo}/params.yaml: model.pca_shortcut is false; nothing to compare")
    with tempfile.TemporaryDirectory() as scratch:
        prepare(cfg, Path(scratch))
        data = PreparedData.load(Path(scratch))
        torch.manual_seed(cfg.train.seed)
        model = Autoencoder(cfg.model, data.aux_classes).eval()
        model.fit_shortcut(shortcut_sample(data))
        errors = []
        for raw_images, raw_targets in make_loader(data.dataset("val"), batch_size=64):
            images, _ = to_model_input(raw_images, raw_targets, torch.device("cpu"))
            latents = model.encode(images)
            decoded = model.decode(latents).clamp(0, 1)
            errors.append(((decoded - images) ** 2).mean(dim=(1, 2, 3)))
        h, w = latents.shape[-2:]
        return pooled_psnr(torch.cat(errors)), f"{h}x{w}x{latents.shape[1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="a repository whose Phase 1 is decided")
    repo = parser.parse_args().repo
    bound, shape = block_pca_psnr_pooled(repo)
    final = yaml.safe_load((repo / DECISIONS_DIR / "final.yaml").read_text())
    achieved = final["metrics"]["psnr_pooled"]
    print(f"latent {shape}: block PCA psnr_pooled {bound:.2f} dB, final {achieved:.2f} dB")
    print(f"final - block PCA: {achieved - bound:+.2f} dB (target >= +1.5 dB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
