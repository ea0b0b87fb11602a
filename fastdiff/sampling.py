"""Load a trained run (config, frozen autoencoder, EMA model) and generate videos from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff import checkpoint as ckpt
from fastdiff import ops
from fastdiff.config import Config
from fastdiff.diffusion import Schedule, rollout
from fastdiff.models.autoencoder import FrameAutoencoder, PixelSpace
from fastdiff.models.dit import VideoDiT
from fastdiff.streams import make_stream
from fastdiff.train import pick_device


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


def build_models(cfg: Config, frame_hw: tuple[int, int], window: int, device) -> tuple[torch.nn.Module, VideoDiT]:
    ae_cfg = cfg.autoencoder
    ae = PixelSpace() if ae_cfg.latent == "none" else FrameAutoencoder(ae_cfg.channels, ae_cfg.factor, ae_cfg.hidden)
    h, w = frame_hw[0] // ae.factor, frame_hw[1] // ae.factor
    m = cfg.model
    model = VideoDiT(ae.channels, h, w, window, width=m.width, depth=m.depth, heads=m.heads, patch=m.patch,
                     mlp_ratio=m.mlp_ratio)
    return ae.to(device), model.to(device)


def load_run(run_dir: Path, device: str = "auto", checkpoint: Path | None = None) -> LoadedRun:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    dev = pick_device(device)
    ops.use_kernels(cfg.run.kernels)
    if checkpoint is None:
        state, _ = ckpt.load_latest(run_dir / "checkpoints", map_location=dev)
    else:
        state = torch.load(checkpoint, map_location=dev, weights_only=False)
    info = state["stream"]["info"]
    window = cfg.run.window or info["window"]
    ae, model = build_models(cfg, (info["height"], info["width"]), window, dev)
    if cfg.autoencoder.latent != "none":
        ae.load_state_dict(torch.load(run_dir / "autoencoder.pt", map_location=dev, weights_only=True))
    model.load_state_dict(state["ema"])
    model.eval().requires_grad_(False)
    ae.eval()
    schedule = Schedule.make(cfg.diffusion.schedule, cfg.diffusion.timesteps, dev)
    return LoadedRun(cfg, run_dir, dev, ae, model, schedule, window, (info["height"], info["width"], 3),
                     info.get("fps") or 10.0, state["counters"]["frames_seen"])


def context_frames(run: LoadedRun, count: int, start: int = 0, split: str = "test") -> np.ndarray:
    """`count` real frames to condition on: from the held-out test stream when the stream has one."""
    try:
        stream = make_stream(run.cfg.run.stream, split=split, seed=run.cfg.run.seed,
                             total_frames=run.cfg.run.stream_frames or run.cfg.run.frames)
    except Exception:
        stream = make_stream(run.cfg.run.stream, split="train", seed=run.cfg.run.seed)
    with stream:
        if start:
            stream.read(start)
        frames = stream.read(count)
    if len(frames) < count:
        raise ValueError(f"stream {run.cfg.run.stream} has fewer than {start + count} frames")
    return frames


@torch.no_grad()
def sample_video(run: LoadedRun, frames: int, *, mode: str = "autoregressive", seed: int = 0,
                 context: np.ndarray | None = None) -> np.ndarray:
    if mode != "autoregressive":
        raise ValueError(f"sampling mode {mode!r} is not available")
    n_obs = run.window // 2
    if context is None:
        context = context_frames(run, n_obs)
    latents = run.autoencoder.encode(torch.from_numpy(np.ascontiguousarray(context)).to(run.device))
    gen = torch.Generator(device=run.device).manual_seed(seed)
    clip_x0 = 1.0 if run.cfg.autoencoder.latent == "none" else None
    video = rollout(run.model, latents[None], frames, run.window, run.schedule, run.cfg.diffusion,
                    generator=gen, clip_x0=clip_x0)
    return run.autoencoder.decode(video[0]).cpu().numpy()


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
