"""The interpreter's float32 -> bfloat16 cast rounds as the GPU does (conftest fixes Triton's truncation), so
the kernels' bf16 precision tests measure the kernels."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fastdiff_kernels import dispatch

pytestmark = pytest.mark.skipif(not dispatch.interpreter_active(), reason="checks the Triton interpreter")


@triton.jit
def _narrow_to_bf16(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, x.to(tl.bfloat16), mask=mask)


def hard_cases() -> torch.Tensor:
    """Random values over many binades, plus exact ties (to even, both ways), the largest finite values
    (which round to inf), subnormals, signed zeros, inf and NaN."""
    g = torch.Generator().manual_seed(0)
    random = torch.randn(4001, generator=g) * torch.exp2(torch.randint(-30, 30, (4001,), generator=g).float())
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80C000], dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([3.3895e38, -3.3895e38, torch.finfo(torch.float32).max, 1e-40, -1e-40, 0.0, -0.0,
                          float("inf"), float("-inf"), float("nan")])
    return torch.cat([random, ties.view(torch.float32), edges])


def narrow(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _narrow_to_bf16[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    return y


def same_bits(ours: torch.Tensor, expected: torch.Tensor) -> bool:
    nan = expected.isnan()
    bits = ours[~nan].view(torch.int16)
    return torch.equal(ours.isnan(), nan) and torch.equal(bits, expected[~nan].view(torch.int16))


def test_fp32_to_bf16_rounds_to_nearest_even_like_torch():
    x = hard_cases()
    assert same_bits(narrow(x), x.to(torch.bfloat16))


def test_mutation_the_interpreters_own_cast_truncates(interpreter_truncating_bf16):
    """The check above fails on the cast it replaces: Triton's interpreter truncates."""
    x = hard_cases()
    with interpreter_truncating_bf16():
        ours = narrow(x)
    assert not same_bits(ours, x.to(torch.bfloat16))
    normal = x.isfinite() & (x.abs() >= torch.finfo(torch.float32).tiny)  # (it also mangles subnormals)
    assert torch.all(ours[normal].double().abs() <= x[normal].double().abs())  # toward zero, never away
