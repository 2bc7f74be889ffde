"""aeselect: pick the autoencoder for a ControlNet-style latent diffusion model."""
