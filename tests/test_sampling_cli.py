"""`fastdiff sample` on a tiny trained run: FIFO and autoregressive videos, fast learning, bad input,
and the measuring helpers (balls metric, held-out loss under a mode's noise pattern)."""

import re

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from fastdiff.cli import main
from fastdiff.config import build_config
from fastdiff.evaluate import autoregressive_pattern, heldout_windows, pattern_loss
from fastdiff.fifo import FifoPlan
from fastdiff.lora import lora_layers
from fastdiff.metrics import balls_metrics
from fastdiff.sampling import SampleOptions, load_run, sample_video
from fastdiff.streams import make_stream
from fastdiff.train import OnlineTrainer, write_config

# A run small enough to train in seconds on 2 cores; sampling uses 8 DDIM steps.
TINY = {
    "model.width": "32", "model.depth": "1", "model.heads": "1",
    "autoencoder.latent": "ae", "model.patch": "1",
    "autoencoder.warmup_frames": "32", "autoencoder.fit_steps": "10", "autoencoder.fit_batch": "8",
    "autoencoder.hidden": "8", "replay.replayed": "1", "replay.windows": "8",
    "run.checkpoint_every": "1000", "run.sample_every": "0", "run.final_clips": "0", "run.sample_frames": "12",
    "run.log_every": "50", "run.progress": "false", "optim.name": "adamw", "optim.lr": "1e-3",
    "run.frames": "200", "diffusion.sample_steps": "8",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = build_config("tiny", None, {**TINY, "run.out": str(out)})
    path = out / "tiny"
    path.mkdir()
    write_config(cfg, path)
    OnlineTrainer(cfg, path, log=lambda *_: None).train()
    return path


def _frames_in(path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


@pytest.mark.parametrize("extra", [["--mode", "fifo", "--partitions", "2"],
                                   ["--mode", "fifo", "--no-lookahead", "--warmup", "0"],
                                   ["--mode", "autoregressive", "--fast-learning", "--lora-rank", "4"]])
def test_cli_writes_an_mp4_of_the_requested_length(run_dir, tmp_path, capsys, extra):
    out = tmp_path / "video.mp4"
    assert main(["sample", str(run_dir), "--frames", "24", "--out", str(out), "--device", "cpu", *extra]) == 0
    assert "24 frames" in capsys.readouterr().out
    assert _frames_in(out) == 24


def test_video_starts_with_the_context_and_fast_learning_leaves_no_adapter(run_dir):
    run = load_run(run_dir, device="cpu")
    context = make_stream("balls-o", split="test").read(5)
    x, t, obs = torch.randn(1, 10, 4, 8, 8), torch.full((1, 10), 500.0), torch.zeros(1, 10, dtype=torch.bool)
    before = run.model(x, t, obs)
    for opts in (SampleOptions(mode="fifo", partitions=1, warmup=2, fast_learning=True, lora_rank=4),
                 SampleOptions(mode="autoregressive", seed=3)):
        video = sample_video(run, 17, context=context, options=opts)
        assert video.shape == (17, 32, 32, 3) and video.dtype == np.uint8
        assert np.array_equal(video[:5], context)
        assert video[5:].std() > 0  # something was generated
    assert not lora_layers(run.model)
    torch.testing.assert_close(run.model(x, t, obs), before, atol=0, rtol=0)


@pytest.mark.parametrize("args, message", [
    (["--frames", "3"], "must exceed the 5 context frames"),
    (["--mode", "fifo", "--partitions", "-1"], "--partitions"),
    (["--mode", "fifo", "--partitions", "200"], "distinct noise levels"),
    (["--mode", "fifo", "--warmup", "-2"], "--warmup"),
    (["--fast-learning", "--lora-rank", "0"], "--lora-rank"),
    (["--steps", "0"], "--steps"),
    (["--out", "x.avi"], "use .mp4"),
])
def test_cli_refuses_bad_input(run_dir, tmp_path, capsys, args, message):
    argv = ["sample", str(run_dir), "--device", "cpu", *args]
    if "--out" not in args:
        argv += ["--out", str(tmp_path / "v.mp4")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_cli_refuses_a_missing_run(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope"), "--out", str(tmp_path / "v.mp4")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_balls_metric_on_real_and_broken_videos():
    frames = make_stream("balls-o", split="test").read(300)
    real = balls_metrics(frames, window=10)
    assert real["balls"] == 2 and real["count_ok"] > 0.95
    assert real["colour_changes"] > 20 and real["first_order_acc"] > 0.9 and real["second_order_acc"] > 0.85
    # a ball that vanishes every other frame: the count is unstable
    flicker = frames.copy()
    flicker[::2] = 0
    assert balls_metrics(flicker, window=10, balls=2)["count_ok"] < 0.6
    # yellow painted green: red is always followed by green, so half of the second-order checks fail
    green = frames.copy()
    yellow = (green[..., 0] > 128) & (green[..., 1] > 128)
    green[..., 0][yellow] = 0
    broken = balls_metrics(green, window=10)
    assert broken["second_order_acc"] < 0.7 and broken["first_order_acc"] > 0.9


def test_pattern_loss_of_each_mode(run_dir):
    run = load_run(run_dir, device="cpu")
    clips = heldout_windows(run, 4)
    assert clips.shape == (4, 10, 4, 8, 8)
    cfg = run.cfg.diffusion
    losses = {
        "autoregressive": pattern_loss(run.model, clips, run.schedule, cfg, autoregressive_pattern(run)),
        "fifo": pattern_loss(run.model, clips, run.schedule, cfg, FifoPlan(10, 2, False).call_pattern()),
        "fifo+lookahead": pattern_loss(run.model, clips, run.schedule, cfg, FifoPlan(10, 2, True).call_pattern()),
    }
    assert all(np.isfinite(v) and v > 0 for v in losses.values()), losses
    # a model that predicts zero noise scores exactly 1 (eps targets have unit variance): ours learned something
    zero = lambda x, t, observed: torch.zeros_like(x)
    assert pattern_loss(zero, clips, run.schedule, cfg, autoregressive_pattern(run)) == pytest.approx(1.0, abs=0.1)
    assert losses["autoregressive"] < 0.9


class _Terminal:
    """A stderr that says it is a terminal: progress bars draw only on one (a log file gets none)."""

    def __init__(self):
        self.text = []

    def isatty(self):
        return True

    def write(self, s):
        self.text.append(s)

    def flush(self):
        pass


@pytest.mark.parametrize("mode, desc", [("autoregressive", "sample (autoregressive)"), ("fifo", "sample (fifo)")])
def test_sampling_shows_a_progress_bar_with_an_eta(run_dir, tmp_path, monkeypatch, mode, desc):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    out = tmp_path / "video.mp4"
    assert main(["sample", str(run_dir), "--frames", "16", "--out", str(out), "--device", "cpu", "--mode", mode]) == 0
    drawn = "".join(terminal.text)
    assert desc in drawn and "frame" in drawn
    assert re.search(r"\d\d:\d\d<(\d\d:\d\d|\?)", drawn), drawn[-300:]  # elapsed<remaining: the ETA field


def test_the_autoencoder_fit_shows_a_progress_bar(tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    cfg = build_config("tiny", None, {**TINY, "run.out": str(tmp_path), "run.frames": "40", "run.progress": "true"})
    (tmp_path / "r").mkdir()
    OnlineTrainer(cfg, tmp_path / "r", log=lambda *_: None).train()
    drawn = "".join(terminal.text)
    assert "autoencoder fit" in drawn and re.search(r"\d\d:\d\d<(\d\d:\d\d|\?)", drawn)


def test_sample_reencode_changes_what_later_windows_observe_not_the_first_window(run_dir):
    """diffusion.sample_reencode, in `fastdiff sample`'s rollout and in the evaluation's continuations: the first
    window (real context only) is the same video with and without it, later windows differ, as they observe the
    autoencoder's round trip of the frames drawn instead of the sampled latents."""
    from fastdiff.evaluate import EvalOptions, continuations, evaluation_clips

    run = load_run(run_dir, device="cpu")
    context = make_stream("balls-o", split="test").read(5)
    opts = EvalOptions(clips=2, samples=1, length=16, sample_steps=4)
    clips = evaluation_clips(run, opts.clips, opts.length)
    videos = {}
    for reencode in (False, True):
        run.cfg.diffusion.sample_reencode = reencode
        videos[reencode] = (sample_video(run, 16, context=context, options=SampleOptions(seed=1)).astype(int),
                            continuations(run, clips, opts).astype(int))
    for plain, reencoded in zip(videos[False], videos[True], strict=True):
        assert np.array_equal(plain[..., :10, :, :, :], reencoded[..., :10, :, :, :])
        assert not np.array_equal(plain[..., 10:, :, :, :], reencoded[..., 10:, :, :, :])
