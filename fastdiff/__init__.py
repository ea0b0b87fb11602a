"""fastdiff: fast online training of latent video diffusion models from a single video stream."""

__version__ = "0.1.0"
