"""Continuing a run the ways a user does: extending and shortening it, resizing its replay buffer, moving it
between a GPU and a CPU, stopping it with Ctrl-C, and the metrics a resumed run leaves behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import TINY, _cfg, _params

from fastdiff import checkpoint as ckpt
from fastdiff.cli import main
from fastdiff.replay import ReplayBuffer, resize_reservoir
from fastdiff.train import OnlineTrainer

QUIET = lambda *_, **__: None  # noqa: E731
SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


def _train(tmp_path, *args) -> int:
    return main(["train", "--out", str(tmp_path), "--name", "run", "--no-progress", *SETS, *args])


def test_a_run_can_be_extended_and_shortened(tmp_path, capsys):
    """The reported failure: 150 frames, then --resume --frames 200 refused the buffer (its capacity followed
    --frames). The capacity is the run's, fixed when it was created; extending and shortening keep it."""
    assert _train(tmp_path, "--frames", "30", "--set", "replay.windows=0", "--set", "replay.fraction=0.5") == 0
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["replay"]["windows"] == 2 and saved["run"]["stream_frames"] == 30  # resolved at creation
    assert main(["train", "--resume", str(run), "--frames", "40", "--no-progress"]) == 0
    state, _ = ckpt.load_latest(run / "checkpoints", log=QUIET)
    assert state["counters"]["frames_seen"] == 40 and state["buffer"]["capacity"] == 2
    assert json.loads((run / "config.json").read_text())["run"]["stream_frames"] == 30  # balls-c's drift: unchanged
    # shortening: asking for fewer frames than trained trains nothing more and loses nothing
    assert main(["train", "--resume", str(run), "--frames", "35", "--no-progress"]) == 0
    assert ckpt.load_latest(run / "checkpoints", log=QUIET)[0]["counters"]["frames_seen"] == 40
    samples = sorted(p.name for p in (run / "samples").glob("final-*.png"))
    assert samples == ["final-frame00000030.png", "final-frame00000040.png"]  # the extension kept the first
    capsys.readouterr()
    assert _train(tmp_path, "--name", "other", "--resize-buffer", "3") == 2
    assert "--resize-buffer: only with --resume" in capsys.readouterr().err


def test_an_explicit_resize_shrinks_uniformly_and_grows(tmp_path):
    assert _train(tmp_path, "--frames", "40") == 0  # replay.windows=8 (TINY)
    run = tmp_path / "run"
    before = ckpt.load_latest(run / "checkpoints", log=QUIET)[0]["buffer"]
    assert main(["train", "--resume", str(run), "--frames", "45", "--resize-buffer", "4", "--no-progress"]) == 0
    after = ckpt.load_latest(run / "checkpoints", log=QUIET)[0]["buffer"]
    assert after["capacity"] == 4 and after["windows"].shape[0] == 4
    assert json.loads((run / "config.json").read_text())["replay"]["windows"] == 4  # the new capacity is the run's
    assert int(after["seen"]) == int(before["seen"]) + 5  # algorithm R went on counting
    offered = {int(s) for s in before["starts"]} | set(range(31, 36))  # kept ones, and the 5 windows since
    assert {int(s) for s in after["starts"]} <= offered


def test_resizing_keeps_the_reservoir_uniform():
    """Shrinking draws a uniform subset: over many draws every stored window is kept equally often."""
    state = {"capacity": 10, "seen": torch.tensor(50), "windows": torch.arange(10.0)[:, None],
             "starts": torch.arange(10), "window_shape": (1,)}
    counts = torch.zeros(10)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[resize_reservoir(state, 4, g)["starts"]] += 1
    assert counts.min() > 0.85 * 800 and counts.max() < 1.15 * 800  # each kept 4/10 of the time
    grown = resize_reservoir(state, 16, g)
    assert grown["capacity"] == 16 and torch.equal(grown["windows"], state["windows"]) and int(grown["seen"]) == 10
    buffer = ReplayBuffer(16, (1,), dtype=torch.float32, device="cpu")
    buffer.load_state_dict(grown)
    for i in range(6):  # the new slots fill with the next windows
        buffer.insert(torch.tensor([100.0 + i]), 100 + i, g)
    assert torch.equal(buffer.windows[10:16, 0], 100.0 + torch.arange(6.0))
    partial = {**state, "seen": torch.tensor(10)}  # never filled: it held every window, so growing is exact
    assert int(resize_reservoir(partial, 16, g)["seen"]) == 10


def _as_if_saved_on_cuda(path):
    """A CPU checkpoint rewritten the way a GPU run writes it: the device recorded, the training generator's state
    in the CUDA layout (a 16-byte seed and offset), latents in the buffer as bf16."""
    state = torch.load(path, weights_only=False)
    state["device"] = "cuda"
    state["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    state["buffer"]["windows"] = state["buffer"]["windows"].to(torch.bfloat16)
    ckpt.atomic_torch_save(state, path)


def test_a_gpu_run_resumes_on_a_cpu(tmp_path):
    OnlineTrainer(_cfg(tmp_path, run__frames=20), tmp_path / "gpu", log=QUIET).train()
    newest = ckpt.list_checkpoints(tmp_path / "gpu" / "checkpoints")[-1]
    _as_if_saved_on_cuda(newest)
    messages = []
    resumed = OnlineTrainer(_cfg(tmp_path, run__frames=30), tmp_path / "gpu", resume=True, log=messages.append)
    assert resumed.frames_seen == 20
    assert any("written on cuda, resumed on cpu" in m for m in messages), messages
    assert resumed.step.buffer.windows.dtype == torch.float32
    again = OnlineTrainer(_cfg(tmp_path, run__frames=30), tmp_path / "gpu", resume=True, log=QUIET)
    assert torch.equal(resumed.step.generator.get_state(), again.step.generator.get_state())  # deterministic
    assert resumed.train()["frames"] == 30


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    cmd = [sys.executable, "-m", "fastdiff", "train", "--out", str(tmp_path), "--name", "run", "--no-progress",
           "--frames", "100000", *SETS, "--set", "run.checkpoint_every=1000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # a few steps in: progress, not time
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 130, out[-2000:]
    assert "fastdiff train --resume" in out and str(tmp_path / "run") in out
    state, _ = ckpt.load_latest(tmp_path / "run" / "checkpoints", log=QUIET)
    frames = [json.loads(line)["frame"] for line in metrics.read_text().splitlines()]
    assert state["counters"]["frames_seen"] >= frames[-1] > 10  # nothing trained was lost


def test_a_resumed_run_drops_the_metrics_rows_it_trains_again(tmp_path):
    OnlineTrainer(_cfg(tmp_path, run__frames=30, run__log_every=1), tmp_path / "run", log=QUIET).train()
    checkpoints = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    checkpoints[-1].unlink()  # as if killed after frame 30 was logged, before its checkpoint
    messages = []
    resumed = OnlineTrainer(_cfg(tmp_path, run__frames=30, run__log_every=1), tmp_path / "run", resume=True,
                            log=messages.append)
    assert resumed.frames_seen == 20 and any("row(s) past frame 20 dropped" in m for m in messages)
    resumed.train()
    frames = [json.loads(line)["frame"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert frames == list(range(10, 31))
    a = _params(resumed)
    assert all(torch.isfinite(v).all() for v in a.values())


def test_a_stream_that_fails_to_open_leaves_no_run_directory(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--name", "bad", "--stream", "video:/nowhere.mp4",
                 "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(["train", "--out", str(tmp_path), "--name", "opt", "--stream-option", "size=16x16",
                 "--no-progress"]) == 2
    assert "option 'size' not supported" in capsys.readouterr().err and not (tmp_path / "opt").exists()


@pytest.mark.parametrize("option, expected", [("on_error=skip", {"on_error": "skip"}),
                                              ("size=64x48;fps=10", {"size": (64, 48), "fps": 10}),
                                              ("crop=0,0,320,240", {"crop": (0, 0, 320, 240)})])
def test_stream_options_reach_the_stream(tmp_path, monkeypatch, option, expected):
    import fastdiff.train as train_module

    seen = {}
    real = train_module.make_stream

    def recording(spec, **kwargs):
        seen.update(kwargs)
        return real(spec, **{k: v for k, v in kwargs.items() if k in ("split", "seed", "total_frames")})

    monkeypatch.setattr(train_module, "make_stream", recording)
    cfg = _cfg(tmp_path, run__frames=12, run__stream_options=option)
    OnlineTrainer(cfg, tmp_path / "run", log=QUIET)
    assert {k: seen[k] for k in expected} == expected
