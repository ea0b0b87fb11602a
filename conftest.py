"""Shared pytest setup. Runs before any test module imports triton.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors; the interpreter must be
switched on before triton is first imported, so it is set here, process-wide, for the test run.
"""

import os
import shutil
import sys
from pathlib import Path

# Tests see the package as a user does, installed: the checkout's root (which pytest puts on sys.path for this
# file) would make its folder kernels/ importable as `kernels`, the name Hugging Face's package owns.
_ROOT = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

if shutil.which("nvidia-smi") is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep the 2-core CI machine responsive and results deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops (opt in with pytest.mark.usefixtures("one_thread")):
    a second thread only adds spin-waiting there, and on a shared 2-core machine it costs minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_backend():
    """Every op on its Triton kernel (in the interpreter on CPU tensors): opt in per test module."""
    from fastdiff_kernels import dispatch

    with dispatch.backend_override("triton"):
        yield


def _nan_empty(shape, dtype=None, device=None):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poison(monkeypatch):
    """poison(module): every buffer the module's Triton path allocates (its `_empty`) starts as NaN, so an element
    a kernel fails to write shows up in the comparison."""
    return lambda module: monkeypatch.setattr(module, "_empty", _nan_empty)
