"""Temporal LoRA and fast learning during generation (SlowFast-VGen's TEMP-LoRA, arXiv 2410.23277).

`add_temporal_lora` wraps the temporal-attention projections (qkv and proj of every block) of a
VideoDiT with low-rank adapters: y = W x + (alpha / r) B A x, with W frozen, A small random and B zero,
so a freshly adapted model computes exactly what the base model does. The paper does not say which
layers carry its LoRA; the temporal projections are where frames talk to each other, so that is
where episodic memory of the rollout can live.

`FastLearner` is the inference-time loop: after each generated chunk it takes `steps` Adam steps
(lr 1e-4 as in the paper) on [previous chunk, new chunk] with the whole clip noised (no observed
frames) and the standard eps/v loss, updating only the adapters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastdiff.config import DiffusionConfig
from fastdiff.diffusion import masked_diffusion_loss


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        weight = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear inits its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def reset(self) -> None:
        """Forget what was learned: the adapter goes back to a zero update."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.lora_b.zero_()


def add_temporal_lora(model: nn.Module, rank: int = 32, alpha: float | None = None) -> list[nn.Parameter]:
    """Freeze `model` and put adapters on every temporal attention's qkv and proj; returns the adapter
    parameters (the only ones that train)."""
    model.requires_grad_(False)
    wrapped = []
    for block in getattr(model, "blocks", []):
        temporal = block.temporal
        for name in ("qkv", "proj"):
            layer = getattr(temporal, name)
            if isinstance(layer, LoRALinear):
                raise ValueError("the model already carries temporal LoRA adapters")
            lora = LoRALinear(layer, rank, alpha)
            setattr(temporal, name, lora)
            wrapped.append(lora)
    if not wrapped:
        raise ValueError(f"{type(model).__name__} has no temporal attention blocks to adapt")
    return [p for lora in wrapped for p in (lora.lora_a, lora.lora_b)]


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


class FastLearner:
    """Adapts the temporal LoRA of `model` to the video it is generating, chunk by chunk.

    Call `observe(frames)` with every newly generated chunk of clean latents (B, n, C, H, W): once a
    previous chunk is known, it takes `steps` gradient steps on the concatenation (at most the model's
    window), then remembers the new chunk as the previous one."""

    def __init__(self, model: nn.Module, schedule, cfg: DiffusionConfig, *, window: int, rank: int = 32,
                 lr: float = 1e-4, steps: int = 1, generator: torch.Generator | None = None):
        if steps < 1:
            raise ValueError(f"fast-learning steps must be >= 1, got {steps}")
        self.model, self.schedule, self.cfg, self.window = model, schedule, cfg, window
        self.params = add_temporal_lora(model, rank)
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.steps = steps
        self.generator = generator
        self.previous: torch.Tensor | None = None
        self.updates = 0
        self.last_loss = float("nan")

    def observe(self, chunk: torch.Tensor) -> None:
        chunk = chunk.detach()
        if self.previous is not None:
            clip = torch.cat([self.previous, chunk], dim=1)[:, -self.window:]
            for _ in range(self.steps):
                self._step(clip)
        self.previous = chunk

    def _step(self, clip: torch.Tensor) -> None:
        b, k = clip.shape[:2]
        with torch.enable_grad():
            # One level for the whole clip, nothing observed: the standard loss on the generated pair.
            level = torch.randint(0, self.schedule.timesteps, (b, 1), generator=self.generator, device=clip.device)
            t = level.expand(b, k)
            observed = torch.zeros(b, k, dtype=torch.bool, device=clip.device)
            loss = masked_diffusion_loss(self.model, clip, t, observed, self.schedule, self.cfg.prediction,
                                         self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.updates += 1
        self.last_loss = float(loss.detach())


def remove_temporal_lora(model: nn.Module) -> None:
    """Put the base projections back (the adapters and what they learned are dropped)."""
    for block in getattr(model, "blocks", []):
        for name in ("qkv", "proj"):
            layer = getattr(block.temporal, name)
            if isinstance(layer, LoRALinear):
                setattr(block.temporal, name, layer.base)
