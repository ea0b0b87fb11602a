"""Load a trained run (config, frozen autoencoder, EMA model) and generate videos from it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff import checkpoint as ckpt
from fastdiff import ops
from fastdiff.config import Config, DiffusionConfig
from fastdiff.diffusion import Schedule, ddim_sample, heun_sample
from fastdiff.fifo import FifoPlan, default_partitions, fifo_frames
from fastdiff.lora import FastLearner, remove_temporal_lora
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


MODES = ("autoregressive", "fifo")


def autoregressive_chunks(model, context: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig, window: int, *,
                          generator: torch.Generator | None = None, clip_x0: float | None = None
                          ) -> Iterator[torch.Tensor]:
    """The paper's sliding rollout, endless: observe the last K/2 frames, generate K/2, slide. Yields the
    new chunks (B, K - K/2, C, H, W); only the observed frames are kept, so memory is constant."""
    b = context.shape[0]
    n_obs = window // 2
    recent = context[:, -n_obs:]
    while True:
        n_ctx = recent.shape[1]
        clip = torch.zeros(b, window, *recent.shape[2:], device=recent.device)
        clip[:, :n_ctx] = recent
        observed = (torch.arange(window, device=recent.device) < n_ctx).expand(b, window)
        if cfg.sampler == "heun":
            out = heun_sample(model, clip, observed, schedule, steps=cfg.sample_steps, prediction=cfg.prediction,
                              generator=generator)
        else:
            out = ddim_sample(model, clip, observed, schedule, steps=cfg.sample_steps, eta=cfg.ddim_eta,
                              prediction=cfg.prediction, generator=generator, clip_x0=clip_x0)
        new = out[:, n_ctx:]
        yield new
        recent = torch.cat([recent, new], dim=1)[:, -n_obs:]


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
        if self.mode not in MODES:
            raise ValueError(f"sampling mode {self.mode!r} is not one of {', '.join(MODES)}")
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
    clip_x0 = 1.0 if run.cfg.autoencoder.latent == "none" else None
    chunk = max(1, run.window // 2)
    if learner is not None:
        learner.previous = context[:, -chunk:]
    if opts.mode == "autoregressive":
        for new in autoregressive_chunks(run.model, context, run.schedule, run.cfg.diffusion, run.window,
                                         generator=generator, clip_x0=clip_x0):
            if learner is not None:
                learner.observe(new)
            yield from new.unbind(1)
        return
    pending = []
    for frame in fifo_frames(run.model, context, run.schedule, run.cfg.diffusion, fifo_plan(run, opts),
                             generator=generator, clip_x0=clip_x0, warmup=opts.warmup):
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
    with torch.no_grad():
        latents = run.autoencoder.encode(torch.from_numpy(np.ascontiguousarray(context)).to(run.device))[None]
    gen = torch.Generator(device=run.device).manual_seed(opts.seed)
    learner = None
    if opts.fast_learning:
        learner = FastLearner(run.model, run.schedule, run.cfg.diffusion, window=run.window, rank=opts.lora_rank,
                              lr=opts.fast_lr, steps=opts.fast_steps, generator=gen)
    video = np.empty((frames, *context.shape[1:]), np.uint8)
    video[: len(context)] = context
    try:
        stream = generate_latents(run, latents, opts, learner, gen)
        for i in range(len(context), frames):
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


# --------------------------------------------------------------------------------------------------
# Measuring the modes: held-out loss under each mode's noise pattern, memory
# --------------------------------------------------------------------------------------------------


def heldout_clips(run: LoadedRun, count: int, start: int = 0) -> torch.Tensor:
    """`count` non-overlapping K-frame windows of the held-out stream as latents (count, K, C, h, w)."""
    frames = context_frames(run, count * run.window, start=start)
    with torch.no_grad():
        latents = run.autoencoder.encode(torch.from_numpy(np.ascontiguousarray(frames)).to(run.device))
    return latents.view(count, run.window, *latents.shape[1:])


def autoregressive_pattern(run: LoadedRun) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (t, observed, kept) of every model call the autoregressive DDIM rollout makes per chunk."""
    k, n_obs = run.window, run.window // 2
    levels = torch.linspace(run.schedule.timesteps - 1, 0, run.cfg.diffusion.sample_steps).round().long()
    observed = (torch.arange(k) < n_obs).expand(len(levels), k)
    t = levels[:, None].expand(-1, k).masked_fill(observed, 0)
    return t, observed, ~observed


@torch.no_grad()
def pattern_loss(model, clips: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig,
                 pattern: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seed: int = 0) -> float:
    """Unweighted held-out loss of `model` on real clips noised the way a sampling mode noises its model
    inputs: the mean over the mode's model calls of the loss on the frames each call writes back."""
    t_rows, obs_rows, kept_rows = (p.to(clips.device) for p in pattern)
    gen = torch.Generator(device=clips.device).manual_seed(seed)
    b = clips.shape[0]
    total = 0.0
    for t, observed, kept in zip(t_rows, obs_rows, kept_rows):
        t, observed, kept = (m.expand(b, -1).contiguous() for m in (t, observed, kept))
        x_t, target = ops.add_noise(clips, t, observed, schedule.alpha, schedule.sigma, generator=gen,
                                    prediction=cfg.prediction)
        pred = model(x_t, t.float(), observed).float()
        total += float(ops.frame_mse_loss(pred, target, None, ~kept | observed))
    return total / len(t_rows)


class TensorMemoryTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the block (any device, deterministic).

    Every op's outputs are recorded by storage; a storage counts until it is freed (a weak reference
    tells). Tensors that existed before the block (weights) are not counted. On CUDA prefer
    torch.cuda.max_memory_allocated; this works on CPU, where torch keeps no allocator statistics."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.total = 0
        self.peak = 0

    def _prune(self) -> None:
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.total -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out,) if isinstance(out, torch.Tensor) else torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
                known = self.live.get(ptr)
                if size == 0 or (known is not None and not known[0].expired()):
                    continue
                if known is not None:  # the address was freed and reused
                    self.total -= known[1]
                self.live[ptr] = (StorageWeakRef(storage), size)
                self.total += size
        if self.total > self.peak:  # only a possible new peak needs the exact (pruned) count
            self._prune()
            self.peak = max(self.peak, self.total)
        return out
