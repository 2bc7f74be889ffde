"""The hand-off to Phase 2: the chosen autoencoder as an encoder/decoder in diffusion units.

Phase 2 trains on `encode(images)`: latents already multiplied by the scale factor, so they have
about unit std (SD's 0.18215 convention), and `decode` divides it out again. The factor is a
property of the trained weights measured on data (1 / std of the validation latents, as the
evaluate stage logs it), so `export_autoencoder` stores it inside the one file Phase 2 loads:
weights and factor can then never come from different runs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch

from aeselect.config import Config
from aeselect.model import Autoencoder
from aeselect.model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from aeselect.paths import EVALUATE_METRICS, EXPORT_PATH

HOW_TO_GET = (
    "`dvc exp run` produces it, `dvc pull` fetches it in a fresh clone, and rev= reads it from "
    "a Git revision or DVC experiment"
)


class PhaseTwoAutoencoder:
    """A frozen encoder/decoder: images in [0, 1] <-> scaled latents of about unit std.

    Runs under `torch.no_grad`, not inference mode: inference tensors cannot be saved for
    backward, and these latents feed Phase 2's training graphs.
    """

    def __init__(self, model: Autoencoder, config: Config, scale_factor: float):
        self.model = model.eval()
        self.config = config
        self.scale_factor = scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Latent (H, W, C) of one image at the trained `data.image_size`."""
        return self.config.latent_shape

    def latent_shape_for(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """Latent (H, W, C) at another size: the network is fully convolutional."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        factor = 2**self.config.model.downsampling_steps
        if height % factor or width % factor:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of {factor} "
                f"(2^model.downsampling_steps); crop or pad to a multiple of {factor}"
            )
        return (height // factor, width // factor, self.config.model.latent_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) floats in [0, 1] -> (N, C, h, w) scaled latents (a VAE's posterior mean)."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"expected float images (N, 3, H, W) in [0, 1], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        self.latent_shape_for((images.shape[2], images.shape[3]))
        return self.model.encode(images.to(self.device, torch.float32)) * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) scaled latents -> (N, 3, H, W) images clamped to [0, 1]."""
        latents = latents.to(self.device, torch.float32) / self.scale_factor
        return self.model.decode(latents).clamp(0, 1)


def load_autoencoder(
    path: str | Path = EXPORT_PATH,
    *,
    rev: str | None = None,
    repo: str | Path = ".",
    scale_factor: float | None = None,
    device: str | torch.device = "cpu",
) -> PhaseTwoAutoencoder:
    """Load the exported autoencoder, or any checkpoint with an explicit `scale_factor`.

    `path` is relative to `repo`. With `rev` (a Git revision or DVC experiment name) the file is
    read through `dvc.api.open` from that revision's DVC cache or remote, not the workspace.
    An explicit `scale_factor` overrides the stored one; a training checkpoint
    (paths.BEST_CHECKPOINT) stores none, so it needs `latent.scale_factor` from
    paths.EVALUATE_METRICS.
    """
    checkpoint = _read(Path(path), rev, repo)
    model, config = model_from_checkpoint(checkpoint)
    if scale_factor is None:
        scale_factor = checkpoint.get("scale_factor")
    if scale_factor is None:
        raise ValueError(
            f"{path} holds no scale factor (a training checkpoint): load the exported "
            f"{EXPORT_PATH} instead, or pass scale_factor= (latent.scale_factor in "
            f"{EVALUATE_METRICS} of the same run)"
        )
    return PhaseTwoAutoencoder(model.to(device), config, _checked(scale_factor))


def export_autoencoder(
    checkpoint_path: str | Path, scale_factor: float, out_path: str | Path = EXPORT_PATH
) -> Path:
    """Write what Phase 2 needs in one `weights_only` file: the checkpoint less its optimizer
    state, plus the scale factor and the latent (H, W, C); for the evaluate stage to call."""
    checkpoint = load_checkpoint(checkpoint_path)
    _, config = model_from_checkpoint(checkpoint)  # refuse to export weights that do not load
    payload = {key: value for key, value in checkpoint.items() if key != "optimizer"}
    payload |= {"scale_factor": _checked(scale_factor), "latent_shape": config.latent_shape}
    out_path = Path(out_path)
    save_checkpoint(out_path, **payload)
    return out_path


def _read(path: Path, rev: str | None, repo: str | Path) -> dict[str, Any]:
    if rev is None:
        local = Path(repo) / path
        if not local.is_file():
            raise FileNotFoundError(f"{local}: no autoencoder there; {HOW_TO_GET}")
        return load_checkpoint(local)
    # Here, not at the top: importing dvc takes about a second.
    import dvc.api
    from dvc.exceptions import PathMissingError

    try:
        with dvc.api.open(path.as_posix(), repo=str(repo), rev=rev, mode="rb") as file:
            return load_checkpoint(io.BytesIO(file.read()))
    except (FileNotFoundError, PathMissingError) as error:
        # DVC says PathMissingError also when the output is known but in no cache or remote.
        raise FileNotFoundError(
            f"cannot read {path} at revision {rev!r} of {repo} ({error}); {HOW_TO_GET}"
        ) from error


def _checked(scale_factor: float) -> float:
    scale_factor = float(scale_factor)
    if not (math.isfinite(scale_factor) and scale_factor > 0):
        raise ValueError(f"scale_factor must be finite and > 0, got {scale_factor}")
    return scale_factor
