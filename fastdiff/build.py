"""Every component a run is made of, built once from its own config section, for training, sampling and
evaluation alike: the device, the frame autoencoder, the video DiT, the replay buffer and the offline bank.

The trainer (fastdiff/train.py) fits the autoencoder and feeds the stream; everything here only builds.
"""

from __future__ import annotations

import math
import os

import torch

from fastdiff import host
from fastdiff.config import AutoencoderConfig, Config, DiffusionConfig, ModelConfig, ReplayConfig, resolve_precision
from fastdiff.diffusion import Schedule
from fastdiff.models.autoencoder import FrameAutoencoder, PixelSpace
from fastdiff.models.dit import VideoDiT
from fastdiff.replay import ReplayBuffer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r}: no CUDA device is available on this machine")
    return device


def cpu_threads(requested: int) -> int | None:
    """Intra-op threads for this process: run.threads when set; else none chosen (None) when OMP_NUM_THREADS says
    already; else the cores this process may run on (its affinity: a container or taskset gives fewer than the
    machine has, and threads beyond them only spin-wait on each other)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = host.usable_cpus()
    return max(1, len(cpus)) if cpus is not None else (os.cpu_count() or 1)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """run.precision as the dtype autocast runs the model in (None: plain fp32)."""
    return torch.bfloat16 if resolve_precision(precision, device.type) == "bf16" else None


def storage_dtype(device: torch.device) -> torch.dtype:
    """Latents kept on the device (replay buffer, offline bank): bf16 on CUDA, fp32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --- the frame autoencoder --------------------------------------------------------------------------
def autoencoder(cfg: AutoencoderConfig, device) -> FrameAutoencoder | PixelSpace:
    """An unfitted frame autoencoder (fastdiff/train.py fits it on the stream's warm-up prefix), or the identity
    of pixel space (`autoencoder.latent=none`)."""
    if cfg.latent == "none":
        return PixelSpace()
    return FrameAutoencoder(cfg.channels, cfg.factor, cfg.hidden, pooled_colour=cfg.colour == "pooled",
                            colour_gain=cfg.colour_gain).to(device)


def load_autoencoder(cfg: AutoencoderConfig, path, device) -> FrameAutoencoder | PixelSpace:
    """The run's frozen autoencoder from `path` (nothing to load in pixel space)."""
    ae = autoencoder(cfg, device)
    if cfg.latent != "none":
        ae.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        ae.requires_grad_(False).eval()
    return ae


def latent_shape(cfg: AutoencoderConfig, frame_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(channels, height, width) of one frame's latent."""
    channels, factor = cfg.latent_channels_and_factor()
    return channels, frame_hw[0] // factor, frame_hw[1] // factor


# --- the video DiT -----------------------------------------------------------------------------------
def model(cfg: ModelConfig, latent: tuple[int, int, int], window: int, device,
          diffusion: DiffusionConfig | None = None) -> VideoDiT:
    """The video DiT; `diffusion` gives the noise schedule that model.low_noise_skip needs, and whether the model
    reads a self-conditioning estimate (diffusion.self_condition)."""
    schedule = None
    if cfg.low_noise_skip > 0:
        if diffusion is None:
            raise ValueError("model.low_noise_skip needs the diffusion config (its noise schedule)")
        table = Schedule.make(diffusion.schedule, diffusion.timesteps)
        schedule = (table.alpha, table.sigma)
    return VideoDiT(latent[0], latent[1], latent[2], window, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                    patch=cfg.patch, mlp_ratio=cfg.mlp_ratio, checkpoint_activations=cfg.checkpoint_activations,
                    pos_embed=cfg.pos_embed, context_skip=cfg.context_skip, overlap=cfg.overlap,
                    frame_pos=cfg.frame_pos, joint_attention=cfg.joint_attention,
                    local_mix=cfg.local_mix, local_mix_kernel=cfg.local_mix_kernel,
                    spatial_bias=cfg.spatial_bias, low_noise_skip=cfg.low_noise_skip,
                    pixel_head=cfg.pixel_head,
                    self_condition=diffusion is not None and diffusion.self_condition, schedule=schedule).to(device)


# --- replay buffer and offline bank ------------------------------------------------------------------
def buffer_plan(cfg: Config, window: int, frame_shape: tuple[int, int, int], stream_frames: int,
                device: torch.device) -> tuple[int, tuple, torch.dtype] | None:
    """(capacity in windows, window shape, dtype) of the replay buffer, from the config alone; None without one.

    The paper's buffer holds a share of the stream's *frames* (5%: 5,000 windows of 10 frames for 1M frames of
    balls, 2,500 of 20 for the maze), so capacity = fraction * frames / window; `full` keeps every window."""
    r = cfg.replay
    if r.strategy in ("none", "offline", "gen-distill"):
        return None
    if r.strategy == "full":
        capacity = max(stream_frames - window + 1, 1)
    else:
        capacity = r.windows or max(1, round(r.fraction * stream_frames / window))
    if r.storage == "pixel":
        return capacity, (window, *frame_shape), torch.uint8
    return capacity, (window, *latent_shape(cfg.autoencoder, frame_shape[:2])), storage_dtype(device)


def buffer_bytes(plan: tuple[int, tuple, torch.dtype]) -> int:
    capacity, shape, dtype = plan
    return (capacity + 1) * math.prod(shape) * torch.empty((), dtype=dtype).element_size()  # +1: scratch slot


def replay_buffer(cfg: ReplayConfig, plan: tuple[int, tuple, torch.dtype], device, *, shard: tuple[int, int] = (0, 1),
                  insert_seed: int | None = None) -> ReplayBuffer:
    """The reservoir (or `full` store); `shard=(rank, world)` keeps this rank's share of one global reservoir."""
    capacity, shape, dtype = plan
    mode = "full" if cfg.strategy == "full" else "reservoir"
    return ReplayBuffer(capacity, shape, dtype=dtype, device=device, mode=mode, shard=shard, insert_seed=insert_seed,
                        priority=cfg.priority)


def bank_bytes(cfg: Config, frames: int, frame_shape: tuple[int, int, int], device) -> int:
    pixels = cfg.replay.storage == "pixel"
    per_frame = math.prod(frame_shape if pixels else latent_shape(cfg.autoencoder, frame_shape[:2]))
    dtype = torch.uint8 if pixels else storage_dtype(device)
    return frames * per_frame * torch.empty((), dtype=dtype).element_size()


def check_memory(nbytes: int, what: str, device: torch.device) -> None:
    """Refuse, before any work, what cannot fit in the device's free memory (the message says what to lower)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if nbytes > free:
        raise MemoryError(
            f"{what} needs {nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on {device}; "
            "lower replay.fraction / replay.windows or use replay.storage=pixel"
        )
