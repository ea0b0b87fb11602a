"""The online step (fastdiff/step.py): the sync-free device step against the eager reference, its device-side
skip of non-finite steps, resume, torch.compile for real, refusals; on a GPU the captured CUDA graph against
eager and under set_sync_debug_mode("error")."""

import json

import pytest
import torch
from test_train import _cfg, _params

import fastdiff.step as step_module
from fastdiff.cli import main
from fastdiff.config import ConfigError
from fastdiff.models.autoencoder import FrameAutoencoder
from fastdiff.step import StepModeError
from fastdiff.train import OnlineTrainer

QUIET = lambda *_, **__: None  # noqa: E731


def _run(tmp_path, name, **extra):
    trainer = OnlineTrainer(_cfg(tmp_path, **{"run__log_every": 1, **extra}), tmp_path / name, log=QUIET)
    summary = trainer.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, summary, losses


@pytest.mark.parametrize("warmup,cooldown", [(0, 0.0), (8, 0.0), (0, 0.5), (8, 0.5)])
def test_device_step_is_bit_identical_to_eager_with_the_fused_8bit_optimizer(tmp_path, warmup, cooldown):
    """The same step, the sync-free way: same losses, weights, EMA and buffer, bit for bit; with a learning-rate
    warm-up and cool-down too (a host float in eager, a device tensor in the sync-free step)."""
    schedule = {"optim__warmup": warmup, "optim__cooldown": cooldown}
    eager, s_eager, l_eager = _run(tmp_path, "eager", run__frames=30, optim__name="adamw8bit-fused", **schedule)
    fast, s_fast, l_fast = _run(tmp_path, "fast", run__frames=30, optim__name="adamw8bit-fused", run__step="device",
                                **schedule)
    assert l_eager == l_fast and len(l_fast) == 21
    base, planned = fast.cfg.optim.lr, 21  # 30 frames, one step per frame once the 10-frame window is full
    expected = [base * (min(1.0, (i + 1) / warmup) if warmup else 1.0)
                * (min(1.0, (planned - i) / (cooldown * planned)) if cooldown else 1.0) for i in range(21)]
    for run in ("eager", "fast"):
        lrs = [json.loads(line)["lr"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert lrs == pytest.approx(expected, rel=1e-6)
    if cooldown:  # falls to a small positive rate at the last planned step, not to 0 before it
        assert 0 < lrs[-1] < 0.1 * base and lrs[10] == pytest.approx(base)
    assert s_fast["steps"] == s_eager["steps"] == 21
    a, b = _params(eager), _params(fast)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = eager.step.ema.state_dict(), fast.step.ema.state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)  # device-side EMA warm-up = the host's
    assert int(fast.step.buffer.seen) == int(eager.step.buffer.seen)
    assert torch.equal(fast.step.buffer.starts, eager.step.buffer.starts)  # insert positions from the device counter


def test_device_step_is_bit_identical_to_eager_with_prioritised_replay(tmp_path):
    """Prioritised replay's draws and score updates are device work too: the same run either way, and the
    replayed windows' scores moved from the mean they entered at to their own losses."""
    extra = {"run__frames": 30, "optim__name": "adamw8bit-fused", "replay__priority": 1.0, "replay__windows": 4}
    eager, _, l_eager = _run(tmp_path, "eager", **extra)
    fast, _, l_fast = _run(tmp_path, "fast", run__step="device", **extra)
    assert l_eager == l_fast
    a, b = _params(eager), _params(fast)
    assert all(torch.equal(a[k], b[k]) for k in a)
    scores = fast.step.buffer.scores[:4]
    assert torch.equal(scores, eager.step.buffer.scores[:4])
    assert torch.all(scores > 0) and len(set(scores.tolist())) == 4
    _, _, l_uniform = _run(tmp_path, "uniform", **{**extra, "replay__priority": 0.0})
    assert l_uniform[:2] == l_eager[:2] and l_uniform != l_eager  # the same until the buffer holds 2 windows


def test_device_step_matches_eager_with_fused_adamw(tmp_path):
    # torch's fused AdamW (the one that honours found_inf) rounds differently from the foreach one: close, not equal
    _, _, l_eager = _run(tmp_path, "eager", run__frames=25, optim__name="adamw")
    _, _, l_fast = _run(tmp_path, "fast", run__frames=25, optim__name="adamw", run__step="device")
    assert l_fast == pytest.approx(l_eager, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw8bit-fused", "adamw"])
def test_device_step_skips_a_nonfinite_step_on_the_device(tmp_path, monkeypatch, optimizer):
    trainer = OnlineTrainer(_cfg(tmp_path, run__frames=40, optim__name=optimizer, run__step="device"),
                            tmp_path / "run", log=QUIET)
    while trainer.steps < 2:  # two honest steps first: the optimizer has state
        trainer.advance()
        trainer.step.result()
    fast = trainer.step
    snapshot = lambda: (_params(trainer), {k: v.clone() for k, v in trainer.step.ema.state_dict().items()},
                        json.dumps({str(k): {n: t.tolist() for n, t in st.items() if torch.is_tensor(t)}
                                    for k, st in trainer.step.optimizer.state_dict()["state"].items()}))
    before = snapshot()
    real_loss = step_module.training_loss
    monkeypatch.setattr(step_module, "training_loss", lambda *a, **k: real_loss(*a, **k) * float("nan"))
    trainer.advance()
    after = snapshot()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2] == after[2]  # moments and step counts untouched
    result = fast.result()
    assert result.skipped and trainer.skipped == 1 and trainer.steps == 2
    monkeypatch.setattr(step_module, "training_loss", real_loss)
    trainer.advance()  # training goes on
    assert not all(torch.equal(after[0][k], v) for k, v in _params(trainer).items())
    assert fast.result().skipped is False and trainer.steps == 3


def test_device_step_reports_skips_in_the_run_summary(tmp_path, monkeypatch):
    real_loss = step_module.training_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("inf") if calls["n"] in (3, 7) else loss

    monkeypatch.setattr(step_module, "training_loss", sometimes_nan)
    _, summary, _ = _run(tmp_path, "run", run__frames=25, optim__name="adamw8bit-fused", run__step="device",
                         run__log_every=5)
    assert summary["skipped_steps"] == 2 and summary["steps"] == 16 - 2


@pytest.mark.parametrize("warmup", [0, 200])
def test_device_step_resumes_bit_identically(tmp_path, warmup):
    # warmup 200: the learning rate is a device tensor the optimizer's groups must still share after a resume
    # No cool-down: a run of 20 frames cools to 0 at its end, so extending it is not the straight run (below).
    extra = {"optim__name": "adamw8bit-fused", "run__step": "device", "optim__warmup": warmup, "optim__cooldown": 0}
    straight, _, _ = _run(tmp_path, "a", run__frames=30, **extra)
    _run(tmp_path, "b", run__frames=20, **extra)
    resumed = OnlineTrainer(_cfg(tmp_path, run__frames=30, run__log_every=1, **extra), tmp_path / "b", resume=True,
                            log=QUIET)
    resumed.train()
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("step", ["eager", "device"])
def test_an_extended_run_plans_its_cool_down_over_its_new_length(tmp_path, step):
    """20 frames cool the rate down to base/11 at the last of 11 steps; extended to 30 frames, the cool-down is
    planned over 21 steps, so the 12th step (the first after the resume) runs at base * (21 - 11) / 21."""
    extra = {"optim__warmup": 0, "optim__cooldown": 1.0, "run__step": step, "optim__name": "adamw8bit-fused"}
    _run(tmp_path, "run", run__frames=20, **extra)
    resumed = OnlineTrainer(_cfg(tmp_path, run__frames=30, run__log_every=1, **extra), tmp_path / "run", resume=True,
                            log=QUIET)
    resumed.train()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    base = resumed.cfg.optim.lr
    assert len(lrs) == 21
    assert lrs[:11] == pytest.approx([base * (11 - i) / 11 for i in range(11)], rel=1e-6)
    assert lrs[11:] == pytest.approx([base * (21 - i) / 21 for i in range(11, 21)], rel=1e-6)


def test_compiled_model_trains_like_eager(tmp_path):
    torch._dynamo.reset()
    _, _, l_eager = _run(tmp_path, "eager", run__frames=14, optim__name="adamw8bit-fused", run__step="device")
    from torch._dynamo.utils import counters

    counters.clear()
    _, _, l_compiled = _run(tmp_path, "compiled", run__frames=14, optim__name="adamw8bit-fused",
                            run__step="device", run__compile="true")
    assert counters["stats"]["unique_graphs"] >= 1  # really compiled, fullgraph (a break would raise)
    assert l_compiled == pytest.approx(l_eager, rel=1e-4, abs=1e-5)
    torch._dynamo.reset()


def test_step_mode_refusals(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="cannot skip a non-finite step on the device"):
        _cfg(tmp_path, optim__name="adamw8bit-bnb", run__step="device")
    if not torch.cuda.is_available():
        with pytest.raises(StepModeError, match="CUDA graphs need a CUDA device"):
            OnlineTrainer(_cfg(tmp_path, run__step="graph"), tmp_path / "b", log=QUIET)
        # the default preset fits an autoencoder for minutes first: the refusal comes before it
        monkeypatch.setattr(FrameAutoencoder, "fit",
                            lambda *a, **k: pytest.fail("the autoencoder was fitted before the refusal"))
        code = main(["train", "--out", str(tmp_path), "--set", "run.step=graph", "--no-progress"])
        assert code == 2 and "CUDA graphs need a CUDA device" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="teacher is replaced"):
        _cfg(tmp_path, run__step="graph", replay__strategy="gen-distill")
    with pytest.raises(ConfigError, match="host sync every step"):
        _cfg(tmp_path, run__step="graph", run__nan_policy="stop")


# --- GPU: the captured graph -------------------------------------------------------------------------------


def _gpu_cfg(tmp_path, **extra):
    return _cfg(tmp_path, run__device="cuda", run__log_every=1, optim__name="adamw8bit-fused", **extra)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_step_matches_eager_losses(tmp_path, precision):
    runs = {}
    for step in ("eager", "graph"):
        trainer = OnlineTrainer(_gpu_cfg(tmp_path, run__frames=40, run__step=step, run__precision=precision),
                                tmp_path / step, log=QUIET)
        trainer.train()
        runs[step] = [json.loads(x)["loss"] for x in (tmp_path / step / "metrics.jsonl").read_text().splitlines()]
    assert trainer.step.graph is not None
    tol = 1e-4 if precision == "fp32" else 2e-2
    assert runs["graph"] == pytest.approx(runs["eager"], rel=tol, abs=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_model", ["false", "true"])
def test_graph_step_never_syncs(tmp_path, compile_model):
    trainer = OnlineTrainer(_gpu_cfg(tmp_path, run__frames=60, run__step="graph", run__compile=compile_model),
                            tmp_path / "run", log=QUIET)
    while trainer.step.calls < step_module.WARMUP_STEPS + 2:  # warm-up steps, then the capture
        trainer.advance()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            trainer.advance()  # ingest (a device copy) + replay: any host sync raises here
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.step.graph is not None
    assert torch.isfinite(torch.tensor(trainer.step.result().loss))


def _trainer_on_a_clock(tmp_path, seconds_at, sample_seconds_at=lambda frames: 5.0, **extra) -> OnlineTrainer:
    """A run.minutes trainer whose clock reads seconds_at(frames seen) from a start at 0, and whose final sample,
    timed with frames seen, reads sample_seconds_at(frames seen); trainer.final_sample_timings lists (frames,
    seconds) of each timing."""
    trainer = OnlineTrainer(_cfg(tmp_path, **extra), tmp_path / "run", log=QUIET, started=0.0)
    trainer.clock = lambda: float(seconds_at(trainer.frames_seen))
    trainer.estimate_final_sample_seconds = lambda: float(sample_seconds_at(trainer.frames_seen))
    return trainer


@pytest.mark.parametrize("step", ["eager", "device"])
def test_a_time_limited_run_ends_where_its_pace_says_and_replans_its_cool_down(tmp_path, step, monkeypatch):
    """run.minutes with a clock that runs one second a frame: 30 s from the start, less the final sample's 5 s,
    leave 25 frames of the 60 asked for. The first check (5 frames trained, the first step taken with the
    cool-down planned over 51 steps) replans it over 16; the run ends at frame 25 and says so."""
    import fastdiff.train as train_module

    monkeypatch.setattr(train_module, "PACE_FRAMES", 5)
    extra = {"optim__warmup": 0, "optim__cooldown": 1.0, "run__step": step, "optim__name": "adamw8bit-fused",
             "run__frames": 60, "run__log_every": 1, "run__minutes": 0.5}
    trainer = _trainer_on_a_clock(tmp_path, lambda frames: frames, **extra)
    summary = trainer.train()
    assert summary["frames"] == 25 and summary["steps"] == 16
    assert summary["time_limit"]["shortened"] and summary["time_limit"]["frame_limit"] == 60
    assert trainer.step.planned_steps == 16
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    base = trainer.cfg.optim.lr
    assert lrs == pytest.approx([base] + [base * (16 - i) / 16 for i in range(1, 16)], rel=1e-6)


def test_a_time_limited_run_follows_a_machine_that_slows_down(tmp_path, monkeypatch):
    """A clock that runs one second a frame to frame 20 and two after it; the final sample reads 5 s when timed
    while frames take one second and 10 s after. Its second timing comes at frame 28 (36 s gone, 60 - 36 - 8.5 s
    leave 15.5 s of training, under half of 36) and reads 10 s, the recent pace (the last RECENT_FRAMES, 10 here)
    1.8 s a frame; by frame 30 all recent frames took 2 s, the sample is planned at 10 x 2 / 1.8 = 11.1 s and the
    remaining frames at 2 s: the run ends at frame 34 (48 s gone). Planning with the mean pace and the sample as
    first timed ends at frame 37, 54 s gone, and the 10 s sample runs 4 s past the limit."""
    import fastdiff.train as train_module

    monkeypatch.setattr(train_module, "PACE_FRAMES", 5)
    monkeypatch.setattr(train_module, "RECENT_FRAMES", 10)
    extra = {"optim__warmup": 0, "run__frames": 100, "run__log_every": 1, "run__minutes": 1.0}
    trainer = _trainer_on_a_clock(tmp_path, lambda frames: min(frames, 20) + 2 * max(frames - 20, 0),
                                  lambda frames: 5.0 if frames <= 20 else 10.0, **extra)
    plans = {}  # frame -> the last frame planned there
    plan = trainer.step.plan
    trainer.step.plan = lambda total: plans.__setitem__(trainer.frames_seen, total) or plan(total)
    summary = trainer.train()
    last_change = max(plans)
    assert summary["frames"] == 34 and plans[last_change] == 34
    assert last_change <= 30  # planned once the recent frames all took 2 s; the mean pace kept replanning
    assert trainer.final_sample_timings == [(10, 5.0), (28, 10.0)]
    assert trainer.final_sample_pace == pytest.approx(1.8)
    assert trainer.final_sample_planned == pytest.approx(10 * 2 / 1.8)


@pytest.mark.parametrize("first, later, timed_again_at", [(10.0, 20.0, 34), (20.0, 10.0, 27)])
def test_a_time_limited_run_plans_with_the_slower_of_two_timings_of_its_final_sample(
        tmp_path, monkeypatch, first, later, timed_again_at):
    """One second a frame; the final sample reads `first` seconds when timed at frame 10 and `later` after frame 20,
    as a shared CPU's speed drifts. It is timed again once, at the first check where the training left in the plan
    is at most RETIME_SHARE of the training done (10 s planned: 60 - 34 - 10 = 16 <= 17; 20 s: 60 - 27 - 20 = 13 <=
    13.5), and the slower timing, 20 s, plans the end: frame 40 either way. Without the second timing a sample
    that slowed to 20 s would have run from frame 50 to 10 s past the limit; keeping a faster second timing would
    plan 10 s for a sample that may take 20."""
    import fastdiff.train as train_module

    monkeypatch.setattr(train_module, "PACE_FRAMES", 5)
    extra = {"optim__warmup": 0, "run__frames": 100, "run__log_every": 1, "run__minutes": 1.0}
    trainer = _trainer_on_a_clock(tmp_path, lambda frames: frames, lambda frames: first if frames <= 20 else later,
                                  **extra)
    summary = trainer.train()
    assert trainer.final_sample_timings == [(10, first), (timed_again_at, later)] and summary["frames"] == 40
    assert summary["time_limit"]["final_sample_timings"] == [(10, first), (timed_again_at, later)]
    assert summary["time_limit"]["final_sample_estimate_seconds"] == 20.0


def test_a_milestone_sample_is_not_taken_for_a_machine_that_slows_down(tmp_path, monkeypatch):
    """One second a frame, and a sample at frame 20 that takes 60 s (a milestone's, say): the recent pace that
    scales the final sample's estimate leaves that time out, so the plan keeps its 5 s for the final sample and
    trains on to frame 53 (at 113 s, the mean pace of 2.1 s a frame, which keeps the 60 s, leaves no room for
    another frame before 120 - 5). Counting the 60 s as the machine slowing would see 7 s a frame, plan 35 s for
    the final sample and end the run at frame 21."""
    import fastdiff.train as train_module

    monkeypatch.setattr(train_module, "PACE_FRAMES", 5)
    monkeypatch.setattr(train_module, "RECENT_FRAMES", 10)
    extra = {"optim__warmup": 0, "run__frames": 100, "run__log_every": 1, "run__minutes": 2.0,
             "run__sample_every": 20}
    sampled = []
    trainer = _trainer_on_a_clock(tmp_path, lambda frames: frames + 60 * len(sampled), **extra)
    trainer.write_samples = lambda tag: trainer.frames_seen == 20 and sampled.append(tag)  # the one at 40 is free
    summary = trainer.train()
    assert sampled == ["frame00000020"] and summary["frames"] == 53
    assert trainer.final_sample_planned == pytest.approx(5.0)


def test_a_time_limit_that_the_run_fits_in_changes_nothing(tmp_path):
    """The same run with 5 minutes: all 60 frames, the cool-down planned over them from the first step."""
    extra = {"optim__warmup": 0, "optim__cooldown": 1.0, "run__frames": 60, "run__log_every": 1, "run__minutes": 5}
    trainer = _trainer_on_a_clock(tmp_path, lambda frames: frames, **extra)
    summary = trainer.train()
    assert summary["frames"] == 60 and not summary["time_limit"]["shortened"]
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([trainer.cfg.optim.lr * (51 - i) / 51 for i in range(51)], rel=1e-6)
