"""aeselect: pick the autoencoder for a ControlNet-style latent diffusion model."""

__all__ = ["load_autoencoder"]


def __getattr__(name: str):
    """`aeselect.load_autoencoder` on first use, so `import aeselect` does not import torch."""
    if name == "load_autoencoder":
        from aeselect.handoff import load_autoencoder

        return load_autoencoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
