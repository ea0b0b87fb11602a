"""Fused temporal attention: Triton kernels (under the interpreter on CPU) against a float64 reference,
dispatch and peers, input errors, torch.compile, and the tuned-config load/fallback logic."""

import math

import pytest
import torch
import triton
import triton.language as tl

import fastdiff_kernels.temporal_attention as ta
from fastdiff_kernels import autotune, dispatch
from fastdiff_kernels.temporal_attention import temporal_attention, temporal_attention_reference

# Error floor per dtype: ours must satisfy err <= 2 * (PyTorch's own error at that dtype) + floor.
# fp32 has no "own error" rule; it is compared directly against float64 with this absolute tolerance.
# bf16 needed 1.6e-2 while Triton's interpreter truncated its fp32 -> bf16 casts (conftest now rounds them to
# nearest even, as the GPU does); over 300 draws of each bf16 case the worst then needed 1.5e-3.
ABS_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the op allocates starts as NaN, so an element the kernels never write is caught."""

    def full_of_nan(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ta, "_empty", full_of_nan)


def make_case(n, t, h, d, dtype, *, bias=False, causal=False, mask=None, seed=0, layout="fused",
              device="cpu"):
    """Leaf tensors plus the q, k, v views the op sees. layout 'fused': slices of one (N, T, 3, H, D)
    projection; 'heads-first': separate (N, H, T, D) tensors transposed to (N, T, H, D)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "fused":
        leaves = [torch.randn(n, t, 3, h, d, generator=g).to(device, dtype).requires_grad_()]
        q, k, v = leaves[0].unbind(2)
    else:
        leaves = [torch.randn(n, h, t, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3)]
        q, k, v = (x.transpose(1, 2) for x in leaves)
    case = {"q": q, "k": k, "v": v, "leaves": leaves, "causal": causal, "key_mask": None, "bias": None}
    if bias:
        case["bias"] = torch.randn(h, t, t, generator=g).to(device, dtype).requires_grad_()
    if mask is not None:
        key_mask = torch.rand(n, t, generator=g) > 0.35
        if mask == "empty-rows":
            key_mask[0] = False  # every query of sequence 0 has no key
            if n > 2:
                key_mask[2, 1:] = False  # only key 0: with causal, rows > 0 still see it
        case["key_mask"] = key_mask.to(device)
    case["grad"] = torch.randn(n, t, h, d, generator=g).to(device, dtype)
    return case


def run_case(case, backend=None, *, fn=None, grad=None):
    """Forward + backward; returns out and the gradients w.r.t. q, k, v (and bias if present)."""
    for x in case["leaves"] + ([case["bias"]] if case["bias"] is not None else []):
        x.grad = None
    fn = fn or temporal_attention
    kwargs = {"bias": case["bias"], "causal": case["causal"], "key_mask": case["key_mask"]}
    if backend is None:
        out = fn(case["q"], case["k"], case["v"], **kwargs)
    else:
        with dispatch.backend_override(backend):
            out = fn(case["q"], case["k"], case["v"], **kwargs)
    if grad is None:
        out.backward(case["grad"])
    else:
        grad(out).backward()
    result = {"out": out.detach()}
    if len(case["leaves"]) == 1:
        result.update(zip(("dq", "dk", "dv"), case["leaves"][0].grad.unbind(2)))
    else:
        result.update(zip(("dq", "dk", "dv"), (x.grad.transpose(1, 2) for x in case["leaves"])))
    if case["bias"] is not None:
        result["dbias"] = case["bias"].grad
    return result


def as_dtype(case, dtype):
    """The same inputs converted to ``dtype`` (float64 for the reference), with fresh leaves."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in case["leaves"]]
    if len(leaves) == 1:
        q, k, v = leaves[0].unbind(2)
    else:
        q, k, v = (x.transpose(1, 2) for x in leaves)
    bias = None if case["bias"] is None else case["bias"].detach().to(dtype).requires_grad_()
    return {**case, "q": q, "k": k, "v": v, "leaves": leaves, "bias": bias, "grad": case["grad"].to(dtype)}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_float64(case, ours):
    """ours vs float64 reference: fp32 within the floor; fp16/bf16 within 2x PyTorch's own error + floor."""
    dtype = case["q"].dtype
    exact = run_case(as_dtype(case, torch.float64), fn=temporal_attention_reference)
    torch_own = None
    if dtype != torch.float32:
        torch_own = run_case(as_dtype(case, dtype), fn=temporal_attention_reference)
    for name, want in exact.items():
        got = ours[name]
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or NaN)"
        err = max_err(got, want)
        allowed = ABS_FLOOR[dtype] * max(1.0, want.abs().max().item())
        if torch_own is not None:
            allowed += 2 * max_err(torch_own[name], want)
        assert err <= allowed, f"{name} {dtype}: error {err:.3g} > allowed {allowed:.3g}"


def with_triton(case, **kw):
    return run_case(case, "triton", **kw)


CASES = [
    # (N, T, H, D, dtype, bias, causal, mask)
    (3, 1, 2, 32, torch.float32, True, False, None),
    (5, 7, 2, 32, torch.float32, False, True, "random"),
    (3, 10, 3, 64, torch.float32, True, True, "random"),
    (3, 20, 1, 32, torch.float32, True, False, "empty-rows"),
    (3, 33, 1, 32, torch.float32, True, True, None),
    (2, 16, 1, 128, torch.float32, True, False, "random"),
    (5, 10, 2, 32, torch.bfloat16, True, True, "random"),
    (5, 10, 2, 32, torch.float16, True, True, "random"),
    (3, 20, 2, 64, torch.bfloat16, True, False, "empty-rows"),
]


@pytest.mark.parametrize("n,t,h,d,dtype,bias,causal,mask", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_triton_matches_float64_reference(n, t, h, d, dtype, bias, causal, mask):
    case = make_case(n, t, h, d, dtype, bias=bias, causal=causal, mask=mask)
    check_against_float64(case, with_triton(case))


def test_mutation_bf16_floor_sees_outputs_rounded_toward_zero(interpreter_truncating_bf16):
    """The bf16 tolerance is tight enough to catch a half-ulp bias: on this draw the kernels pass with round to
    nearest even, and fail when their bf16 results are truncated (the interpreter's own cast)."""
    case = make_case(5, 10, 2, 32, torch.bfloat16, bias=True, causal=True, mask="random", seed=21)
    check_against_float64(case, with_triton(case))
    with interpreter_truncating_bf16(), pytest.raises(AssertionError, match="error .* > allowed"):
        check_against_float64(case, with_triton(case))


def test_heads_first_layout_and_bias_without_grad():
    """Separate (N, H, T, D) tensors seen as (N, T, H, D) views, and a bias that needs no gradient."""
    case = make_case(3, 9, 2, 32, torch.float32, bias=True, causal=True, layout="heads-first", seed=3)
    case["bias"].requires_grad_(False)
    ours = with_triton(case)
    assert case["bias"].grad is None
    ours.pop("dbias", None)
    exact = run_case(as_dtype(case, torch.float64), fn=temporal_attention_reference)
    for name in ("out", "dq", "dk", "dv"):
        assert max_err(ours[name], exact[name]) <= 2e-5, name


def test_rows_without_keys_give_zeros_and_zero_grads():
    case = make_case(4, 12, 2, 32, torch.float32, bias=True, causal=True, mask="empty-rows", seed=1)
    ours = with_triton(case)
    for name in ("out", "dq"):
        assert torch.equal(ours[name][0], torch.zeros_like(ours[name][0])), name
    # Sequence 0 has no allowed key at all: its keys and values get no gradient either.
    assert torch.equal(ours["dk"][0], torch.zeros_like(ours["dk"][0]))
    assert torch.equal(ours["dv"][0], torch.zeros_like(ours["dv"][0]))
    check_against_float64(case, ours)


def test_expanded_stride0_grad_from_sum():
    case = make_case(3, 10, 2, 32, torch.float32, bias=True, mask="random", seed=2)
    ours = with_triton(case, grad=lambda out: out.sum())
    exact = run_case(as_dtype(case, torch.float64), fn=temporal_attention_reference,
                     grad=lambda out: out.sum())
    for name, want in exact.items():
        assert max_err(ours[name], want) <= 2e-5 * max(1.0, want.abs().max().item()), name


def test_dbias_is_deterministic_across_many_programs():
    """N larger than BLOCK_SEQ: dbias sums per-program partials; two runs must agree bit for bit."""
    case = make_case(11, 5, 2, 32, torch.float32, bias=True, seed=4)
    key = ta.config_key("bwd", 16, 32, torch.float32)
    with autotune.forced(ta.OP_NAME, key, {"BLOCK_SEQ": 2, "num_warps": 4, "num_stages": 1}):
        first = with_triton(case)["dbias"].clone()
        again = with_triton(case)
    assert torch.equal(first, again["dbias"])
    check_against_float64(case, again)


def test_dbias_partials_stay_bounded_however_many_sequences(monkeypatch):
    """The backward's fp32 dbias partials were one [T, T] per block of sequences: H * ceil(N / BLOCK_SEQ)
    * T^2 floats, 131 GB at N = 1M, T = 64, H = 8, BLOCK_SEQ = 1. Now each head's programs walk several
    blocks: the buffer is capped by MAX_DBIAS_PROGRAMS (sizes computed, nothing allocated)."""
    n, t, h = 1_000_000, 64, 8
    shape = ta.dbias_partial_shape(n, t, h, block_seq=1)
    nbytes = math.prod(shape) * 4
    assert nbytes <= (ta.MAX_DBIAS_PROGRAMS + h) * t * t * 4 < 40e6, shape
    assert h * n * t * t * 4 > 100e9  # what one partial per block needed
    # Few sequences: one program per block, as before (no walking, full parallelism).
    assert ta.dbias_partial_shape(100, t, h, block_seq=2) == (h * 50, t, t)
    # The launch agrees with the allocation (meta tensors: nothing is allocated).
    cfg = {"BLOCK_SEQ": 1, "num_warps": 4, "num_stages": 1}
    q = torch.empty(n, t, h, 32, device="meta")
    lse = torch.empty(h, n, t, device="meta")
    partial = torch.empty(shape, device="meta")
    launch = ta.bwd_launch(q, q, q, q, q, lse, torch.empty(h, t, t, device="meta"), None, q, q, q, partial,
                           False, 0.1, cfg)
    assert launch.grid == (shape[0],)


def test_dbias_with_programs_walking_several_blocks(monkeypatch):
    """MAX_DBIAS_PROGRAMS lowered so that each program walks 5-6 blocks of one sequence: dq, dk, dv and
    dbias still match float64 (every partial written: the buffers start as NaN) and repeat bit for bit."""
    monkeypatch.setattr(ta, "MAX_DBIAS_PROGRAMS", 3)
    case = make_case(11, 5, 2, 32, torch.float32, bias=True, causal=True, mask="random", seed=12)
    key = ta.config_key("bwd", 16, 32, torch.float32)
    assert ta.dbias_partial_shape(11, 5, 2, 1) == (4, 5, 5)
    with autotune.forced(ta.OP_NAME, key, {"BLOCK_SEQ": 1, "num_warps": 4, "num_stages": 1}):
        first = with_triton(case)
        again = with_triton(case)
    assert torch.equal(first["dbias"], again["dbias"])
    check_against_float64(case, first)


@triton.jit
def _lse_offset_probe(Out, h, N, T, n0, BLOCK: tl.constexpr, WIDEN: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK)
    offs_t = tl.arange(0, BLOCK)
    if WIDEN:
        off = ta._lse_offsets(h, N, T, offs_n, offs_t)
    else:  # the kernels' old arithmetic: h * N in int32, widened only when n is added
        off = (h * N + offs_n.to(tl.int64)[:, None]) * T + offs_t[None, :]
    rows = tl.arange(0, BLOCK)
    tl.store(Out + rows[:, None] * BLOCK + rows[None, :], off)


def test_lse_offsets_do_not_wrap_at_2_31_sequences_times_heads():
    """lse[h, n, t] lives at (h N + n) T + t. With H N >= 2^31 the old h * N wrapped in int32 (GPU
    arithmetic, which the interpreter reproduces); the kernels' helper widens h first. The control
    shows that the probe sees the wrap, so the check can fail."""
    h, n, t, n0, block = 3, 2**30, 16, 2**30 - 16, 16
    want = torch.tensor([[(h * n + n0 + i) * t + j for j in range(block)] for i in range(block)])
    got = torch.empty(block, block, dtype=torch.int64)
    _lse_offset_probe[(1,)](got, h, n, t, n0, BLOCK=block, WIDEN=True)
    assert torch.equal(got, want)
    _lse_offset_probe[(1,)](got, h, n, t, n0, BLOCK=block, WIDEN=False)
    assert not torch.equal(got, want), "control: the int32 product should have wrapped"


def test_a_backward_no_config_can_launch_falls_back_to_the_reference(monkeypatch):
    """fp32, T_pad 64, D 128 needs 131,072 B of shared memory in every backward config: more than sm_86 / sm_89
    (RTX 30xx / 40xx) have, so the AOT table says no config launches there. That backward runs the PyTorch
    reference instead (same gradients), with a warning, rather than failing at launch."""
    why = autotune.aot_unlaunchable(ta.OP_NAME, ta.config_key("bwd", 64, 128, torch.float32), 86)
    assert why is not None and "131,072" in why
    assert autotune.aot_unlaunchable(ta.OP_NAME, ta.config_key("bwd", 64, 128, torch.float32), 90) is None
    assert autotune.aot_unlaunchable(ta.OP_NAME, ta.config_key("bwd", 64, 128, torch.bfloat16), 86) is None
    case = make_case(3, 10, 2, 32, torch.float32, bias=True, causal=True, mask="random")
    kernel = with_triton(case)
    monkeypatch.setattr(ta, "backward_unlaunchable", lambda q: "it needs more shared memory than this GPU has")
    ta._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="the PyTorch reference computes this backward"):
        fallback = with_triton(case)
    check_against_float64(case, fallback)
    for name in kernel:
        torch.testing.assert_close(fallback[name], kernel[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, complaint",
    [
        (lambda c: c.update(q=c["q"].double(), k=c["k"].double(), v=c["v"].double()), "dtypes"),
        (lambda c: c.update(q=c["q"][..., :16], k=c["k"][..., :16], v=c["v"][..., :16]), "head dim D=16"),
        (lambda c: c.update(q=c["q"][..., ::2], k=c["k"][..., ::2], v=c["v"][..., ::2]), "head dim"),
        (lambda c: c.update(k=c["k"][:, :3]), "shapes differ"),
        (lambda c: c.update(bias=torch.zeros(2, 4, 4)), "bias must be"),
        (lambda c: c.update(key_mask=torch.ones(3, 5)), "key_mask must be bool"),
        (lambda c: c.update(scale=torch.tensor(0.5)), "scale must be a Python number"),
    ],
)
def test_bad_input_is_refused_with_reason(mutate, complaint):
    case = make_case(3, 5, 2, 32, torch.float32)
    mutate(case)
    with pytest.raises(ValueError, match=rf"temporal_attention: not supported because .*{complaint}"):
        temporal_attention(case["q"], case["k"], case["v"], bias=case["bias"], key_mask=case["key_mask"],
                           scale=case.get("scale"))


def test_too_many_frames_and_strided_last_dim_are_refused():
    x = torch.randn(2, 65, 1, 32)
    with pytest.raises(ValueError, match="not supported because T=65"):
        temporal_attention(x, x, x)
    y = torch.randn(2, 4, 1, 64)[..., ::2]
    with pytest.raises(ValueError, match="last dim has stride 2"):
        temporal_attention(y, y, y)


def test_auto_on_cpu_runs_the_reference():
    case = make_case(3, 6, 2, 32, torch.float32, bias=True, causal=True, mask="random")
    kwargs = {"bias": case["bias"], "causal": True, "key_mask": case["key_mask"]}
    with dispatch.backend_override("auto"):
        got = temporal_attention(case["q"], case["k"], case["v"], **kwargs)
    assert torch.equal(got, temporal_attention_reference(case["q"], case["k"], case["v"], **kwargs))


def test_sdpa_backend_matches_reference_and_handles_empty_rows():
    case = make_case(4, 10, 2, 32, torch.float32, bias=True, causal=True, mask="empty-rows", seed=5)
    got = run_case(case, "sdpa")
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
    assert torch.equal(got["out"][0], torch.zeros_like(got["out"][0]))
    check_against_float64(case, got)


def test_sdpa_backend_without_bias_or_mask_uses_is_causal():
    case = make_case(3, 7, 2, 32, torch.float32, causal=True, seed=6)
    check_against_float64(case, run_case(case, "sdpa"))


def test_xformers_refuses_cpu_tensors():
    case = make_case(2, 4, 1, 32, torch.float32)
    with dispatch.backend_override("xformers"), pytest.raises(
        dispatch.BackendNotSupported, match="xformers: not supported because it has no CPU operator"
    ):
        temporal_attention(case["q"], case["k"], case["v"])


class TinyTemporalBlock(torch.nn.Module):
    """DiT-like: fused qkv projection -> temporal attention over frames -> output projection."""

    def __init__(self, dim=64, heads=2, frames=8):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.rel_bias = torch.nn.Parameter(0.1 * torch.randn(heads, frames, frames))

    def forward(self, x, key_mask):
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).unbind(2)
        y = temporal_attention(q, k, v, bias=self.rel_bias[:, :t, :t], causal=True, key_mask=key_mask)
        return self.proj(y.reshape(n, t, c))


def _compile_block_and_compare(device, backend):
    torch.manual_seed(0)
    block = TinyTemporalBlock().to(device)
    x = torch.randn(6, 8, 64, device=device)
    key_mask = torch.rand(6, 8, device=device) > 0.3
    key_mask[1] = False
    with dispatch.backend_override(backend):
        eager = block(x, key_mask)
        eager.square().mean().backward()
        eager_grads = [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)  # fullgraph: any graph break raises
        out = compiled(x, key_mask)
        out.square().mean().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    for p, want in zip(block.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-4)


def test_compile_fullgraph_on_cpu_with_reference_backend():
    _compile_block_and_compare("cpu", "auto")


def test_tuned_configs_load_per_gpu_and_fall_back(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.PROFILES_ENV, str(tmp_path))
    monkeypatch.setattr(autotune, "device_name", lambda device: "Fake GPU 9000 (80GB)")
    autotune.clear_cache()
    cpu = torch.device("cpu")
    fwd_key = ta.config_key("fwd", 16, 32, torch.float32)
    bwd_key = ta.config_key("bwd", 16, 32, torch.float32)

    cfg, source = ta.select_config("fwd", 16, 32, torch.float32, cpu)
    assert source == "default" and cfg == ta.default_config("fwd", 16, 32, torch.float32)

    path = autotune.save(ta.OP_NAME, {fwd_key: {"BLOCK_SEQ": 2, "num_warps": 2, "num_stages": 2, "ms": 0.1}},
                         "Fake GPU 9000 (80GB)")
    assert path == tmp_path / "fake-gpu-9000-80gb" / "temporal_attention.json"
    autotune.save(ta.OP_NAME, {bwd_key: {"BLOCK_SEQ": 1, "num_warps": 4, "num_stages": 1}},
                  "Fake GPU 9000 (80GB)")
    assert ta.select_config("fwd", 16, 32, torch.float32, cpu) == (
        {"BLOCK_SEQ": 2, "num_warps": 2, "num_stages": 2}, "tuned")
    assert ta.select_config("bwd", 16, 32, torch.float32, cpu)[0]["BLOCK_SEQ"] == 1  # merged, not replaced
    assert ta.select_config("fwd", 32, 32, torch.float32, cpu)[1] == "default"  # untuned key

    # The kernels run correctly with the loaded configs (several programs per head).
    case = make_case(5, 9, 2, 32, torch.float32, bias=True, mask="random", seed=7)
    check_against_float64(case, with_triton(case))

    monkeypatch.setattr(autotune, "device_name", lambda device: "Other GPU")  # untuned GPU
    assert ta.select_config("fwd", 16, 32, torch.float32, cpu)[1] == "default"

    path.write_text("{not json")
    monkeypatch.setattr(autotune, "device_name", lambda device: "Fake GPU 9000 (80GB)")
    with pytest.warns(UserWarning, match="ignoring unreadable tuned-config file"):
        assert ta.select_config("fwd", 16, 32, torch.float32, cpu)[1] == "default"


def test_tune_command_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tuning would actually run")
    from fastdiff.cli import main

    assert main(["tune", "attention"]) != 0
    assert "cannot tune because" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# GPU checks (skipped without CUDA)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t", [1, 10, 20, 33, 64])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_float64_reference(dtype, t, d):
    case = make_case(37, t, 3, d, dtype, bias=True, causal=True, mask="empty-rows", seed=t * d, device="cuda")
    check_against_float64(case, with_triton(case))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_more_than_65536_sequences_checked_in_chunks():
    n, t, h, d = 70_000 // 2, 16, 2, 64  # 70,000 (n, h) sequences: past the peers' grid limit
    torch.manual_seed(0)
    qkv = torch.randn(n, t, 3, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(h, t, t, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key_mask = torch.rand(n, t, device="cuda") > 0.2
    q, k, v = qkv.unbind(2)
    out = temporal_attention(q, k, v, bias=bias, causal=True, key_mask=key_mask)
    grad = torch.randn_like(out)
    out.backward(grad)
    dbias_ref = torch.zeros(h, t, t, dtype=torch.float64, device="cuda")
    for start in range(0, n, 8192):
        sl = slice(start, start + 8192)
        qkv64 = qkv.detach()[sl].double().requires_grad_()
        b64 = bias.detach().double().requires_grad_()
        ref = temporal_attention_reference(*qkv64.unbind(2), bias=b64, causal=True, key_mask=key_mask[sl])
        ref.backward(grad[sl].double())
        dbias_ref += b64.grad
        assert max_err(out[sl], ref) < 2e-2
        assert max_err(qkv.grad[sl], qkv64.grad) < 5e-2
    assert max_err(bias.grad, dbias_ref) < 1e-2 * max(1.0, dbias_ref.abs().max().item())
    with dispatch.backend_override("sdpa"), pytest.raises(dispatch.BackendNotSupported, match="146704"):
        temporal_attention(q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compile_fullgraph_with_triton_kernels():
    _compile_block_and_compare("cuda", "triton")


def test_reference_formula_matches_a_plain_loop():
    """The reference itself, against a per-sequence loop written from the formula."""
    case = make_case(2, 5, 2, 32, torch.float64, bias=True, causal=True, mask="empty-rows")
    q, k, v, bias, key_mask = case["q"], case["k"], case["v"], case["bias"], case["key_mask"]
    got = temporal_attention_reference(q, k, v, bias=bias, causal=True, key_mask=key_mask)
    want = torch.zeros_like(got)
    for n in range(2):
        for h in range(2):
            for i in range(5):
                keys = [j for j in range(i + 1) if key_mask[n, j]]
                if not keys:
                    continue
                s = torch.stack([q[n, i, h] @ k[n, j, h] / math.sqrt(32) + bias[h, i, j] for j in keys])
                p = torch.softmax(s, 0)
                want[n, i, h] = sum(p[m] * v[n, j, h] for m, j in enumerate(keys))
    torch.testing.assert_close(got, want)
