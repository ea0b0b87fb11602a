"""Which implementation of an op runs: the Triton kernel, the PyTorch reference, or a peer library.

Resolution order: :func:`set_backend` (fastdiff's config calls it), then the environment variable
``FASTDIFF_KERNELS`` (``triton|reference|sdpa|xformers``), then ``auto``. ``auto`` means Triton on CUDA
tensors and the reference on CPU tensors. ``triton`` on CPU tensors runs the kernel in Triton's
interpreter, which must have been switched on (``TRITON_INTERPRET=1``) before triton was imported.
``sdpa`` and ``xformers`` only mean something to attention; other ops treat them as ``auto``.
"""

from __future__ import annotations

import contextlib
import os

# No torch import: fastdiff's config reads BACKENDS, and `fastdiff --help` must not pay for importing torch.

BACKENDS = ("auto", "triton", "reference", "sdpa", "xformers")
_override: str | None = None


class BackendNotSupported(RuntimeError):
    """A backend was asked for a case it cannot serve. The message says why."""


def set_backend(name: str | None) -> None:
    """Force a backend for every op in this process (None restores env/auto)."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _override = name


@contextlib.contextmanager
def backend_override(name: str | None):
    """Temporarily force a backend (tests and benchmarks)."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def requested_backend() -> str:
    name = _override or os.environ.get("FASTDIFF_KERNELS", "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTDIFF_KERNELS={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve(op: str, tensor, extra: tuple[str, ...] = ()) -> str:
    """Pick the backend for ``op`` on ``tensor``: 'triton', 'reference' or one of ``extra`` (peers).

    Raises BackendNotSupported when the requested backend cannot run here, saying why.
    """
    name = requested_backend()
    if name in ("sdpa", "xformers") and name not in extra:
        name = "auto"
    if name == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "reference"
    if name == "triton":
        if not triton_available():
            raise BackendNotSupported(f"{op}: triton not supported because the triton package is not importable")
        if not tensor.is_cuda and not interpreter_active():
            raise BackendNotSupported(
                f"{op}: triton not supported because the tensors are on {tensor.device} and the Triton "
                "interpreter is off (set TRITON_INTERPRET=1 before importing triton)"
            )
    return name
