"""The training objective: weighted reconstruction + KL (variational only) + auxiliary CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aeselect.config import LossConfig
from aeselect.model import AutoencoderOutput


def compute_loss(
    out: AutoencoderOutput, images: torch.Tensor, targets: torch.Tensor, weights: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its unweighted terms (detached), in fp32 whatever the autocast dtype."""
    reconstruction = out.reconstruction.float()
    terms = {
        "mse": F.mse_loss(reconstruction, images),
        "l1": F.l1_loss(reconstruction, images),
        "aux_ce": F.cross_entropy(out.aux_logits.float(), targets),
    }
    total = (
        weights.mse_weight * terms["mse"]
        + weights.l1_weight * terms["l1"]
        + weights.aux_weight * terms["aux_ce"]
    )
    if out.posterior is not None:
        # Per-element mean (not SD's sum) keeps kl_weight comparable across latent shapes.
        terms["kl"] = out.posterior.kl().mean()
        total = total + weights.kl_weight * terms["kl"]
    terms["total"] = total
    return total, {name: value.detach() for name, value in terms.items()}
