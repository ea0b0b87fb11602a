"""Kill test: SIGKILL `fastdiff train` 20 times at moments chosen by the run's own progress (while it sets up,
after a random number of newly logged frames, inside a checkpoint write), resuming after each kill. No checkpoint
is ever torn, no kill loses more than one checkpoint interval of steps, and the run killed 20 times ends
bit-identical to one that never was (CPU).

The guarantee, exactly: a checkpoint is written before the first step and then every `run.checkpoint_every`
frames, so a kill loses at most the steps since the newest checkpoint, at most `checkpoint_every` of them (the
frames read before the live window fills take no step). Every wait follows the run's progress (its metrics rows
and checkpoint files), never a fixed number of seconds, so a slow or busy machine only makes the test slower;
a run that makes no progress at all fails it, with the reason."""

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

FRAMES, EVERY, TRIALS = 200, 5, 20
PATIENCE = 600.0  # seconds without the awaited progress before the test gives up and fails (never passes)
SETTINGS = [
    "autoencoder.latent=ae", "model.patch=1", "model.width=64", "model.depth=2", "model.heads=2",
    "autoencoder.warmup_frames=32", "autoencoder.fit_steps=5",
    "autoencoder.fit_batch=8", "autoencoder.hidden=16", "replay.replayed=1", "replay.windows=8",
    f"run.checkpoint_every={EVERY}", "run.keep_checkpoints=3", "run.sample_every=0",
    "run.final_clips=0", "run.sample_frames=6",
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


def _last_logged_step(run_dir) -> int:
    """The newest step the run logged (metrics.jsonl), 0 before any."""
    path = run_dir / "metrics.jsonl"
    steps = [0]
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):  # a line cut by the kill
                steps.append(json.loads(line)["step"])
    return max(steps)


def _newest_checkpoint_steps(run_dir) -> int:
    kept = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not kept:
        return 0
    return torch.load(kept[-1], map_location="cpu", weights_only=False)["counters"]["steps"]


def _wait(proc, ready, what: str) -> None:
    """Poll until ready() or the run exits; fail if neither happens within PATIENCE seconds."""
    deadline = time.monotonic() + PATIENCE
    while not ready():
        assert proc.poll() is None, f"the run ended while waiting for {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no progress in {PATIENCE:.0f} s while waiting for {what}"
        time.sleep(0.01)


def _final_model(run_dir):
    state, path = ckpt.load_latest(run_dir / "checkpoints", log=lambda *_: None)
    assert state["counters"]["frames_seen"] == FRAMES, path
    return state["model"]


def test_twenty_kills_lose_nothing(tmp_path):
    rng = random.Random(1234)
    reference = subprocess.run(_command(tmp_path, "straight"), env=_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir, outcomes = tmp_path / "killed", []
    for trial in range(TRIALS):
        # 3 kills while the run sets up (stream, autoencoder fit), 5 inside a checkpoint write, 12 after 1-12 more
        # logged steps
        kind = "setup" if trial in (0, 7, 14) else "write" if trial % 4 == 3 else "steps"
        resume = (run_dir / "config.json").exists()
        proc = subprocess.Popen(_command(tmp_path, "killed", resume=resume), env=_env(1.0 if kind == "write" else 0),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = _last_logged_step(run_dir)
        if kind == "setup":
            _wait(proc, lambda: (run_dir / "config.json").exists(), "the run to start")
        elif kind == "write":
            _wait(proc, lambda: any((run_dir / "checkpoints").glob(".ckpt_*.tmp")), "a checkpoint write")
        else:
            target = before + rng.randint(1, 12)
            _wait(proc, lambda t=target: _last_logged_step(run_dir) >= t, f"step {target}")
        logged = _last_logged_step(run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in ckpt.list_checkpoints(run_dir / "checkpoints"):  # never a torn checkpoint
            torch.load(path, map_location="cpu", weights_only=False)
        kept = _newest_checkpoint_steps(run_dir)
        assert logged - kept <= EVERY, f"trial {trial} ({kind}): logged step {logged}, newest checkpoint at step {kept}"
        outcomes.append((trial, kind, logged, kept))
    assert sum(logged > 0 for _, _, logged, _ in outcomes) >= TRIALS // 2, outcomes  # the kills did land mid-run

    finish = subprocess.run(_command(tmp_path, "killed", resume=True), env=_env(), capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert not any((run_dir / "checkpoints").glob(".ckpt_*.tmp")), "a killed write's temp file was not cleared"
    straight, killed = _final_model(tmp_path / "straight"), _final_model(run_dir)
    for key in straight:
        assert torch.equal(straight[key], killed[key]), key
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    frames = [r["frame"] for r in rows]
    assert frames == sorted(set(frames)), "metrics.jsonl holds frames twice after the resumes"
    print("kill trials (trial, kind, last logged step, newest checkpoint's step):", outcomes)
