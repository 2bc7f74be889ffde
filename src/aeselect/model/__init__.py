"""The autoencoder: encoder/decoder symmetry driven by ModelConfig."""

from aeselect.model.autoencoder import Autoencoder, AutoencoderOutput

__all__ = ["Autoencoder", "AutoencoderOutput"]
