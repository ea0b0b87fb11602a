"""Optimizer choice and state-dict conversion: a run can switch between our fused 8-bit AdamW,
bitsandbytes' AdamW8bit and torch AdamW when it resumes, and keeps its moments when it does; Muon (MuonAdamW)
against torch's own Muon and AdamW, and its refusals."""

import copy
import itertools

import pytest
import torch

from fastdiff import optim
from fastdiff.config import ADAMW_OPTIMIZERS
from fastdiff.optim import (
    BatchedMuon,
    MuonAdamW,
    build_optimizer,
    convert_state_dict,
    detect_format,
    load_state_dict_any,
)
from fastdiff_kernels import dispatch

HYPER = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _model():
    torch.manual_seed(0)
    # 24*256 = 6144 weights (8-bit state) and biases of 256 and 24 (32-bit state)
    return torch.nn.Sequential(torch.nn.Linear(24, 256), torch.nn.Tanh(), torch.nn.Linear(256, 24))


def _steps(model, opt, count, seed):
    gen = torch.Generator().manual_seed(seed)
    with dispatch.backend_override("reference"):
        for _ in range(count):
            x = torch.randn(16, 24, generator=gen)
            loss = (model(x) - x.roll(1, dims=1)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _clone(model):
    twin = _model()
    twin.load_state_dict(model.state_dict())
    return twin


def _distance(a, b):
    return sum((p - q).abs().sum().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("src,dst", list(itertools.permutations(ADAMW_OPTIMIZERS, 2)))
def test_switching_optimizer_keeps_the_moments(src, dst):
    straight = _model()
    opt = build_optimizer(src, straight.parameters(), **HYPER)
    _steps(straight, opt, 30, seed=1)
    saved = copy.deepcopy(opt.state_dict())  # torch's state_dict holds the live moment tensors
    assert detect_format(saved) == src
    switched, restarted = _clone(straight), _clone(straight)

    _steps(straight, opt, 15, seed=2)  # the run that never switched

    dst_opt = build_optimizer(dst, switched.parameters(), **HYPER)
    load_state_dict_any(dst_opt, saved)
    assert detect_format(dst_opt.state_dict()) == dst
    _steps(switched, dst_opt, 15, seed=2)

    _steps(restarted, build_optimizer(dst, restarted.parameters(), **HYPER), 15, seed=2)  # moments lost

    kept, lost = _distance(straight, switched), _distance(straight, restarted)
    # Adam without its moments restarts with bias-corrected full-size steps: far off the straight run.
    assert kept < 0.2 * lost, (kept, lost)


def test_fused_and_bitsandbytes_share_the_8bit_bytes():
    model = _model()
    opt = build_optimizer("adamw8bit-fused", model.parameters(), **HYPER)
    _steps(model, opt, 5, seed=3)
    ours = opt.state_dict()
    params = list(model.parameters())
    as_bnb = convert_state_dict(ours, "adamw8bit-fused", "adamw8bit-bnb", params)
    back = convert_state_dict(as_bnb, "adamw8bit-bnb", "adamw8bit-fused", params)
    big = [i for i, p in enumerate(params) if p.numel() >= 4096]
    assert big, "the model must have an 8-bit tensor"
    for i in big:
        assert as_bnb["state"][i]["state1"].dtype == torch.uint8
        assert torch.equal(as_bnb["state"][i]["state1"], ours["state"][i]["exp_avg"])
        for key in ("exp_avg", "exp_avg_sq", "absmax_exp_avg", "absmax_exp_avg_sq"):
            assert torch.equal(back["state"][i][key], ours["state"][i][key]), key
    assert back["param_groups"][0]["lr"] == HYPER["lr"]


def test_conversion_refuses_a_different_parameter_count():
    model = _model()
    opt = build_optimizer("adamw", model.parameters(), **HYPER)
    _steps(model, opt, 1, seed=0)
    with pytest.raises(ValueError, match="covers 4 parameters but 2 were given"):
        convert_state_dict(opt.state_dict(), "adamw", "adamw8bit-fused", list(model.parameters())[:2])


def test_unknown_optimizer_name_is_refused():
    with pytest.raises(ValueError, match="adamw8bit-fused"):
        build_optimizer("sgd", _model().parameters(), lr=1e-3, weight_decay=0.0)


def test_torch_adamw_is_fused_and_capturable_for_a_captured_step():
    """A captured step needs torch's AdamW built capturable (its step count on the device), or its step() refuses
    graph capture: the graph mode builds it so, the other modes as plain fused."""
    from fastdiff.config import build_config
    from fastdiff.step import step_optimizer

    model = torch.nn.Linear(10, 1)
    for mode in ("eager", "device", "graph"):
        opt = step_optimizer(build_config("tiny", None, {"run.step": mode, "optim.name": "adamw"}), "adamw", model)
        assert opt.defaults["fused"] and opt.defaults["capturable"] is (mode == "graph"), mode


def _dit():
    from fastdiff.models.dit import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(3, 8, 8, 4, width=64, depth=2, heads=2, patch=4, local_mix=True, spatial_bias=True)
    for p in model.parameters():  # leave adaLN-zero, so that every parameter gets a gradient
        torch.nn.init.normal_(p, std=0.1)
    return model


def _dit_steps(model, opt, count, seed, lrs=None):
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        if lrs is not None:  # as the trainer's schedule sets it
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        x = torch.randn(2, 4, 3, 8, 8, generator=gen)
        t = torch.randint(0, 1000, (2, 4), generator=gen).float()
        observed = torch.tensor([[True, True, False, False]] * 2)
        with dispatch.backend_override("reference"):
            loss = (model(x, t, observed) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _muon_reference(param, grad, buf, group):
    """One Muon step in float64, written out from its definition: (new param, new momentum buffer)."""
    param, grad, buf = param.double(), grad.double(), buf.double()
    buf = buf + (grad - buf) * (1 - group["momentum"])
    update = grad + (buf - grad) * group["momentum"] if group["nesterov"] else buf
    tall = update.shape[0] > update.shape[1]
    x = update.T if tall else update
    x = x / x.norm().clamp(min=group["eps"])
    a, b, c = group["ns_coefficients"]
    for _ in range(group["ns_steps"]):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    rows, cols = param.shape
    scale = 0.2 * max(rows, cols) ** 0.5 if group["adjust_lr_fn"] == "match_rms_adamw" else max(1, rows / cols) ** 0.5
    return param * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * scale * x, buf


@pytest.mark.parametrize("adjust_lr_fn,nesterov,stack_elements",
                         [("match_rms_adamw", True, None), ("original", False, None), (None, True, 64)])
def test_batched_muon_matches_torch_muon_against_float64(monkeypatch, adjust_lr_fn, nesterov, stack_elements):
    """BatchedMuon against torch.optim.Muon and a float64 step written from Muon's definition, over three steps
    from fresh random states: odd shapes, a tall and a wide matrix of one shape once transposed (stacked together),
    several of one shape (and, with a small stack limit, split over several stacks), a matrix without a gradient.
    Its bf16 error stays within 2x torch's own; its momentum buffers equal torch's; and torch's state loads into it."""
    if stack_elements:
        monkeypatch.setattr(optim, "STACK_ELEMENTS", stack_elements)
    gen = torch.Generator().manual_seed(7)
    shapes = [(24, 40), (40, 24), (24, 40), (17, 5), (9, 9), (9, 9), (9, 9), (1, 6), (33, 33)]
    ours = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=3e-2, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    opt, torch_opt = BatchedMuon(ours, **kwargs), torch.optim.Muon(theirs, **kwargs)
    group = opt.param_groups[0]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in ours[:-1]]  # the last one gets no gradient
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        before = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone() if p in opt.state
                   else torch.zeros_like(p)) for p in ours]
        opt.step()
        torch_opt.step()
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if i == len(ours) - 1:
                assert torch.equal(p, before[i][0]) and p not in opt.state  # no gradient: untouched
                continue
            want, want_buf = _muon_reference(before[i][0], grads[i], before[i][1], group)
            assert torch.equal(opt.state[p]["momentum_buffer"], torch_opt.state[q]["momentum_buffer"])
            assert torch.allclose(opt.state[p]["momentum_buffer"].double(), want_buf, atol=1e-6)
            ours_err = (p.double() - want).abs().max().item()
            torch_err = (q.double() - want).abs().max().item()
            step = (want - before[i][0].double()).abs().max().item()
            assert ours_err <= 2 * torch_err + 1e-3 * step, (shapes[i], ours_err, torch_err)
        for p, q in zip(ours, theirs):  # continue both from the same point
            q.data.copy_(p.data)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    loaded = BatchedMuon(resumed, **kwargs)
    loaded.load_state_dict(torch_opt.state_dict())
    for p, q in zip(resumed[:-1], theirs[:-1]):
        assert torch.equal(loaded.state[p]["momentum_buffer"], torch_opt.state[q]["momentum_buffer"])


def test_muon_steps_the_blocks_matrices_as_torch_muon_and_the_rest_as_torch_adamw():
    """optim.name=muon on a DiT: the blocks' linear weights (and nothing else) step as torch.optim.Muon with
    Moonshot's lr scaling steps them (to bf16 rounding: ours batches the iteration), every other parameter exactly
    as torch's fused AdamW, through a schedule that changes the lr every step; the orthogonalised step is not
    AdamW's."""
    from fastdiff.config import build_config
    from fastdiff.step import step_optimizer

    model = _dit()
    matrices = model.hidden_matrices()
    linear_weights = {id(m.weight) for b in model.blocks for m in b.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(p) for p in matrices} == linear_weights and len(matrices) == 2 * 7  # qkv + proj x 2, fc1, fc2, ada
    assert all(p.ndim == 2 for p in matrices)
    assert not any(p is model.blocks[0].temporal.rel_bias or p is model.blocks[0].spatial.rel_bias for p in matrices)

    cfg = build_config("tiny", None, {"optim.name": "muon", "optim.weight_decay": "0.01"})
    ours = step_optimizer(cfg, "muon", model)
    assert isinstance(ours, MuonAdamW)
    twin = _dit()
    twin_matrices = twin.hidden_matrices()
    chosen = {id(p) for p in twin_matrices}
    o = cfg.optim
    muon = torch.optim.Muon(twin_matrices, lr=o.lr, weight_decay=o.weight_decay, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([p for p in twin.parameters() if id(p) not in chosen], lr=o.lr,
                              betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, fused=True)
    lrs = [2e-3, 1e-3, 5e-4, 2e-3]

    class Both:
        param_groups = muon.param_groups + adamw.param_groups

        def zero_grad(self, set_to_none):
            muon.zero_grad(set_to_none), adamw.zero_grad(set_to_none)

        def step(self):
            muon.step(), adamw.step()

    # Step by step from the same parameters: BatchedMuon runs torch's iteration batched, equal up to bf16 matmul
    # rounding (measured on an AVX2-only AMD EPYC: up to 0.019 lr per element, on the adaLN matrices, where a Muon
    # step moves an element by about 0.2 lr RMS), and the rest takes AdamW's step bit for bit. The parameters are
    # re-synced after each step because over several steps that rounding reaches every parameter through the
    # gradients (by up to a tenth of lr there); the momentum and Adam states see the same gradients, so stay equal.
    for step, lr in enumerate(lrs):
        _dit_steps(model, ours, 1, seed=3 + step, lrs=[lr])
        _dit_steps(twin, Both(), 1, seed=3 + step, lrs=[lr])
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            if id(q) in chosen:
                assert torch.allclose(p, q, rtol=0, atol=0.05 * lr), (step, name)
            else:
                assert torch.equal(p, q), (step, name)
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                q.copy_(p)

    plain = _dit()
    adamw_only = build_optimizer("adamw", plain.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    for step, lr in enumerate(lrs):
        _dit_steps(plain, adamw_only, 1, seed=3 + step, lrs=[lr])
    moved = [(p - q).abs().amax() for p, q in zip(model.hidden_matrices(), plain.hidden_matrices())]
    assert max(moved) > 1e-4  # the matrices took Muon's step, not AdamW's


def test_muon_state_round_trips_and_refuses_conversion():
    """A checkpointed MuonAdamW resumes to the same next steps as one that never stopped; its state is detected
    as Muon's and converting it to or from any AdamW is refused with the reason; the sync-free step refuses it."""
    from fastdiff.config import ConfigError, build_config, validate

    straight, resumed = _dit(), _dit()
    opt = build_optimizer("muon", straight.parameters(), matrices=straight.hidden_matrices(), **HYPER)
    _dit_steps(straight, opt, 3, seed=1)
    saved = copy.deepcopy(opt.state_dict())
    assert detect_format(saved) == "muon"
    resumed.load_state_dict(straight.state_dict())
    again = build_optimizer("muon", resumed.parameters(), matrices=resumed.hidden_matrices(), **HYPER)
    load_state_dict_any(again, saved)
    _dit_steps(straight, opt, 2, seed=2)
    _dit_steps(resumed, again, 2, seed=2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    adamw = build_optimizer("adamw", resumed.parameters(), **HYPER)
    with pytest.raises(ValueError, match="not supported because Muon"):
        load_state_dict_any(adamw, saved)
    with pytest.raises(ValueError, match="not supported because Muon"):
        load_state_dict_any(again, adamw.state_dict())
    with pytest.raises(ValueError, match="not Muon's"):
        again.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(ValueError, match="2-D"):
        build_optimizer("muon", resumed.parameters(), matrices=[resumed.blocks[0].spatial.qkv.bias], **HYPER)
    for mode in ("device", "graph"):
        with pytest.raises(ConfigError, match="not supported because that optimizer cannot skip"):
            validate(build_config("tiny", None, {"optim.name": "muon", "run.step": mode}))
