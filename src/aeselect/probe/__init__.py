"""The diffusability probe: how hard a candidate's latent is for a diffusion model to learn.

`denoiser` trains a small ε-prediction denoiser on train latents and scores it on val latents as
a fraction of the per-channel Gaussian optimum; `spectrum` measures high-frequency energy;
`diffusability` runs both for the probe stage (after evaluate, on the exported autoencoder).
"""
