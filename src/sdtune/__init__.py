"""sdtune: train and fine-tune Stable Diffusion models."""

__version__ = "0.1.0"
