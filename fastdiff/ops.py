"""The one seam between fastdiff and kernels/: model code calls these and reads as plain PyTorch.

Which implementation runs (Triton kernel, PyTorch reference, SDPA, xformers) is decided in
kernels.dispatch from the config (`run.kernels`) or FASTDIFF_KERNELS.
"""

from __future__ import annotations

from fastdiff_kernels import dispatch
from fastdiff_kernels.adaln_modulate import adaln_modulate
from fastdiff_kernels.noise_schedule import (
    add_noise,
    ddim_step,
    edm_churn,
    edm_heun_step,
    frame_mse_loss,
    min_snr_weight,
    uniform_weight,
    x0_error_weight,
)
from fastdiff_kernels.temporal_attention import temporal_attention


def use_kernels(name: str) -> None:
    """Apply the config's kernel backend choice ('auto' leaves FASTDIFF_KERNELS in charge)."""
    dispatch.set_backend(None if name == "auto" else name)


__all__ = ["adaln_modulate", "add_noise", "ddim_step", "edm_churn", "edm_heun_step", "frame_mse_loss", "min_snr_weight",
           "temporal_attention", "uniform_weight", "use_kernels", "x0_error_weight"]
