"""Blockwise 8-bit AdamW (kernels/adamw8bit.py): code tables, quantisation, kernel vs reference,
200-step trajectories against torch AdamW and bitsandbytes, memory, rounding, state dicts, graphs."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from fastdiff_kernels import dispatch
from fastdiff_kernels.adamw8bit import (
    BLOCKSIZE,
    AdamW8bitFused,
    dequantize_blockwise,
    dynamic_code,
    nearest_code_index,
    quantize_blockwise,
)

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # pragma: no cover
    bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes not importable")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# ---- trajectory tolerances (200 steps, lr 1e-3, MLP below; measured values in brackets) ---------------
# Error is measured against how far the parameters moved (mean |p_200 - p_0| of the fp32 run, "moved"),
# in the style of bitsandbytes' tests/test_optim.py: a bound on the mean error and a bound on the
# number of elements that are far off.
# 8-bit vs fp32 torch AdamW: mean |diff| / moved  [ours 0.035 / 0.029 on the two weight matrices,
# bitsandbytes 0.035 / 0.029 on the same run: the bound is about 8-bit state itself, not our kernel]
MEAN_ERR_VS_FP32 = 0.05
# ... elements with |diff| > 0.25 * moved, as a share of the tensor  [~0.2%]
FAR_SHARE_VS_FP32 = 0.03
# ours may not be worse than bitsandbytes against fp32 by more than this factor (mean error)  [~1.0]
WORSE_THAN_BNB_MAX = 1.25
# ours vs bitsandbytes AdamW8bit (same algorithm, bnb's CPU quantiser is not exactly nearest)  [~0.011]
MEAN_ERR_VS_BNB = 0.015
# Triton kernel (interpreter) vs our PyTorch reference: single steps agree to fp32 ulps (tested above), but
# over 200 steps an ulp now and then moves a value across an 8-bit code boundary, and the trajectories
# drift apart about as far as two 8-bit runs can  [~0.0074]
MEAN_ERR_TRITON_VS_REF = 0.012


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: threads only add contention on the shared 2-core CI machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- code tables and quantisation -------------------------------------------------------------------


def test_code_tables_structure():
    for signed in (True, False):
        code = dynamic_code(signed)
        assert code.shape == (256,) and code.dtype == torch.float32
        assert torch.all(code[1:] > code[:-1]), "code must be sorted and free of duplicates"
        assert code[-1] == 1.0 and (code == 0).sum() == 1
    signed = dynamic_code(True)
    positives = signed[signed > 0]
    assert torch.equal(-positives[:-1].flip(0), signed[signed < 0]), "signed code: +-v except 1.0"
    assert dynamic_code(False).min() == 0.0


@needs_bnb
def test_code_tables_match_bitsandbytes():
    assert torch.equal(dynamic_code(True), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_code(False), bnbF.create_dynamic_map(signed=False))


@pytest.mark.parametrize("numel", [1, 255, 256, 257, 1000, 4097])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_roundtrip(numel, signed):
    gen = torch.Generator().manual_seed(numel)
    # heavy-tailed values spanning many decades, as optimizer moments do
    x = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen).pow(6) * 3.0
    if not signed:
        x = x * x
    code = dynamic_code(signed)
    q, absmax = quantize_blockwise(x, code, positive_floor=not signed)
    assert q.dtype == torch.uint8 and q.shape == x.shape and absmax.shape == (-(-numel // BLOCKSIZE),)
    padded = torch.zeros(absmax.numel() * BLOCKSIZE)
    padded[:numel] = x
    assert torch.equal(absmax, padded.view(-1, BLOCKSIZE).abs().amax(1))
    deq = dequantize_blockwise(q, absmax, code)
    scale = absmax.repeat_interleave(BLOCKSIZE)[:numel]
    scaled = x / scale
    # the chosen code is the nearest one (brute force), except the documented positive floor for v
    chosen = (code[q.long()] - scaled).abs()
    best = (code[None, :] - scaled[:, None]).abs().min(1).values
    floored = (~torch.tensor(signed)) & (q == 1) & (scaled > 0) & (scaled < code[1] / 2)
    assert torch.all((chosen <= best + 1e-7) | floored)
    # error bound: half the gap to the neighbouring code, times absmax (the floor: at most code[1])
    gaps = torch.diff(code)
    half_gap = torch.maximum(
        torch.cat([gaps[:1], gaps])[q.long()], torch.cat([gaps, gaps[-1:]])[q.long()]
    ) / 2
    bound = torch.where(floored, code[1], half_gap)
    assert torch.all((deq - x).abs() <= bound * scale * (1 + 1e-5) + 1e-12)
    # relative error of values within a decade of absmax: the code has >= 64 steps over [0.1, 1]
    big = x.abs() >= 0.1 * scale
    assert torch.all(((deq - x).abs() / x.abs())[big] <= (0.9 / 64 / 2) / 0.1 * 1.01)


def test_nearest_ties_go_low_and_extremes():
    code = dynamic_code(True)
    mid = (code[10] + code[11]) / 2
    x = torch.stack([mid, torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(0.0)])
    idx = nearest_code_index(x, code)
    assert idx.tolist()[1:] == [0, 255, int((code == 0).nonzero())]
    assert idx[0] in (10, 11) and (code[idx[0]] - mid).abs() <= (code[11] - code[10]) / 2


def test_dequantize_rejects_wrong_absmax():
    q = torch.zeros(600, dtype=torch.uint8)
    with pytest.raises(ValueError, match="blocks"):
        dequantize_blockwise(q, torch.ones(2), dynamic_code(True))


# ---- kernel (interpreter) vs reference ------------------------------------------------------------------


def _params(dtype, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    shapes = [(64, 80), (33,), (4100,), (17, 5), (300, 20), (0,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(ps, gen):
    out = []
    for p in ps:
        g = torch.randn(p.shape, generator=gen) * torch.rand(p.shape, generator=gen).pow(4)
        out.append(g.to(p.dtype))
    return out


def _run_steps(backend, dtype, steps=3, stochastic=False):
    ps = _params(dtype)
    opt = AdamW8bitFused(
        [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.1}],
        lr=1e-2, weight_decay=1e-2, stochastic_rounding=stochastic,
    )
    gen = torch.Generator().manual_seed(1)
    history = []
    with dispatch.backend_override(backend):
        for i in range(steps):
            for p, g in zip(ps, _grads(ps, gen)):
                p.grad = g
            if i == 1:
                ps[1].grad = None  # skipped this step: param, state and step count untouched
                ps[3].grad = torch.randn(1, 1, generator=gen).to(dtype).expand(17, 5)  # stride-0 grad
            before = [p.detach().clone() for p in ps]
            opt.step()
            history.append(before)
    return ps, opt, history


def _assert_states_match(opt_a, opt_b, max_code_mismatch=0):
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert sa.keys() == sb.keys()
        for key in sa:
            a, b = sa[key], sb[key]
            if a.dtype == torch.uint8:
                assert (a != b).sum() <= max_code_mismatch, key
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interpreter_matches_reference(dtype):
    p_ref, o_ref, _ = _run_steps("reference", dtype)
    p_tri, o_tri, hist = _run_steps("triton", dtype)
    _assert_states_match(o_ref, o_tri)
    for a, b in zip(p_ref, p_tri):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
        else:  # same fp32 result up to an ulp, then the same rounding: bf16 differs only at ties
            assert (a != b).sum() <= 2
    # step counts: ps[1] skipped once
    steps = [float(o_tri.state[p]["step"]) for p in p_tri]
    assert steps == [3.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    # the skipped param was left untouched at step 2
    assert torch.equal(hist[2][1], hist[1][1])
    if dtype == torch.float32:  # every element of an updated tensor was written (no lane left out)
        for before, after in zip(hist[1], hist[2]):
            if before.numel() and not torch.equal(before, hist[2][1]):
                assert torch.all(before != after)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_found_inf_skips_the_step_on_the_device(backend):
    """found_inf = 1 (as a non-finite loss sets it, with no host sync) leaves weights, moments, absmax and
    step counts bit-identical; found_inf = 0 is exactly a normal step."""
    ps, opt, _ = _run_steps(backend, torch.float32, steps=2)
    gen = torch.Generator().manual_seed(7)
    grads = _grads(ps, gen)
    snapshot = lambda: ([p.detach().clone() for p in ps],
                        {k: {n: t.clone() for n, t in st.items()} for k, st in enumerate(opt.state.values())})

    def step(found_inf):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.found_inf = found_inf
        with dispatch.backend_override(backend):
            opt.step()
        opt.found_inf = None

    before_p, before_s = snapshot()
    step(torch.ones(()))
    after_p, after_s = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before_p, after_p))
    for k in before_s:
        for name in before_s[k]:
            assert torch.equal(before_s[k][name], after_s[k][name]), name
    step(torch.zeros(()))
    ps_ref, opt_ref, _ = _run_steps(backend, torch.float32, steps=2)
    for p, g in zip(ps_ref, grads):
        p.grad = g.clone()
    with dispatch.backend_override(backend):
        opt_ref.step()
    for a, b in zip(ps, ps_ref):
        assert torch.equal(a, b)
    _assert_states_match(opt, opt_ref)


def test_every_element_written_triton():
    # updates of ~lr on O(1) params: any unwritten lane would keep its old value
    ps = _params(torch.float32, gen_seed=3)
    before = [p.detach().clone() for p in ps]
    opt = AdamW8bitFused(ps, lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    for p, g in zip(ps, _grads(ps, gen)):
        p.grad = g + 1e-3 * torch.sign(g)  # bounded away from 0
    with dispatch.backend_override("triton"):
        opt.step()
    for b, p in zip(before, ps):
        assert torch.all(b != p.detach())
    for p in ps:
        st = opt.state[p]
        if "absmax_exp_avg" in st:
            assert torch.all(st["absmax_exp_avg"] > 0) and torch.all(st["absmax_exp_avg_sq"] > 0)
        elif "exp_avg" in st:
            assert torch.all(st["exp_avg"] != 0)


# ---- 200-step trajectories ---------------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    # 16*320 = 5120 and 320*16 = 5120 weights (8-bit state); biases 320 and 16 (fp32 state)
    return torch.nn.Sequential(torch.nn.Linear(16, 320), torch.nn.GELU(), torch.nn.Linear(320, 16))


def _train(make_opt, steps=200, backend="reference"):
    torch.manual_seed(1)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    model = _mlp()
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(123)
    with dispatch.backend_override(backend):
        for _ in range(steps):
            x = torch.randn(32, 16, generator=gen)
            loss = (model(x) - teacher(x).detach()).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _errors(a, b, moved):
    err = (a - b).abs()
    return err.mean().item() / moved, (err > 0.25 * moved).float().mean().item()


@needs_bnb
def test_trajectory_200_steps_vs_torch_and_bnb():
    init = [p.detach() for p in _mlp().parameters()]
    fp32 = _train(lambda ps: torch.optim.AdamW(ps, **HYPER))
    ours = _train(lambda ps: AdamW8bitFused(ps, **HYPER), backend="triton")
    ours_ref = _train(lambda ps: AdamW8bitFused(ps, **HYPER), backend="reference")
    theirs = _train(lambda ps: bnb.optim.AdamW8bit(ps, **HYPER))
    for i, (f, o, r, t, p0) in enumerate(zip(fp32, ours, ours_ref, theirs, init)):
        moved = (f - p0).abs().mean().item()
        assert moved > 1e-2, "the test must move the parameters to mean anything"
        mean_o, far_o = _errors(o, f, moved)
        mean_t, _ = _errors(t, f, moved)
        assert mean_o < MEAN_ERR_VS_FP32, (i, mean_o)
        assert far_o < FAR_SHARE_VS_FP32, (i, far_o)
        assert mean_o < WORSE_THAN_BNB_MAX * mean_t + 1e-3, (i, mean_o, mean_t)
        assert _errors(o, t, moved)[0] < MEAN_ERR_VS_BNB, i
        assert _errors(o, r, moved)[0] < MEAN_ERR_TRITON_VS_REF, i


# ---- memory -----------------------------------------------------------------------------------------------


def test_state_bytes_per_param():
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(512, 256), (256, 512), (512,), (256,), (1000, 300)]]
    opt = AdamW8bitFused(ps)
    nbytes = opt.state_nbytes()
    n_params = sum(p.numel() for p in ps)
    n_8bit = sum(p.numel() for p in ps if p.numel() >= 4096)
    per_8bit = (nbytes["moments_8bit"] + nbytes["absmax"]) / n_8bit
    assert 2.0 < per_8bit <= 2.0 + 8 / 256 + 1e-3  # 2 uint8 + 2 fp32 absmax per 256 (+ block padding)
    total = sum(nbytes.values()) / n_params  # everything: fp32 state of small tensors, tables, steps
    assert total <= 2.1, nbytes


# ---- weight decay, rounding ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_weight_decay_is_decoupled(backend):
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(4500,), (70,)]]
    before = [p.detach().clone() for p in ps]
    lr, wd = 0.05, 0.3
    opt = AdamW8bitFused(ps, lr=lr, weight_decay=wd)
    with dispatch.backend_override(backend):
        for step in range(1, 3):
            for p in ps:
                p.grad = torch.zeros_like(p)
            opt.step()
            for b, p in zip(before, ps):
                torch.testing.assert_close(p.detach(), b * (1 - lr * wd) ** step, rtol=1e-6, atol=0)
    for p in ps:  # zero gradients leave zero moments
        moments = [t for k, t in opt.state[p].items() if k.startswith("exp_avg") and t.dtype != torch.uint8]
        assert all(not t.float().any() for t in moments)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bf16_stochastic_rounding_is_unbiased(backend):
    # Updates of ~1e-4 on values in [1, 2), where bf16's spacing is 2^-7 = 7.8e-3: round-to-nearest
    # never moves the parameter; stochastic rounding moves it by the right amount on average.
    n, lr = 8192, 1e-4
    init = (1.0 + torch.rand(n, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    results = {}
    for stochastic in (False, True):
        p = torch.nn.Parameter(init.clone())
        opt = AdamW8bitFused([p], lr=lr, weight_decay=0.0, stochastic_rounding=stochastic, seed=1234)
        with dispatch.backend_override(backend):
            for _ in range(4):
                p.grad = torch.ones_like(p)  # Adam's update is then lr per step, downwards
                opt.step()
        results[stochastic] = p.detach().float()
    assert torch.equal(results[False], init.float())
    drift = (init.float() - results[True]).mean().item()
    expected = 4 * lr
    # each element moved by a whole number of bf16 spacings; the mean matches within ~4 sigma
    spacing = 2.0**-7
    moved = init.float() - results[True]
    assert torch.all((moved / 2**-8).round() * 2**-8 == moved)  # bf16 values: spacing >= 2^-8 here
    sigma = (4 * lr * spacing) ** 0.5 / n**0.5
    assert abs(drift - expected) < 4 * sigma + 1e-6, (drift, expected)


def test_bf16_nearest_rounding_matches_fp32_math():
    p32 = torch.nn.Parameter(torch.randn(5000, generator=torch.Generator().manual_seed(2)))
    p16 = torch.nn.Parameter(p32.detach().to(torch.bfloat16))
    g = torch.randn(5000, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    p32.data = p16.detach().float().clone()  # same starting values
    o32, o16 = AdamW8bitFused([p32], lr=1e-2), AdamW8bitFused([p16], lr=1e-2)
    p32.grad, p16.grad = g.float(), g
    with dispatch.backend_override("triton"):
        o32.step()
        o16.step()
    assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))  # round to nearest even


# ---- hyper-parameters on the device, state dicts, bad input ------------------------------------------


def test_lr_changes_take_effect_float_and_tensor():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bitFused([p], lr=1e-2, weight_decay=0.0)
    p.grad = torch.randn(5000)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    opt.step()
    assert torch.equal(before, p.detach())
    opt.param_groups[0]["lr"] = torch.tensor(1e-2)
    opt.step()
    assert not torch.equal(before, p.detach())
    opt.param_groups[0]["lr"].fill_(0.0)  # a captured graph follows a schedule this way
    before = p.detach().clone()
    opt.step()
    assert torch.equal(before, p.detach())


def test_state_dict_roundtrip_resumes_exactly():
    def make():
        return _params(torch.float32, gen_seed=7)

    ps_a = make()
    opt_a = AdamW8bitFused(ps_a, lr=1e-2)
    gen = torch.Generator().manual_seed(9)
    grads = [_grads(ps_a, gen) for _ in range(6)]
    for i in range(3):
        for p, g in zip(ps_a, grads[i]):
            p.grad = g
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps_a], "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    ps_b = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt_b = AdamW8bitFused(ps_b, lr=0.5)  # lr comes back from the state dict
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.param_groups[0]["lr"] == 1e-2
    for i in range(3, 6):
        for p, q, g in zip(ps_a, ps_b, grads[i]):
            p.grad, q.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(ps_a, ps_b):
        assert torch.equal(p, q)
    _assert_states_match(opt_a, opt_b)
    # state_dict() gives copies: stepping does not change a saved dict
    sd = opt_a.state_dict()
    snapshot = sd["state"][0]["exp_avg"].clone()
    opt_a.step()
    assert torch.equal(sd["state"][0]["exp_avg"], snapshot)


def test_load_torch_adamw_state_quantises():
    p = torch.nn.Parameter(torch.randn(5000))
    torch_opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(5000)
    torch_opt.step()
    ours = AdamW8bitFused([p], lr=1e-3)
    ours.load_state_dict(torch_opt.state_dict())
    st = ours.state[p]
    assert st["exp_avg"].dtype == torch.uint8 and float(st["step"]) == 1.0
    m = dequantize_blockwise(st["exp_avg"], st["absmax_exp_avg"], dynamic_code(True))
    ref = torch_opt.state[p]["exp_avg"]
    assert (m - ref).abs().max() <= 0.01 * ref.abs().max()


def test_bad_inputs():
    with pytest.raises(TypeError, match="dtype"):
        AdamW8bitFused([torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))])
    with pytest.raises(TypeError, match="dtype"):
        AdamW8bitFused([torch.zeros(4, dtype=torch.int32)])
    with pytest.raises(ValueError, match="lr"):
        AdamW8bitFused([torch.nn.Parameter(torch.zeros(4))], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW8bitFused([torch.nn.Parameter(torch.zeros(4))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps"):
        AdamW8bitFused([torch.nn.Parameter(torch.zeros(4))], eps=0.0)
    p = torch.nn.Parameter(torch.zeros(4))
    opt = AdamW8bitFused([p])
    p.grad = torch.zeros(4)
    opt.param_groups[0]["lr"] = torch.tensor([1e-3, 1e-3])
    with pytest.raises(ValueError, match="1-element"):
        opt.step()
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})


def test_dispatch_defaults_to_reference_on_cpu():
    assert dispatch.resolve("adamw8bit", torch.zeros(1)) == "reference"
    with dispatch.backend_override("triton"):
        assert dispatch.resolve("adamw8bit", torch.zeros(1)) == "triton"  # the interpreter is on here


# ---- GPU: graph capture and no host sync ---------------------------------------------------------------


def _gpu_problem(dtype=torch.float32, device="cuda"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    model = model.to(device).to(dtype)
    x = torch.randn(32, 64, device=device, dtype=dtype)
    return model, x


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_matches_eager(dtype):
    results = []
    for use_graph in (False, True):
        model, x = _gpu_problem(dtype)
        opt = AdamW8bitFused(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), weight_decay=0.01)

        def step(model=model, x=x, opt=opt):
            loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()

        if not use_graph:
            for _ in range(8):
                opt.zero_grad(set_to_none=False)
                step()
        else:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up, eager
                    opt.zero_grad(set_to_none=False)
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                step()
            for _ in range(5):
                # grads live in the graph pool: zero them in place before each replay
                for p in model.parameters():
                    p.grad.zero_()
                graph.replay()
        torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in model.parameters()], opt.state_dict()))
    (pa, sa), (pb, sb) = results
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    for k in sa["state"]:
        assert float(sa["state"][k]["step"]) == float(sb["state"][k]["step"]) == 8.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_step_does_not_sync(device):
    """CUDA: under set_sync_debug_mode("error"); CPU (the reference step): under fastdiff.sync_check.NoHostSync,
    which raises on the ops that would sync a CUDA stream."""
    from fastdiff.sync_check import NoHostSync

    model, x = _gpu_problem(device=device)
    opt = AdamW8bitFused(model.parameters(), lr=1e-3, stochastic_rounding=True)
    model(x).pow(2).mean().backward()
    opt.step()  # first step uploads tables
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    guard = NoHostSync() if device == "cpu" else contextlib.nullcontext()
    try:
        with guard:
            for i in range(3):
                # CUDA: new grads every step, so the pointer table is re-uploaded (pinned, async); the CPU
                # reference has no table and keeps the grads' storage, as the sync-free step does
                opt.zero_grad(set_to_none=device == "cuda")
                model(x).pow(2).mean().backward()
                opt.param_groups[0]["lr"] = 1e-3 * (i + 1)  # a scheduler changing lr: still no sync
                opt.step()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@needs_cuda
def test_gpu_kernel_matches_reference():
    for dtype in (torch.float32, torch.bfloat16):
        outs = []
        for backend in ("triton", "reference"):
            ps = [torch.nn.Parameter(t.cuda()) for t in _params(dtype)]
            opt = AdamW8bitFused(ps, lr=1e-2)
            gen = torch.Generator().manual_seed(1)
            with dispatch.backend_override(backend):
                for _ in range(3):
                    for p, g in zip(ps, _grads([p.cpu() for p in ps], gen)):
                        p.grad = g.cuda()
                    opt.step()
            outs.append((ps, opt))
        (pa, oa), (pb, ob) = outs
        for a, b in zip(pa, pb):  # GPU fp32 may contract to FMA: a few ulps, rare code flips
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5)
        _assert_states_match(oa, ob, max_code_mismatch=8)
