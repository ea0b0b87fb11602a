"""Kill test: SIGKILL `fastdiff train` at random moments, 20 times, some of them inside checkpoint
writes, resuming after each kill. No checkpoint is ever corrupt, no more than one checkpoint interval
is lost, and the run that was killed 20 times ends bit-identical to one that never was (CPU)."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from fastdiff import checkpoint as ckpt

FRAMES, EVERY, TRIALS = 700, 5, 20  # 20 short lives (1-4 s each) reach ~250 frames: never the end
SETTINGS = [
    "model.width=64", "model.depth=2", "model.heads=2", "autoencoder.warmup_frames=32", "autoencoder.fit_steps=5",
    "autoencoder.fit_batch=8", "autoencoder.hidden=16", "replay.replayed=1", "replay.windows=8",
    f"run.checkpoint_every={EVERY}", "run.keep_checkpoints=3", "run.sample_every=0", "run.sample_frames=6",
    "run.log_every=1", "optim.name=adamw",
]


def _command(out, name, resume=False):
    cmd = [sys.executable, "-m", "fastdiff", "train", "--no-progress", "--frames", str(FRAMES)]
    if resume:
        return cmd + ["--resume", str(out / name)]
    cmd += ["--out", str(out), "--name", name]
    for item in SETTINGS:
        cmd += ["--set", item]
    return cmd


def _env(pause=0.0):
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTDIFF_TEST_CHECKPOINT_PAUSE=str(pause))
    env.pop("TRITON_INTERPRET", None)  # the trainer's CPU path uses the PyTorch references
    return env


def _last_logged_frame(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    frames = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line cut by the kill
            frames.append(json.loads(line)["frame"])
    return max(frames, default=0)


def _final_model(run_dir):
    state, path = ckpt.load_latest(run_dir / "checkpoints", log=lambda *_: None)
    assert state["counters"]["frames_seen"] == FRAMES, path
    return state["model"]


def test_twenty_kills_lose_nothing(tmp_path):
    rng = random.Random(1234)
    reference = subprocess.run(_command(tmp_path, "straight"), env=_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir, in_write, outcomes = tmp_path / "killed", 0, []
    for trial in range(TRIALS):
        during_write = trial % 4 == 3  # 5 of the 20 kills land inside a checkpoint write
        started = (run_dir / "config.json").exists()
        proc = subprocess.Popen(_command(tmp_path, "killed", resume=started), env=_env(1.0 if during_write else 0),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + (30 if during_write else rng.uniform(1.0, 4.0))
        hit_write = False
        while time.monotonic() < deadline and proc.poll() is None:
            if during_write and any((run_dir / "checkpoints").glob(".ckpt_*.tmp")):
                hit_write = True
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"trial {trial}: the run ended before the kill: {proc.stderr.read()[-2000:]}"
        logged = _last_logged_frame(run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        in_write += hit_write
        for path in ckpt.list_checkpoints(run_dir / "checkpoints"):  # never a torn checkpoint
            torch.load(path, map_location="cpu", weights_only=False)
        kept = ckpt.list_checkpoints(run_dir / "checkpoints")
        newest = int(ckpt.CKPT_PATTERN.match(kept[-1].name).group(1)) if kept else 0
        assert logged - newest <= EVERY, f"trial {trial}: trained to frame {logged}, newest checkpoint {newest}"
        outcomes.append((trial, logged, newest, hit_write))
    assert in_write == TRIALS // 4, outcomes

    finish = subprocess.run(_command(tmp_path, "killed", resume=True), env=_env(), capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    straight, killed = _final_model(tmp_path / "straight"), _final_model(run_dir)
    for key in straight:
        assert torch.equal(straight[key], killed[key]), key
    assert sum(logged > 0 for _, logged, _, _ in outcomes) >= TRIALS // 2, outcomes
    print("kill trials (trial, last logged frame, newest checkpoint, inside a write):", outcomes)
