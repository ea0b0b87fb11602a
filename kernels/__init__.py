"""Triton kernels for fastdiff. Depends on torch and triton only, never on fastdiff.

Each op lives in its own file: Triton forward/backward kernels, launchers, a PyTorch reference,
and the torch.library registration. Backend choice goes through :mod:`fastdiff_kernels.dispatch`.
"""

from fastdiff_kernels.dispatch import BackendNotSupported, backend_override, requested_backend, set_backend

__all__ = ["BackendNotSupported", "backend_override", "requested_backend", "set_backend"]
