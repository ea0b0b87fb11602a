"""The online trainer end to end on CPU: what a run directory holds, learning on a tiny stream,
a stopped run resuming bit-identically, strategies, and the CLI's refusals."""

import json

import pytest
import torch

from fastdiff import evaluate
from fastdiff.cli import main
from fastdiff.config import build_config
from fastdiff.metrics import rescore_colour_kl
from fastdiff.models.autoencoder import FrameAutoencoder
from fastdiff.train import OnlineTrainer

# A trainer small enough for a few seconds on 2 cores: 64-wide DiT, 2 heads of 32, 16-frame AE fit.
TINY = {
    "model.width": "64", "model.depth": "2", "model.heads": "2",
    "autoencoder.latent": "ae", "model.patch": "1",
    "autoencoder.warmup_frames": "32", "autoencoder.fit_steps": "5", "autoencoder.fit_batch": "8",
    "autoencoder.hidden": "16", "replay.replayed": "2", "replay.windows": "8",
    "run.checkpoint_every": "10", "run.sample_every": "0", "run.final_clips": "0", "run.sample_frames": "12",
    "run.log_every": "5", "run.progress": "false", "optim.name": "adamw",
}


def _cfg(tmp_path, **extra):
    overrides = {**TINY, "run.out": str(tmp_path), **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return build_config("tiny", None, overrides)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.step.model.state_dict().items()}


def test_run_directory_holds_everything(tmp_path):
    cfg = _cfg(tmp_path, run__frames=30)
    run_dir = tmp_path / "run"
    summary = OnlineTrainer(cfg, run_dir, log=lambda *_: None).train()
    assert summary["frames"] == 30
    assert summary["steps"] == 30 - 10 + 1  # one step per frame once the first window is full
    assert summary["skipped_steps"] == 0
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))
    assert [p.name for p in ckpts] == ["ckpt_0000000010.pt", "ckpt_0000000020.pt", "ckpt_0000000030.pt"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in rows] == [10, 15, 20, 25, 30]
    assert all(r["loss"] > 0 for r in rows)
    for name in ("final-frame00000030.png", "final-frame00000030.gif"):
        assert (run_dir / "samples" / name).stat().st_size > 0
    assert (run_dir / "autoencoder.pt").exists()


def test_a_fitted_autoencoder_is_loaded_instead_of_fitted(tmp_path, monkeypatch):
    """autoencoder.load: a second run of the same stream takes the first run's fitted autoencoder and does not fit;
    one of other settings, or a missing file, is refused by name."""
    first = tmp_path / "first"
    OnlineTrainer(_cfg(tmp_path, run__frames=12), first, log=lambda *_: None).train()
    fitted = torch.load(first / "autoencoder.pt", weights_only=True)

    def no_fit(*_, **__):
        raise AssertionError("fitted although autoencoder.load names a fitted one")

    monkeypatch.setattr(FrameAutoencoder, "fit", no_fit)
    logged = []
    second = OnlineTrainer(_cfg(tmp_path, run__frames=12, autoencoder__load=first / "autoencoder.pt"),
                           tmp_path / "second", log=logged.append)
    assert any("autoencoder loaded from" in line for line in logged)
    for name, value in torch.load(tmp_path / "second" / "autoencoder.pt", weights_only=True).items():
        assert torch.equal(value, fitted[name])
        assert torch.equal(second.autoencoder.state_dict()[name], value)
    with pytest.raises(ValueError, match="does not fit this run's autoencoder settings"):
        OnlineTrainer(_cfg(tmp_path, run__frames=12, autoencoder__hidden=8, autoencoder__load=first / "autoencoder.pt"),
                      tmp_path / "third", log=lambda *_: None)
    with pytest.raises(ValueError, match="is not a file"):
        OnlineTrainer(_cfg(tmp_path, run__frames=12, autoencoder__load=tmp_path / "missing.pt"),
                      tmp_path / "fourth", log=lambda *_: None)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_the_autoencoder_is_fitted_in_the_runs_precision(tmp_path, monkeypatch, precision, dtype):
    seen = []
    fit = FrameAutoencoder.fit

    def recording_fit(self, *args, **kwargs):
        seen.append(kwargs.get("autocast"))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(FrameAutoencoder, "fit", recording_fit)
    OnlineTrainer(_cfg(tmp_path, run__frames=12, run__precision=precision), tmp_path / "run", log=lambda *_: None)
    assert seen == [dtype]


def _stop_at(trainer, frames):
    """Train `frames` frames of the trainer's run and stop there as Ctrl-C does: rewind the stream, checkpoint.
    (Not a shorter run extended: a run's learning-rate cool-down ends at its own last frame.)"""
    while trainer.frames_seen < frames:
        assert trainer.advance()
    trainer.feed.close()
    trainer.save_checkpoint()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_stopped_run_resumes_bit_identically(tmp_path, optimizer):
    """30 frames in one go == 30 frames stopped at frame 20 and resumed: every parameter bit for bit, the
    learning-rate cool-down of the preset included; with torch's AdamW and with Muon (its two parts' state in the
    checkpoint)."""
    assert _cfg(tmp_path).optim.cooldown > 0
    straight = OnlineTrainer(_cfg(tmp_path, run__frames=30, optim__name=optimizer), tmp_path / "a",
                             log=lambda *_: None)
    straight.train()

    _stop_at(OnlineTrainer(_cfg(tmp_path, run__frames=30, optim__name=optimizer), tmp_path / "b",
                           log=lambda *_: None), 20)
    resumed = OnlineTrainer(_cfg(tmp_path, run__frames=30, optim__name=optimizer), tmp_path / "b", resume=True,
                            log=lambda *_: None)
    assert resumed.frames_seen == 20
    resumed.train()

    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.steps == straight.steps
    # ... and the two runs did not simply both stay at initialisation
    fresh = OnlineTrainer(_cfg(tmp_path, run__frames=30, optim__name=optimizer), tmp_path / "c", log=lambda *_: None)
    assert any(not torch.equal(a[k], v) for k, v in _params(fresh).items())


@pytest.mark.parametrize("strategy", ["er", "none", "full"])
def test_strategies_train(tmp_path, strategy):
    cfg = _cfg(tmp_path, run__frames=14, replay__strategy=strategy)
    trainer = OnlineTrainer(cfg, tmp_path / strategy, log=lambda *_: None)
    summary = trainer.train()
    assert summary["steps"] == 5 and summary["skipped_steps"] == 0
    if strategy == "none":
        assert trainer.step.buffer is None
    else:
        assert int(trainer.step.buffer.seen) == 5


def test_pixel_space_and_pixel_storage(tmp_path):
    cfg = _cfg(tmp_path, run__frames=12, autoencoder__latent="none", replay__storage="pixel")
    trainer = OnlineTrainer(cfg, tmp_path / "px", log=lambda *_: None)
    assert trainer.latent_shape == (3, 32, 32)
    assert trainer.step.buffer.windows.dtype == torch.uint8
    assert trainer.train()["steps"] == 3


def test_cli_refuses_bad_config_before_work(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path), "--set", "model.width=-3", "--no-progress"])
    assert code == 2
    assert "model.width" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no run directory was made


def test_cli_refuses_bad_stream(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path), "--stream", "nosuch", "--no-progress"])
    assert code == 2
    assert "not supported" in capsys.readouterr().err


def test_trainer_refuses_a_rollout_that_observes_the_whole_window(tmp_path):
    with pytest.raises(ValueError, match="rollout_observed=10 not supported because it leaves no frame"):
        OnlineTrainer(_cfg(tmp_path, diffusion__rollout_observed=10), tmp_path / "run", log=lambda *a, **k: None)


def test_cli_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_replay_buffer_is_sized_as_the_paper_did():
    """5% of the stream's frames, in windows: 5,000 windows of 10 for 1M frames of balls, 2,500 of 20 for
    the maze (the paper's ltm_size); `full` keeps every window; pixel storage is uint8."""
    from fastdiff.build import buffer_plan

    plan = lambda stream_frames, window, hw, **overrides: buffer_plan(
        build_config("small", None, {"replay.fraction": "0.05", **overrides}), window, (*hw, 3), stream_frames,
        torch.device("cpu"))
    assert plan(1_000_000, 10, (32, 32))[:2] == (5000, (10, 4, 8, 8))
    assert plan(1_000_000, 20, (64, 64))[0] == 2500
    assert plan(1000, 10, (32, 32), **{"replay.strategy": "full"})[0] == 991
    assert plan(1000, 10, (32, 32), **{"replay.storage": "pixel"})[1:] == ((10, 32, 32, 3), torch.uint8)
    assert plan(1000, 10, (32, 32), **{"replay.strategy": "none"}) is None


def test_milestones_score_the_model_on_fixed_heldout_clips(tmp_path):
    """Learning is visible while it happens: every milestone writes the EMA model's held-out loss, minADE and
    two-ball rate on the same few clips to metrics.jsonl."""
    cfg = _cfg(tmp_path, run__frames=30, run__milestone_every=10, run__milestone_clips=1)
    trainer = OnlineTrainer(cfg, tmp_path / "run", log=lambda *_: None)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "heldout_loss" in r]
    assert [r["frame"] for r in scored] == [10, 20, 30]
    for r in scored:
        assert r["heldout_loss"] > 0 and r["heldout_minADE"] >= 0 and 0 <= r["heldout_ball_count_ok"] <= 1
        assert r["heldout_forecast_error"] > 0  # the one-call forecast, on its own, larger set of windows
    assert scored[0]["heldout_loss"] != scored[-1]["heldout_loss"]  # the model changed between milestones
    assert len(list((tmp_path / "run" / "milestones").glob("frame*.pt"))) == 3


def test_final_sample_is_scored_against_the_floors(tmp_path):
    """A balls run ends with its EMA model continuing held-out clips, scored next to the floors on the same clips,
    into summary.json and the log, with the sample written where the summary says."""
    cfg = _cfg(tmp_path, run__frames=20, run__final_clips=2, diffusion__sample_steps=2)
    lines = []
    summary = OnlineTrainer(cfg, tmp_path / "run", log=lambda *a: lines.append(" ".join(map(str, a)))).train()
    final = summary["final_sample"]
    written = json.loads((tmp_path / "run" / "summary.json").read_text())["final_sample"]
    assert json.dumps(written, sort_keys=True) == json.dumps(final, sort_keys=True)
    # the transition counts are kept, so the model's ColorKL can be recomputed from the summary alone
    assert rescore_colour_kl(dict(final["model"]))["ColorKL"] == final["model"]["ColorKL"]
    assert final["clips"] >= 1 and final["generated"] == 45 and final["samples_per_clip"] == 3
    assert set(final["floors"]) == {"ground truth", "repeat last frame", "constant velocity"}
    truth = final["floors"]["ground truth"]
    assert truth["minADE"] < 1.0 and truth["ball_count_ok"] > 0.9  # the detector finds the real balls
    assert final["floors"]["repeat last frame"]["minADE"] > truth["minADE"]
    forecast = final["forecast"]  # the one-call forecast error per frame ahead, with its floors, printed too
    assert 1 <= forecast["forecast_windows"] <= evaluate.FORECAST_WINDOWS  # fewer where the stream is short
    assert set(forecast["forecast_error_per_frame"]) == {"model", "repeat last frame", "constant velocity"}
    assert all(len(v) == 5 for v in forecast["forecast_error_per_frame"].values())
    assert any("one-call forecast error" in line for line in lines)
    assert truth["ball_speed"] > 0.3 and final["floors"]["repeat last frame"]["ball_speed"] == 0.0
    for scores in (final["model"], *final["floors"].values()):
        assert 0 <= scores["ball_count_ok"] <= 1 and scores["minADE"] >= 0
    assert (tmp_path / "run" / "samples" / "final-frame00000020.png").exists()
    printed = "\n".join(lines)
    assert "repeat last frame" in printed and final["sample"] in printed and "speed px/frame" in printed


def test_the_final_sample_estimate_is_its_model_calls_times_a_timed_call(tmp_path, monkeypatch):
    """run.minutes plans for the final sample: 8 clips x 3 samples, 5 real + 45 generated frames; with K = 10, 20
    steps and the pyramid's 10 calls between frame starts, 9 windows of 20 + 4 * 10 calls. A call of the EMA model
    on that batch takes the median of three timed calls after a warm-up one (here 2.0 s, then 0.9, 0.6 and 0.5 s:
    neither the warm-up, the first or last timed call, the slowest nor the mean)."""
    from fastdiff.diffusion import rollout_model_calls
    from fastdiff.evaluate import final_sample_size

    cfg = _cfg(tmp_path, run__frames=20, run__final_clips=8, run__stream="balls-o", diffusion__sample_steps=20,
               diffusion__sample_frame_lag=0.5)
    trainer = OnlineTrainer(cfg, tmp_path / "run", log=lambda *_: None)
    shapes = []
    ema_forward = trainer.step.ema.forward
    trainer.step.ema.forward = lambda x, *a: shapes.append(tuple(x.shape)) or ema_forward(x, *a)
    assert final_sample_size(8) == (24, 5, 50) and rollout_model_calls(cfg.diffusion, 10, 5, 50) == 9 * (20 + 40)
    durations = [2.0, 0.9, 0.6, 0.5]
    reads = iter([t for i, d in enumerate(durations) for t in (10.0 * i, 10.0 * i + d)])  # start, end of each call
    with monkeypatch.context() as patch:
        patch.setattr("fastdiff.train.time.perf_counter", lambda: next(reads))
        seconds = trainer.estimate_final_sample_seconds()
    assert len(shapes) == 4 and all(shape[0] == 24 and shape[1] == 10 for shape in shapes)
    assert seconds == pytest.approx(540 * 0.6)


def test_cli_frames_by_name_are_trained_whatever_the_presets_time_limit(tmp_path):
    """`--frames N` turns the preset's run.minutes off (the frames asked for are trained); `--minutes` sets it."""
    settings = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    assert build_config("tiny", None, {}).run.minutes > 0
    for name, flags, minutes in (("by-frames", [], 0), ("limited", ["--minutes", "7"], 7)):
        assert main(["train", "--frames", "12", "--out", str(tmp_path), "--name", name, *flags, *settings]) == 0
        assert json.loads((tmp_path / name / "config.json").read_text())["run"]["minutes"] == minutes
        assert ("time_limit" in json.loads((tmp_path / name / "summary.json").read_text())) == (minutes > 0)


def test_the_cli_counts_the_time_limit_from_the_process_start():
    """run.minutes counts the whole job: the CLI's start time is this process's start (Linux's /proc), before
    the imports, not the moment the trainer is built; and it is never in the future."""
    import os
    import time

    from fastdiff.commands.train import process_started

    age = time.monotonic() - process_started()
    assert age >= 0
    if os.path.exists("/proc/self/stat"):  # this pytest process has run at least its imports, and not for a day
        assert 0.1 < age < 86_400
