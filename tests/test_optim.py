"""Optimizer choice and state-dict conversion: a run can switch between our fused 8-bit AdamW,
bitsandbytes' AdamW8bit and torch AdamW when it resumes, and keeps its moments when it does."""

import copy
import itertools

import pytest
import torch

from fastdiff.optim import OPTIMIZERS, build_optimizer, convert_state_dict, detect_format, load_state_dict_any
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


@pytest.mark.parametrize("src,dst", list(itertools.permutations(OPTIMIZERS, 2)))
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

    params = [torch.nn.Parameter(torch.randn(10))]
    for mode in ("eager", "device", "graph"):
        opt = step_optimizer(build_config("tiny", None, {"run.step": mode, "optim.name": "adamw"}), "adamw", params)
        assert opt.defaults["fused"] and opt.defaults["capturable"] is (mode == "graph"), mode
