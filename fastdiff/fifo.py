"""FIFO-Diffusion (Kim et al. 2024, arXiv 2405.11473): endless videos by diagonal denoising, constant memory.

A queue holds L = n * f frame latents whose noise levels rise from head (slot 0, nearly clean) to tail
(slot L-1, nearly pure noise): slot i sits at `levels[i]`, an evenly spaced ladder over [0, T). One
queue step denoises every frame by one rung (slot i: levels[i] -> levels[i-1], the head to clean) in
a single fused per-frame DDIM launch (ops.ddim_step), emits the clean head, and enqueues fresh noise at
the tail. Memory is the queue plus one step's activations: constant in the length of the video.

* Latent partitioning: the queue is cut into n blocks of f frames (f = the model's window), one model
  call each, so a call spans only f rungs of the ladder instead of all of them.
* Lookahead denoising: windows of f frames at stride f/2; only the last f/2 outputs of each window are
  kept, so every frame is denoised with f/2 cleaner frames in front of it (2n calls per step). In front
  of the head sit the last f/2 emitted frames, given to the model as observed (clean) frames: our model
  is trained with a clean prefix of 0..K/2 frames and independent per-frame levels
  (diffusion.sample_training_levels), so these windows are in its training distribution.
* Warm-up from observed frames (the paper's initialisation with the frames we have): slot i starts as
  the last observed frame noised to levels[i]; the emitted history starts as the observed frames; the
  first `warmup` outputs (default L - f, as the paper) still carry the frozen start and are dropped.

All windows of one step go to the model as one batch (chunked by `max_batch`), read from the pre-step
queue, so the update is the same whatever order the paper's loop would visit them in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastdiff import ops
from fastdiff.config import DiffusionConfig


@dataclass(frozen=True)
class FifoPlan:
    """The shape of the queue and of the model calls of one step."""

    window: int  # f: frames per model call (at most the model's window)
    partitions: int = 1  # n: blocks of f frames in the queue
    lookahead: bool = True
    timesteps: int = 1000  # T of the schedule

    def __post_init__(self):
        if self.window < 2:
            raise ValueError(f"FIFO window must be at least 2 frames, got {self.window}")
        if self.partitions < 1:
            raise ValueError(f"FIFO partitions must be >= 1, got {self.partitions}")
        if self.lookahead and self.window % 2:
            raise ValueError(f"lookahead denoising needs an even window (f/2 in front), got f={self.window}")
        if self.length > self.timesteps:
            raise ValueError(f"queue of {self.length} frames needs {self.length} distinct noise levels but the "
                             f"schedule has {self.timesteps}; lower --partitions")

    @property
    def length(self) -> int:
        return self.window * self.partitions

    @property
    def front(self) -> int:
        """Clean emitted frames kept in front of the head (the head window's lookahead)."""
        return self.window // 2 if self.lookahead else 0

    def levels(self, device=None) -> torch.Tensor:
        """(L,) integer timesteps, increasing from head to tail; the tail is T - 1."""
        i = torch.arange(1, self.length + 1, dtype=torch.float64)
        return (i * self.timesteps / self.length).round().long().sub(1).to(device)

    def windows(self) -> tuple[torch.Tensor, int]:
        """Indices (calls, f) into [front history ; queue] for every model call of a step, and how many
        trailing frames of each window are written back."""
        f, front = self.window, self.front
        if not self.lookahead:
            starts = torch.arange(self.partitions) * f
            return starts[:, None] + torch.arange(f), f
        half = f // 2
        # window j covers queue slots [(j-1) f/2, (j+1) f/2): f/2 cleaner frames, then the block it updates
        starts = torch.arange(2 * self.partitions) * half - half + front
        return starts[:, None] + torch.arange(f), half

    def call_pattern(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per model call of a steady-state step: timesteps (calls, f), observed mask and written mask."""
        idx, written = self.windows()
        t_ext = torch.cat([torch.zeros(self.front, dtype=torch.long), self.levels()])
        obs_ext = torch.arange(self.front + self.length) < self.front
        kept = torch.arange(self.window) >= self.window - written
        return t_ext[idx].to(device), obs_ext[idx].to(device), kept.expand_as(idx).to(device)


def default_partitions(sample_steps: int, window: int) -> int:
    """n so that the queue has about as many rungs as the configured sampler has steps."""
    return max(1, round(sample_steps / window))


class FifoSampler:
    """Iterate to get clean latent frames (B, C, H, W), one per queue step, forever."""

    def __init__(self, model, context: torch.Tensor, schedule, cfg: DiffusionConfig, plan: FifoPlan, *,
                 generator: torch.Generator | None = None, clip_x0: float | None = None, max_batch: int = 0):
        if context.ndim != 5 or context.shape[1] < 1:
            raise ValueError(f"context must be (B, n>=1, C, H, W) clean latents, got {tuple(context.shape)}")
        if plan.window > model.max_frames:
            raise ValueError(f"FIFO window {plan.window} exceeds the model's {model.max_frames} frames")
        if plan.timesteps != schedule.timesteps:
            raise ValueError(f"plan built for T={plan.timesteps}, schedule has T={schedule.timesteps}")
        self.model, self.schedule, self.cfg, self.plan = model, schedule, cfg, plan
        self.generator, self.clip_x0, self.max_batch = generator, clip_x0, max_batch
        b, device = context.shape[0], context.device
        self.levels = plan.levels(device).expand(b, -1).contiguous()  # kernels get plain strides
        self.prev_levels = torch.cat([torch.full((b, 1), -1, device=device), self.levels[:, :-1]], dim=1)
        idx, self.written = plan.windows()
        self.idx = idx.to(device)
        t_ext, obs_ext, _ = plan.call_pattern(device)
        self.t_calls = t_ext.repeat(b, 1).float()  # (B * calls, f), batch-major
        self.obs_calls = obs_ext.repeat(b, 1)
        # history: the last `front` clean frames (observed frames first, padded by repeating the oldest)
        if plan.front:
            pad = max(0, plan.front - context.shape[1])
            hist = torch.cat([context[:, :1].expand(-1, pad, -1, -1, -1), context], dim=1)
            self.history = hist[:, -plan.front:].clone()
        else:
            self.history = context[:, :0]
        base = context[:, -1:].expand(-1, plan.length, -1, -1, -1)
        nothing_observed = torch.zeros(b, plan.length, dtype=torch.bool, device=device)
        self.queue, _ = ops.add_noise(base.contiguous(), self.levels, nothing_observed, schedule.alpha,
                                      schedule.sigma, generator=generator, prediction=cfg.prediction)
        self.steps = 0

    def _model_out(self) -> torch.Tensor:
        """The model's output for every queue slot, each from its own window (one batched call)."""
        b, length = self.queue.shape[:2]
        ext = torch.cat([self.history, self.queue], dim=1)
        x = ext[:, self.idx].flatten(0, 1)  # (B * calls, f, C, H, W)
        chunks = x.shape[0] if self.max_batch <= 0 else self.max_batch
        out = torch.cat([self.model(xs, ts, os).float() for xs, ts, os in
                         zip(x.split(chunks), self.t_calls.split(chunks), self.obs_calls.split(chunks))])
        kept = out[:, -self.written:].reshape(b, -1, *out.shape[2:])  # windows tile the queue in order
        if kept.shape[1] != length:
            raise AssertionError(f"windows cover {kept.shape[1]} slots, queue has {length}")
        return kept

    def _clip(self, out: torch.Tensor) -> torch.Tensor:
        """Pixel space: keep the x0 prediction in range by re-deriving the model output from it."""
        from fastdiff.diffusion import clamp_prediction

        a = self.schedule.alpha[self.levels][..., None, None, None]
        s = self.schedule.sigma[self.levels][..., None, None, None]
        return clamp_prediction(out, self.queue, a, s, self.cfg.prediction, self.clip_x0)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        out = self._model_out()
        if self.clip_x0 is not None:
            out = self._clip(out)
        eta = self.cfg.ddim_eta
        noise = torch.randn(self.queue.shape, generator=self.generator, device=self.queue.device) if eta else None
        # the whole queue, every frame at its own level, in one fused launch
        denoised = ops.ddim_step(self.queue, out, self.levels, self.prev_levels, self.schedule.alpha,
                                 self.schedule.sigma, eta=eta, noise=noise, prediction=self.cfg.prediction)
        head = denoised[:, 0]
        tail = torch.randn(head.shape, generator=self.generator, device=head.device)[:, None]
        self.queue = torch.cat([denoised[:, 1:], tail], dim=1)
        if self.plan.front:
            self.history = torch.cat([self.history[:, 1:], head[:, None]], dim=1)
        self.steps += 1
        return head

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.step()


def fifo_frames(model, context: torch.Tensor, schedule, cfg: DiffusionConfig, plan: FifoPlan, *,
                generator: torch.Generator | None = None, clip_x0: float | None = None,
                warmup: int | None = None, max_batch: int = 0) -> Iterator[torch.Tensor]:
    """Clean latent frames (B, C, H, W) that continue `context`, after `warmup` dropped ones."""
    sampler = FifoSampler(model, context, schedule, cfg, plan, generator=generator, clip_x0=clip_x0,
                          max_batch=max_batch)
    skip = plan.length - plan.window if warmup is None else warmup
    if skip < 0:
        raise ValueError(f"warmup must be >= 0, got {skip}")
    for _ in range(skip):
        sampler.step()
    yield from sampler
