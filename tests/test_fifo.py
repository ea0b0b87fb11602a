"""FIFO diagonal denoising: the queue's levels and windows, one sampler launch per step, the order in which
frames leave the queue, lookahead's observed history, bad input, and device memory constant in N."""

import pytest
import torch
from torch import nn

from fastdiff import fifo
from fastdiff.config import DiffusionConfig
from fastdiff.diffusion import Schedule
from fastdiff.fifo import FifoPlan, FifoSampler, fifo_frames
from fastdiff.memory import TensorMemoryTracker
from fastdiff.models.dit import VideoDiT
from fastdiff_kernels import dispatch

SCHEDULE = Schedule.make("linear", 1000)
CFG = DiffusionConfig()


pytestmark = pytest.mark.usefixtures("one_thread")


class Spy(nn.Module):
    """Records every call; predicts zero noise (then DDIM only rescales: x -> x a'/a)."""

    def __init__(self, max_frames: int):
        super().__init__()
        self.max_frames = max_frames
        self.calls = []

    def forward(self, x, t, observed):
        self.calls.append((x.clone(), t.clone(), observed.clone()))
        return torch.zeros_like(x)


def _noisy_model(window=4, size=4):
    torch.manual_seed(0)
    model = VideoDiT(3, size, size, window, width=32, depth=1, heads=1).eval()
    for p in model.parameters():  # leave adaLN-zero so that the output depends on the input
        nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("partitions", [1, 3])
def test_plan_levels_and_windows_tile_the_queue(partitions, lookahead):
    plan = FifoPlan(6, partitions, lookahead, 1000)
    levels = plan.levels()
    assert len(levels) == 6 * partitions and levels[-1] == 999
    assert torch.all(levels[1:] > levels[:-1])  # noise rises from head to tail, every rung distinct
    idx, written = plan.windows()
    assert idx.shape == ((2 if lookahead else 1) * partitions, 6)
    # the written parts of the windows cover every queue slot exactly once, in order
    slots = (idx[:, -written:] - plan.front).flatten()
    assert slots.tolist() == list(range(plan.length))
    t, observed, kept = plan.call_pattern()
    if lookahead:
        assert written == 3 and observed[0, :3].all() and not observed[1:].any()
        # every written block has f/2 strictly cleaner frames in front of it
        assert torch.all(t[:, :3].amax(1) < t[:, 3:].amin(1))
    else:
        assert written == 6 and not observed.any() and kept.all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=5, partitions=2, lookahead=True), "even window"),
    (dict(window=4, partitions=0), "partitions"),
    (dict(window=1), "at least 2"),
    (dict(window=10, partitions=20, timesteps=100), "distinct noise levels"),
])
def test_plan_refuses_bad_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FifoPlan(**kwargs)


def test_sampler_refuses_bad_input():
    model = Spy(max_frames=4)
    with pytest.raises(ValueError, match="exceeds the model"):
        FifoSampler(model, torch.zeros(1, 2, 3, 4, 4), SCHEDULE, CFG, FifoPlan(6, 1, False))
    with pytest.raises(ValueError, match="context must be"):
        FifoSampler(model, torch.zeros(1, 0, 3, 4, 4), SCHEDULE, CFG, FifoPlan(4, 1, False))
    with pytest.raises(ValueError, match="T=1000"):
        FifoSampler(model, torch.zeros(1, 2, 3, 4, 4), SCHEDULE, CFG, FifoPlan(4, 1, False, timesteps=500))
    with pytest.raises(ValueError, match="warmup"):
        next(fifo_frames(model, torch.zeros(1, 2, 3, 4, 4), SCHEDULE, CFG, FifoPlan(4, 1, False), warmup=-1))


@pytest.mark.parametrize("lookahead", [False, True])
def test_one_sampler_launch_and_n_model_calls_per_step(monkeypatch, lookahead):
    launches = []
    real = fifo.ops.ddim_step
    monkeypatch.setattr(fifo.ops, "ddim_step", lambda *a, **k: launches.append(a[0].shape) or real(*a, **k))
    model = Spy(max_frames=4)
    sampler = FifoSampler(model, torch.randn(1, 2, 3, 4, 4), SCHEDULE, CFG, FifoPlan(4, 3, lookahead), max_batch=1)
    for _ in range(5):
        sampler.step()
    assert launches == [(1, 12, 3, 4, 4)] * 5  # the whole queue, every frame at its own level, at once
    calls_per_step = 6 if lookahead else 3  # 2n windows with lookahead, n blocks without
    assert len(model.calls) == 5 * calls_per_step
    assert all(x.shape == (1, 4, 3, 4, 4) for x, _, _ in model.calls)  # each call sees f frames


def test_frames_leave_the_queue_in_order_after_walking_every_rung():
    """With a zero-noise prediction DDIM only rescales, so the frame emitted at step s must be exactly the
    frame that sat in slot s at the start, divided by its alpha; later, the tail noise enqueued L steps
    earlier divided by alpha at T-1. Any slip in the diagonal bookkeeping breaks the equality."""
    plan = FifoPlan(4, 2, lookahead=False)
    gen = torch.Generator().manual_seed(0)
    sampler = FifoSampler(Spy(4), torch.randn(2, 3, 3, 4, 4), SCHEDULE, CFG, plan, generator=gen)
    a = SCHEDULE.alpha[plan.levels()]
    start = sampler.queue.clone()
    tails = []
    emitted = []
    for _ in range(3 * plan.length):
        emitted.append(sampler.step())
        tails.append(sampler.queue[:, -1].clone())
    for s in range(plan.length):
        torch.testing.assert_close(emitted[s], start[:, s] / a[s])
    for s in range(plan.length, 3 * plan.length):
        torch.testing.assert_close(emitted[s], tails[s - plan.length] / a[-1])


def test_lookahead_head_window_sees_the_observed_history():
    plan = FifoPlan(4, 2, lookahead=True)
    context = torch.randn(1, 3, 3, 4, 4)
    model = Spy(4)
    sampler = FifoSampler(model, context, SCHEDULE, CFG, plan)
    first = sampler.step()
    x, t, observed = model.calls[0]
    head = 0  # windows are batched in queue order: the first row is the head window
    assert observed[head, :2].all() and not observed[head, 2:].any()
    assert torch.all(t[head, :2] == 0)
    torch.testing.assert_close(x[head, :2], context[0, -2:])  # the last f/2 observed frames
    sampler.step()
    x, _, _ = model.calls[-1]
    torch.testing.assert_close(x[head, :2], torch.stack([context[0, -1], first[0]]))  # history slides


def test_context_steers_the_generated_frames():
    model = _noisy_model()
    plan = FifoPlan(4, 2, lookahead=True)
    a = next(fifo_frames(model, torch.zeros(1, 2, 3, 4, 4), SCHEDULE, CFG, plan,
                         generator=torch.Generator().manual_seed(0)))
    b = next(fifo_frames(model, torch.ones(1, 2, 3, 4, 4), SCHEDULE, CFG, plan,
                         generator=torch.Generator().manual_seed(0)))
    assert a.shape == (1, 3, 4, 4) and torch.isfinite(a).all()
    assert (a - b).abs().mean() > 1e-3


@pytest.mark.skipif(not (dispatch.interpreter_active() or torch.cuda.is_available()),
                    reason="needs the Triton interpreter (TRITON_INTERPRET=1) or a GPU")
def test_queue_steps_through_the_triton_kernels_match_the_reference():
    """The fused per-frame DDIM step and the temporal attention kernel, run as FIFO runs them."""
    model = _noisy_model()
    context = torch.randn(1, 2, 3, 4, 4)
    outs = {}
    for backend in ("reference", "triton"):
        with dispatch.backend_override(backend):
            sampler = FifoSampler(model, context, SCHEDULE, CFG, FifoPlan(4, 2, True))
            sampler.queue = torch.randn(sampler.queue.shape, generator=torch.Generator().manual_seed(1))
            outs[backend] = torch.stack([sampler.step() for _ in range(3)])
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=1e-4, rtol=1e-4)


def _peak_bytes(frames: int, keep: bool = False) -> int:
    model = _noisy_model(window=4, size=4)
    plan = FifoPlan(4, 1, lookahead=True)
    kept = []
    with TensorMemoryTracker() as tracker:
        stream = fifo_frames(model, torch.randn(1, 2, 3, 4, 4), SCHEDULE, CFG, plan,
                             generator=torch.Generator().manual_seed(0))
        for _ in range(frames):
            frame = next(stream)
            if keep:  # a consumer that holds every frame on the device: memory must grow
                kept.append(frame)
    return tracker.peak


def test_memory_is_constant_in_the_number_of_frames():
    short, long = _peak_bytes(100), _peak_bytes(2000)
    assert short > 0
    assert abs(long - short) <= 0.03 * short, (short, long)
    # the measurement itself can see growth: holding the frames shows up
    assert _peak_bytes(200, keep=True) > short + 100 * 3 * 4 * 4 * 4


@pytest.mark.gpu
def test_cuda_memory_is_constant_in_the_number_of_frames():
    def peak(frames):
        model = _noisy_model(window=10, size=8).cuda()
        plan = FifoPlan(10, 4, lookahead=True)
        schedule = Schedule.make("linear", 1000, "cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        stream = fifo_frames(model, torch.randn(1, 5, 3, 8, 8, device="cuda"), schedule, CFG, plan)
        for _ in range(frames):
            next(stream)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    short, long = peak(100), peak(2000)
    assert abs(long - short) <= 0.03 * short, (short, long)
