"""The autoencoder (encoder/decoder symmetry driven by ModelConfig), its posterior and its
checkpoints (`model.checkpoint`)."""

from aeselect.model.autoencoder import (
    Autoencoder,
    AutoencoderOutput,
    DiagonalGaussian,
    count_parameters,
)

__all__ = ["Autoencoder", "AutoencoderOutput", "DiagonalGaussian", "count_parameters"]
