"""The one seam between fastdiff and kernels/: model code calls these and reads as plain PyTorch.

Which implementation runs (Triton kernel, PyTorch reference, SDPA, xformers) is decided in
kernels.dispatch from the config (`run.kernels`) or FASTDIFF_KERNELS.
"""

from __future__ import annotations

from fastdiff_kernels import dispatch
from fastdiff_kernels.adaln_modulate import adaln_modulate
from fastdiff_kernels.noise_schedule import add_noise, ddim_step, frame_mse_loss
from fastdiff_kernels.temporal_attention import temporal_attention


def use_kernels(name: str) -> None:
    """Apply the config's kernel backend choice ('auto' leaves FASTDIFF_KERNELS in charge)."""
    dispatch.set_backend(None if name == "auto" else name)


__all__ = ["adaln_modulate", "add_noise", "ddim_step", "frame_mse_loss", "temporal_attention", "use_kernels"]
