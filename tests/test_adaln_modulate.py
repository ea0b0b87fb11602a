"""Fused LayerNorm + adaLN modulate: Triton kernels (interpreter on CPU) against float64 references.

Low-precision rule: with bf16 / fp16 inputs, our error vs the float64 reference must stay within 2x the
error of PyTorch's own computation of the unfused path (F.layer_norm, then x * (1 + scale) + shift,
forward and autograd backward) at that precision, measured here on the same inputs.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from fastdiff_kernels import adaln_modulate as am
from fastdiff_kernels import autotune, dispatch

# (B, K, S, D): B*K odd, S = 1 / 7 / 70 (one tile, ragged tiles, two backward splits), D not a power of 2
SHAPES = [(1, 3, 7, 48), (3, 1, 1, 32), (1, 1, 70, 128), (1, 3, 5, 96)]
LOWP = [torch.bfloat16, torch.float16]

# dtype -> (factor on PyTorch's own error at that precision, floor relative to the values' magnitude)
TOLERANCE = {
    torch.float64: (None, 1e-12),
    torch.float32: (4.0, 2e-6),
    torch.bfloat16: (2.0, 1e-6),
    torch.float16: (2.0, 1e-6),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _triton(triton_backend):
    yield


@pytest.fixture
def poisoned(poison):
    poison(am)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_inputs(shape, dtype=torch.float32, seed=0, device="cpu"):
    """Fresh random x (offset mean, non-unit spread: a real normalisation), and shift / scale as strided
    chunks of one (B, K, 1, 3D) ada projection, like the model's."""
    b, k, s, d = shape
    g = gen(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5).to(device, dtype)
    mods = (torch.randn(b, k, 1, 3 * d, generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
    shift, scale, _gate = mods.chunk(3, dim=-1)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    return x, shift, scale, dy


def unfused(x, shift, scale, eps=am.DEFAULT_EPS):
    """The model's old path: modulate(LayerNorm(x), shift, scale), at the inputs' own precision."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def forward_backward(fn, x, shift, scale, dy):
    x, shift, scale = (t.detach().requires_grad_() for t in (x, shift, scale))
    y = fn(x, shift, scale)
    return (y, *torch.autograd.grad(y, (x, shift, scale), dy))


def check(ours, ref64, torch_lowp, dtype, what):
    assert ours.dtype == torch_lowp.dtype, f"{what}: dtype {ours.dtype}, expected {torch_lowp.dtype}"
    assert not torch.isnan(ours).any(), f"{what}: NaN (an element was not written)"
    factor, floor = TOLERANCE[dtype]
    err = (ours.double() - ref64).abs().max().item()
    tol = floor * max(1.0, ref64.abs().max().item())
    if factor is not None:
        tol = max(tol, factor * (torch_lowp.double() - ref64).abs().max().item())
    assert err <= tol, f"{what} ({dtype}): max error {err:.3g} > tolerance {tol:.3g}"


NAMES = ("y", "dx", "dshift", "dscale")


def compare_all(shape, dtype, x, shift, scale, dy):
    ours = forward_backward(am.adaln_modulate, x, shift, scale, dy)
    ref = forward_backward(unfused, *(t.double() for t in (x, shift, scale, dy)))
    lowp = forward_backward(unfused, x, shift, scale, dy)
    assert ours[0].shape == shape and ours[2].shape == shift.shape
    for name, o, r, p in zip(NAMES, ours, ref, lowp):
        check(o, r, p, dtype, name)
    return ours


# ------------------------------------------------------------------------------------ forward + backward


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, *LOWP, torch.float64], ids=str)
def test_forward_backward_match_fp64_reference(shape, dtype, poisoned):
    # A seed per case that every run reproduces (hash() of a str changes with PYTHONHASHSEED).
    seed = zlib.crc32(f"{shape}{dtype}".encode()) % 1000
    x, shift, scale, dy = make_inputs(shape, dtype, seed=seed)
    compare_all(shape, dtype, x, shift, scale, dy)


def test_reference_equals_unfused_in_fp32_and_fp64():
    """The CPU path (what the model runs without a GPU) is the old computation, bit for bit."""
    for dtype in (torch.float32, torch.float64):
        x, shift, scale, _ = make_inputs((2, 3, 5, 32), dtype)
        assert torch.equal(am.adaln_modulate_reference(x, shift, scale), unfused(x, shift, scale))


def test_non_contiguous_x_and_stride0_gradients(poisoned):
    b, k, s, d = 1, 3, 7, 48
    base, shift, scale, _ = make_inputs((s, b, k, d), seed=3)
    x = base.permute(1, 2, 0, 3)  # (B, K, S, D) view, not contiguous
    shift, scale = (t[:b, :k] for t in make_inputs((b, k, 1, d), seed=4)[1:3])
    assert not x.is_contiguous() and not shift.is_contiguous()
    per_frame = torch.randn(b, k, 1, d, generator=gen(5))
    for dy in (torch.ones(1).expand(b, k, s, d), per_frame.expand(b, k, s, d)):  # stride-0 gradients
        compare_all((b, k, s, d), torch.float32, x, shift, scale, dy)
    # .sum().backward() hands the op an expanded all-ones gradient
    xs, sh, sc = (t.detach().clone().requires_grad_() for t in (x, shift, scale))
    am.adaln_modulate(xs, sh, sc).sum().backward()
    ref = forward_backward(unfused, x.double(), shift.double(), scale.double(), torch.ones(b, k, s, d).double())
    for got, want in zip((xs.grad, sh.grad, sc.grad), ref[1:]):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_mixed_dtypes_bf16_modulation_on_fp32_tokens(poisoned):
    """Under autocast the residual stream is fp32 and the ada projection bf16: y is fp32, the
    modulation gradients come back in bf16."""
    x, _, _, dy = make_inputs((1, 3, 7, 48), torch.float32, seed=6)
    _, shift, scale, _ = make_inputs((1, 3, 7, 48), torch.bfloat16, seed=7)
    ours = forward_backward(am.adaln_modulate, x, shift, scale, dy)
    ref = forward_backward(unfused, *(t.double() for t in (x, shift, scale, dy)))
    assert [t.dtype for t in ours] == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    for name, o, r in zip(NAMES, ours, ref):
        tol = 2e-5 if o.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(o.double(), r, atol=tol, rtol=tol, msg=name)


CONFIGS = [{"BLOCK_S": 1, "num_warps": 1, "TILES": 1}, {"BLOCK_S": 4, "num_warps": 2, "TILES": 2}]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_launch_configs_and_deterministic_split_reduction(cfg, poisoned):
    """Any tuned config gives the same answer, and the split reduction is bit-reproducible."""
    shape = (1, 3, 7, 48)
    x, shift, scale, dy = make_inputs(shape, seed=8)
    block_d = am.block_d_for(shape[-1])
    with autotune.forced(am.OP_NAME, am.config_key("fwd", block_d, x.dtype), cfg), \
            autotune.forced(am.OP_NAME, am.config_key("bwd", block_d, x.dtype), cfg):
        first = compare_all(shape, torch.float32, x, shift, scale, dy)
        again = forward_backward(am.adaln_modulate, x, shift, scale, dy)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_grids_stay_within_cuda_axis_limits_for_long_frames():
    """S > 65,535 tokens per frame at BLOCK_S = 1 (rows of 8192): the launches' grids, computed on meta
    tensors (nothing allocated), put every program on axis x; a grid axis y of S programs would be
    refused by CUDA (limit 65,535). The kernels' flattened (frame, tile) indexing is checked against the
    reference by the config tests above (BLOCK_S = 1, TILES = 1: one program per row)."""
    b, k, s, d = 2, 3, 100_000, 8192
    x = _meta(b, k, s, d)
    shift, scale = _meta(b, k, 1, 2 * d).chunk(2, dim=-1)
    stats = _meta(b * k * s, dtype=torch.float32)
    fwd_cfg = am.default_config("fwd", am.block_d_for(d), x.dtype)
    assert fwd_cfg["BLOCK_S"] == 1
    fwd = am.fwd_launch(x, shift, scale, _meta(b, k, s, d), stats, stats, am.DEFAULT_EPS, fwd_cfg)
    assert fwd.grid == (b * k * s,)
    bwd_cfg = {"BLOCK_S": 1, "num_warps": 8, "TILES": 1}
    splits = am.backward_splits(bwd_cfg, b * k, s, programs=264)
    assert splits == s
    part = _meta(b, k, splits, d, dtype=torch.float32)
    bwd = am.bwd_launch(_meta(b, k, s, d), x, scale, stats, stats, _meta(b, k, s, d), part, part, bwd_cfg, 264)
    assert bwd.grid == (b * k * splits,)
    for launch in (fwd, bwd):
        assert all(size <= limit for size, limit in zip(launch.grid, autotune.GRID_LIMITS))
    with pytest.raises(ValueError, match="axis 1 has 100,000 programs, over CUDA's limit of 65,535"):
        autotune.check_grid((b * k, s))  # the old 2-D grid


def test_gradcheck_fp64():
    x, shift, scale, _ = make_inputs((1, 2, 3, 8), torch.float64, seed=9)
    inputs = tuple(t.detach().clone().requires_grad_() for t in (x, shift, scale))
    assert torch.autograd.gradcheck(am.adaln_modulate, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
    with dispatch.backend_override("reference"):
        assert torch.autograd.gradcheck(am.adaln_modulate, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------- dispatch, errors


def test_dispatch_reference_on_cpu(monkeypatch):
    calls = []
    real = am._empty
    monkeypatch.setattr(am, "_empty", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    x, shift, scale, _ = make_inputs((1, 3, 7, 48))
    with dispatch.backend_override("auto"):  # CPU tensors -> reference
        ref = am.adaln_modulate(x, shift, scale)
    assert not calls
    ours = am.adaln_modulate(x, shift, scale)  # forced triton (interpreter)
    assert calls
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_bad_inputs_name_the_problem():
    x, shift, scale, _ = make_inputs((1, 3, 7, 48))
    with pytest.raises(ValueError, match="not supported because x must be a 4-D"):
        am.adaln_modulate(x[0], shift, scale)
    with pytest.raises(ValueError, match=r"not supported because shift must be .*\(B, K, 1, D\)"):
        am.adaln_modulate(x, shift[:, :, :, :8], scale)
    with pytest.raises(ValueError, match="not supported because scale must be"):
        am.adaln_modulate(x, shift, scale.expand(1, 3, 7, 48))
    with pytest.raises(ValueError, match="not supported because x dtype torch.int64"):
        am.adaln_modulate(x.long(), shift, scale)
    with pytest.raises(ValueError, match="not supported because shift dtype torch.int32"):
        am.adaln_modulate(x, shift.int(), scale)
    with pytest.raises(ValueError, match="not supported because eps"):
        am.adaln_modulate(x, shift, scale, eps=0.0)
    with pytest.raises(ValueError, match="not supported because D=9000"):
        am.adaln_modulate(torch.zeros(1, 1, 1, 9000), torch.zeros(1, 1, 1, 9000), torch.zeros(1, 1, 1, 9000))
    with pytest.raises(ValueError, match="not supported because x is empty"):
        am.adaln_modulate(x[:, :, :0], shift, scale)


# ------------------------------------------------------------------------------------------- compile


class _Modulated(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ada = torch.nn.Linear(d, 2 * d)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x, cond):
        shift, scale = self.ada(cond)[:, :, None].chunk(2, dim=-1)
        return self.proj(am.adaln_modulate(x, shift, scale))


def _module_and_inputs(device="cpu", d=32, shape=(2, 3, 5)):
    torch.manual_seed(0)
    module = _Modulated(d).to(device)
    x = torch.randn(*shape, d, device=device) * 2 + 0.5
    cond = torch.randn(*shape[:2], d, device=device)
    return module, x, cond


def _loss_and_grads(fn, module, x, cond):
    out = fn(x, cond)
    grads = torch.autograd.grad((out * out).sum(), [x, *module.parameters()])
    return out, grads


def test_torch_compile_fullgraph_reference_path():
    module, x, cond = _module_and_inputs()
    x.requires_grad_()
    with dispatch.backend_override("reference"):
        eager = _loss_and_grads(module, module, x, cond)
        compiled = _loss_and_grads(torch.compile(module, fullgraph=True), module, x, cond)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for c, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-5)


def test_triton_op_traces_fullgraph_with_fake_tensors():
    """Dynamo traces the triton_op with fake tensors and no graph break (fullgraph), and the traced
    graph runs the kernels (interpreter) through the op's autograd. (AOTAutograd/Inductor decompose the
    launcher itself, which needs compiled kernels: that part is the GPU test's.)"""
    module, x, cond = _module_and_inputs(shape=(1, 3, 4))
    x.requires_grad_()
    eager = _loss_and_grads(module, module, x, cond)
    traced = _loss_and_grads(torch.compile(module, fullgraph=True, backend="eager"), module, x, cond)
    torch.testing.assert_close(traced[0], eager[0], atol=0, rtol=0)
    for t, e in zip(traced[1], eager[1]):
        torch.testing.assert_close(t, e, atol=1e-6, rtol=1e-6)
    xs, shift, scale, dy = make_inputs((1, 3, 4, 32), seed=10)
    torch.library.opcheck(torch.ops.fastdiff.adaln_modulate_fwd.default, (xs.requires_grad_(), shift, scale, 1e-6),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_dit_output_unchanged_by_the_fused_op(path, monkeypatch):
    """VideoDiT with the fused norm+modulate equals the old modulate(LayerNorm(x)) path (fp32), forward
    and parameter gradients; 'triton' runs our kernel (interpreter) for the norm only."""
    from fastdiff import ops
    from fastdiff.models import dit

    torch.manual_seed(0)
    model = dit.VideoDiT(3, 4, 4, 3, width=32, depth=1, heads=1)
    for p in model.parameters():  # leave adaLN-zero so that every modulation matters
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 3, 4, 4)
    t = torch.randint(0, 1000, (2, 3)).float()
    observed = torch.rand(2, 3, generator=gen(1)) < 0.3

    def run(norm_modulate):
        monkeypatch.setattr(ops, "adaln_modulate", norm_modulate)
        model.zero_grad()
        with dispatch.backend_override("reference"):  # attention etc. on the reference path
            out = model(x, t, observed)
            (out * out).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    def legacy(x, shift, scale, eps):  # the unfused modulation the blocks used before the fused op
        return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift

    fused = am.adaln_modulate_triton if path == "triton" else am.adaln_modulate
    old_out, old_grads = run(legacy)
    new_out, new_grads = run(fused)
    assert old_out.abs().max() > 0.1
    if path == "reference":
        assert torch.equal(new_out, old_out)
    torch.testing.assert_close(new_out, old_out, atol=2e-5, rtol=1e-5)
    for new, old in zip(new_grads, old_grads):
        torch.testing.assert_close(new, old, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_triton_path_and_compile(dtype):
    with dispatch.backend_override("auto"):
        for shape in [(2, 10, 64, 256), (4, 16, 256, 512), (1, 3, 7, 48)]:
            x, shift, scale, dy = make_inputs(shape, dtype, device="cuda")
            compare_all(shape, dtype, x, shift, scale, dy)
        module, x, cond = _module_and_inputs("cuda", d=256, shape=(2, 10, 64))
        module = module.to(dtype)
        x = x.to(dtype).requires_grad_()
        cond = cond.to(dtype)
        eager = _loss_and_grads(module, module, x, cond)
        compiled = _loss_and_grads(torch.compile(module, fullgraph=True), module, x, cond)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled[0], eager[0], atol=tol, rtol=tol)
    for c, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(c, e, atol=tol * 10, rtol=tol)
