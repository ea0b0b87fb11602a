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


def _fp32_to_bf16_bits_nearest_even(values):
    """bf16 bit patterns of float32 values, rounded to nearest with ties to even, NaN kept NaN: what
    cvt.rn.bf16.f32 on the GPU and torch's .to(torch.bfloat16) give."""
    import numpy as np

    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # carries into the exponent, up to inf, as IEEE does
    quiet_nan = (bits >> 16) | 0x0040
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


_INTERPRETER_TRUNCATING_CAST = None


def _interpreter_rounds_bf16_like_the_gpu():
    """Triton's interpreter (3.6-3.9) narrows float32 to bfloat16 by dropping the low 16 bits, i.e. it rounds
    toward zero; NVIDIA GPUs round to nearest even. Under truncation a kernel's bf16 output is off by up to one
    ulp instead of half of one, so a precision test of a kernel (error within 2x PyTorch's own) would measure
    the interpreter and fail on some inputs. Make the interpreter round as the hardware does; every other cast
    is left to the interpreter. tests/test_interpreter_rounding.py checks this bit for bit."""
    global _INTERPRETER_TRUNCATING_CAST
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = getattr(builder, "cast_impl", None)
    if original is None:  # a Triton whose interpreter casts elsewhere: the rounding test says whether it rounds
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_fp32_to_bf16_bits_nearest_even(src.data), dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl
    _INTERPRETER_TRUNCATING_CAST = original


def _interpreter_indexes_one_element_tensors():
    """Triton 3.6's interpreter turns a tensor used as a Python int (a `range` bound computed from program_id, as
    in the adaLN and temporal-attention backward kernels) into one with int(data), which NumPy 2 refuses for a
    one-element array that is not 0-d; Triton 3.8 and later squeeze it first. Give every version the later rule."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    def patch_tensor_with_squeezing_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_squeezing_index


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bf16_like_the_gpu()
    _interpreter_indexes_one_element_tensors()


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


@pytest.fixture
def interpreter_truncating_bf16():
    """A context manager that puts the interpreter's own fp32 -> bf16 cast (truncation) back while it is open: the
    mutation check of the rounding fix above, and of the bf16 tolerances that rely on it."""
    if _INTERPRETER_TRUNCATING_CAST is None:
        pytest.skip("the Triton interpreter is off (a GPU runs the kernels)")
    from unittest import mock

    from triton.runtime import interpreter

    return lambda: mock.patch.object(interpreter.InterpreterBuilder, "cast_impl", _INTERPRETER_TRUNCATING_CAST)
