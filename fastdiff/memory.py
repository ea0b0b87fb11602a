"""Training memory, estimated from the config before anything is allocated (printed at start-up).

    weights + EMA + grads        12 B / parameter (fp32 each)
    autocast copies               2 B / parameter under bf16 (the bf16 weights the matmuls read)
    optimizer state               8 B / parameter (AdamW), ~2.03 B (8-bit AdamW: two uint8 moments + absmax)
    activations                   A B per (token x width x block), tokens = batch x K x patches per frame:
                                  A = 124 in fp32 (31 saved values of 4 B, measured on this DiT with
                                  TensorMemoryTracker), 87 under bf16 autocast (linear outputs in bf16, the
                                  residual stream and norms in fp32), 4 more with model.local_mix; plus,
                                  where attention has no fused
                                  kernel (CPU), the S x S probabilities of spatial attention
                                  ((K S) x (K S) with model.joint_attention).
                                  With activation checkpointing: each block's input (4 B per value) plus one
                                  block's activations, recomputed in backward.
    backward workspace            one more block's activations: a margin for the gradients flowing through
                                  (the measured peak of a step is within 5% of the activations alone)
    replay buffer, live ring, offline bank: their exact sizes.

tests/test_memory.py checks the activation term against a measured step, and that every GPU preset's
estimate fits its budget on the largest stream (the 64x64 maze, K = 20); on a GPU a test enforces the
budget with torch.cuda.set_per_process_memory_fraction.
"""

from __future__ import annotations

import math

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff.config import Config, live_ring_frames, optimizer_name, resolve_precision
from fastdiff.models.dit import overlap_margin

ACTIVATION_BYTES = {"fp32": 124.0, "bf16": 87.0}
# model.local_mix: one more saved value per token and width (measured in fp32: the MLP's summed input); under bf16,
# the bf16 copies of the conv's input and of that sum
LOCAL_MIX_BYTES = {"fp32": 4.0, "bf16": 4.0}
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit-bnb": 2.03, "adamw8bit-fused": 2.03}
MiB = 2**20


def dit_parameters(cfg: Config, channels: int, patches: int, window: int) -> int:
    """Parameters of fastdiff.models.dit.VideoDiT for this config (without building it)."""
    m = cfg.model
    d, hidden = m.width, int(m.width * m.mlp_ratio)
    side = m.patch + 2 * overlap_margin(m.patch) if m.overlap else m.patch  # pixels each token reads and draws across
    patch_dim = (channels + 1) * side * side
    block = (2 * (3 * d * d + 3 * d + d * d + d)  # spatial and temporal qkv + proj
             + m.heads * (2 * window - 1)  # relative-position bias
             + d * hidden + hidden + hidden * d + d  # MLP
             + d * 9 * d + 9 * d  # adaLN
             + (3 * m.local_mix_kernel**2 * d + d if m.local_mix else 0))  # the local mix: a depthwise 3xkxk conv
    pos = patches * d if m.pos_embed == "learned" else 0  # a sincos table is a buffer, not a parameter
    stem = patch_dim * d + d + pos + 256 * d + d + d * d + d + 2 * d
    out_bias = channels if m.overlap else channels * m.patch**2  # a transposed conv has one bias per channel
    head = d * 2 * d + 2 * d + d * channels * side**2 + out_bias
    return m.depth * block + stem + head


def estimate(cfg: Config, frame_hw: tuple[int, int], window: int, device_type: str,
             buffer_bytes: int | None = None, bank_bytes: int = 0) -> dict[str, float]:
    """Memory of one training step's steady state, in MiB per component and in total."""
    ae = cfg.autoencoder
    channels, factor = ae.latent_channels_and_factor()
    h, w = frame_hw[0] // factor, frame_hw[1] // factor
    patches = (h // cfg.model.patch) * (w // cfg.model.patch)
    params = dit_parameters(cfg, channels, patches, window)
    precision = resolve_precision(cfg.run.precision, device_type)
    optimizer = optimizer_name(cfg, device_type)
    batch = cfg.replay.live + cfg.replay.replayed
    tokens = batch * window * patches
    width, depth, heads = cfg.model.width, cfg.model.depth, cfg.model.heads
    per_block = tokens * width * (ACTIVATION_BYTES[precision] + (LOCAL_MIX_BYTES[precision] if cfg.model.local_mix
                                                                 else 0.0))
    if device_type != "cuda":  # math attention keeps the softmax probabilities: per frame, or over the whole clip
        sequences, length = (batch, window * patches) if cfg.model.joint_attention else (batch * window, patches)
        per_block += sequences * heads * length**2 * 4
    if cfg.model.checkpoint_activations:
        activations = tokens * width * 4 * depth + per_block
    else:
        activations = per_block * depth
    if buffer_bytes is None:
        stream_frames = cfg.run.stream_frames or cfg.run.frames
        latent = channels * h * w * (2 if device_type == "cuda" else 4)
        capacity = cfg.replay.windows or max(1, round(cfg.replay.fraction * stream_frames / window))
        buffer_bytes = 0 if cfg.replay.strategy in ("none", "offline", "gen-distill") else (
            (capacity + 1) * window * (frame_hw[0] * frame_hw[1] * 3 if cfg.replay.storage == "pixel" else latent))
    ring = live_ring_frames(cfg.replay, window) * (channels * h * w * 4 + frame_hw[0] * frame_hw[1] * 3)
    out = {
        "parameters_M": params / 1e6,
        "weights_ema_grads": params * 12 / MiB,
        "autocast_copies": params * 2 / MiB if precision == "bf16" else 0.0,
        "optimizer_state": params * OPTIMIZER_BYTES.get(optimizer, 8.0) / MiB,
        "activations": activations / MiB,
        "backward_workspace": per_block / MiB,
        "replay_buffer": buffer_bytes / MiB,
        "offline_bank": bank_bytes / MiB,
        "live_ring": ring / MiB,
    }
    out["total"] = sum(v for k, v in out.items() if k != "parameters_M")
    return out


def describe(est: dict[str, float]) -> str:
    parts = [f"{k.replace('_', ' ')} {v:,.0f}" for k, v in est.items() if k not in ("total", "parameters_M") and v >= 1]
    return (f"memory estimate: {est['total']:,.0f} MiB ({est['parameters_M']:.1f}M parameters; "
            + ", ".join(parts) + " MiB)")


def fits(est: dict[str, float], budget_gib: float, headroom: float = 0.85) -> bool:
    """Whether the estimate leaves `1 - headroom` of the budget for the allocator's fragmentation and cuDNN."""
    return est["total"] <= headroom * budget_gib * 1024 and math.isfinite(est["total"])


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
