"""Load a trained run (config, frozen autoencoder, EMA model) and generate videos from it: the paper's
autoregressive rollout or FIFO diagonal denoising, optionally adapting a temporal LoRA as it goes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff import build, ops
from fastdiff import checkpoint as ckpt
from fastdiff.config import SAMPLE_MODES, Config
from fastdiff.diffusion import Schedule, rollout_chunks
from fastdiff.fifo import FifoPlan, default_partitions, fifo_frames
from fastdiff.lora import FastLearner, remove_temporal_lora
from fastdiff.models.autoencoder import encode_frames, rollout_space
from fastdiff.models.dit import VideoDiT
from fastdiff.streams import make_stream, parse_stream_options


@dataclass
class LoadedRun:
    cfg: Config
    run_dir: Path
    device: torch.device
    autoencoder: torch.nn.Module
    model: VideoDiT  # the EMA weights
    schedule: Schedule
    window: int
    frame_shape: tuple[int, int, int]
    fps: float
    frame: int  # stream frame the checkpoint was taken at


def load_run(run_dir: Path, device: str = "auto", checkpoint: Path | None = None) -> LoadedRun:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    dev = build.pick_device(device)
    ops.use_kernels(cfg.run.kernels)
    if checkpoint is None:
        state, _ = ckpt.load_latest(run_dir / "checkpoints", map_location=dev)
    else:
        state = torch.load(checkpoint, map_location=dev, weights_only=False)
    info = state["stream"]["info"]
    window = cfg.run.window or info["window"]
    ae = build.load_autoencoder(cfg.autoencoder, run_dir / "autoencoder.pt", dev)
    model = build.model(cfg.model, build.latent_shape(cfg.autoencoder, (info["height"], info["width"])), window, dev,
                        cfg.diffusion)
    model.load_state_dict(state["ema"])
    model.eval().requires_grad_(False)
    schedule = Schedule.make(cfg.diffusion.schedule, cfg.diffusion.timesteps, dev)
    return LoadedRun(cfg, run_dir, dev, ae, model, schedule, window, (info["height"], info["width"], 3),
                     info.get("fps") or 10.0, state["counters"]["frames_seen"])


def heldout_stream(run: LoadedRun):
    """The run's held-out stream: the test simulation of a synthetic stream (same seed, independent), or the stream
    itself where it has no other split (a video), with the run's stream options and nominal length."""
    options = parse_stream_options(run.cfg.run.stream_options)
    horizon = run.cfg.run.stream_frames or run.cfg.run.frames
    return make_stream(run.cfg.run.stream, split="test", seed=run.cfg.run.seed, total_frames=horizon, **options)


def context_frames(run: LoadedRun, count: int, start: int = 0) -> np.ndarray:
    """`count` real frames of the held-out stream to condition on."""
    with heldout_stream(run) as stream:
        if start:
            stream.read(start)
        frames = stream.read(count)
    if len(frames) < count:
        raise ValueError(f"stream {run.cfg.run.stream} has fewer than {start + count} frames")
    return frames




@dataclass
class SampleOptions:
    mode: str = "autoregressive"
    seed: int = 0
    partitions: int = 0  # FIFO n; 0: about diffusion.sample_steps rungs in the queue
    lookahead: bool = True
    warmup: int | None = None  # FIFO outputs dropped at the start; None: the paper's L - f
    fast_learning: bool = False
    lora_rank: int = 32
    fast_steps: int = 1
    fast_lr: float = 1e-4

    def check(self) -> None:
        if self.mode not in SAMPLE_MODES:
            raise ValueError(f"sampling mode {self.mode!r} is not one of {', '.join(SAMPLE_MODES)}")
        if self.partitions < 0:
            raise ValueError(f"--partitions must be >= 0 (0 = automatic), got {self.partitions}")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.lora_rank < 1 or self.fast_steps < 1 or not 0 < self.fast_lr < 1:
            raise ValueError("--lora-rank and --fast-steps must be >= 1 and --fast-lr in (0, 1)")


def fifo_plan(run: LoadedRun, opts: SampleOptions) -> FifoPlan:
    n = opts.partitions or default_partitions(run.cfg.diffusion.sample_steps, run.window)
    return FifoPlan(run.window, n, opts.lookahead, run.schedule.timesteps)


def generate_latents(run: LoadedRun, context: torch.Tensor, opts: SampleOptions, learner: FastLearner | None = None,
                     generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Endless clean latent frames (B, C, H, W) continuing `context` (B, n, C, H, W). With a learner, every
    K/2 new frames are handed to it as a chunk (it adapts the temporal LoRA on previous + new chunk)."""
    space = rollout_space(run.autoencoder, run.cfg.diffusion.sample_reencode)
    chunk = max(1, run.window // 2)
    if learner is not None:
        learner.previous = context[:, -chunk:]
    if opts.mode == "autoregressive":
        for new in rollout_chunks(run.model, context, run.window, run.schedule, run.cfg.diffusion,
                                  generator=generator, **space):
            if learner is not None:
                learner.observe(new)
            yield from new.unbind(1)
        return
    pending = []
    for frame in fifo_frames(run.model, context, run.schedule, run.cfg.diffusion, fifo_plan(run, opts),
                             generator=generator, clip_x0=space["clip_x0"], warmup=opts.warmup):
        yield frame
        if learner is not None:
            pending.append(frame)
            if len(pending) == chunk:
                learner.observe(torch.stack(pending, dim=1))
                pending = []


def sample_video(run: LoadedRun, frames: int, *, mode: str = "autoregressive", seed: int = 0,
                 context: np.ndarray | None = None, options: SampleOptions | None = None) -> np.ndarray:
    """uint8 (frames, H, W, 3): the observed context frames, then generated ones. Frames are decoded and
    moved to the host as they come, so device memory does not grow with `frames`."""
    opts = options or SampleOptions(mode=mode, seed=seed)
    opts.check()
    n_obs = run.window // 2
    if context is None:
        context = context_frames(run, n_obs)
    if frames <= len(context):
        raise ValueError(f"--frames {frames} must exceed the {len(context)} context frames")
    latents = encode_frames(run.autoencoder, context, run.device)[None]
    gen = torch.Generator(device=run.device).manual_seed(opts.seed)
    learner = None
    if opts.fast_learning:
        learner = FastLearner(run.model, run.schedule, run.cfg.diffusion, window=run.window, rank=opts.lora_rank,
                              lr=opts.fast_lr, steps=opts.fast_steps, generator=gen)
    video = np.empty((frames, *context.shape[1:]), np.uint8)
    video[: len(context)] = context
    try:
        from tqdm import tqdm

        stream = generate_latents(run, latents, opts, learner, gen)
        for i in tqdm(range(len(context), frames), unit="frame", desc=f"sample ({opts.mode})", disable=None,
                      leave=False):
            latent = next(stream)
            with torch.no_grad():
                video[i] = run.autoencoder.decode(latent)[0].cpu().numpy()
    finally:
        if learner is not None:
            remove_temporal_lora(run.model)
    return video


def save_video(frames: np.ndarray, out: Path, fps: float) -> None:
    from fastdiff import media

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 128 // frames.shape[1])
    suffix = out.suffix.lower()
    if suffix == ".gif":
        media.save_gif(frames, out, fps=fps, scale=scale)
    elif suffix == ".png":
        media.save_png_strip(frames, out, scale=scale)
    elif suffix == ".mp4":
        media.save_mp4(frames, out, fps=fps, scale=scale)
    else:
        raise ValueError(f"--out {out}: use .mp4, .gif or .png")
