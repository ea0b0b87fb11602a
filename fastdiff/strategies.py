"""Batch strategies beyond reservoir replay, for the paper's comparison (replay.strategy).

- ``offline``: the i.i.d. baseline. The whole training stream is read once, encoded, and kept on the
  device as frames (not windows: K-fold less memory); every step draws its windows uniformly from it.
  The trainer still walks the stream frame by frame, so the number of steps and the batch match the
  online strategies exactly.
- ``gen-distill``: generative distillation (Masip et al. 2024). A frozen teacher, a copy of the EMA
  model refreshed every ``replay.teacher_every`` frames, generates the replayed windows with a few DDIM
  steps; the student is trained to match the teacher's noise prediction on them (not the sampled noise),
  so what is replayed is the teacher's whole reverse process rather than its samples alone:

      x_g ~ DDIM_teacher(steps = replay.distill_steps)          (all frames generated, nothing observed)
      x_t = alpha_t x_g + sigma_t eps,   t, observed ~ the training levels
      L   = [ sum_live w l(f(x_t), eps) + lambda * sum_gen w l(f(x_t), f_teacher(x_t)) ] / #frames

  Until the first teacher exists the replayed slots hold the live window, as with ``none``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fastdiff.diffusion import (
    ddim_sample,
    frame_weights,
    masked_diffusion_loss,
    observed_frames,
    sample_training_levels,
    training_loss,
    training_stagger,
)
from fastdiff.models.autoencoder import encode_frames

BANK_CHUNK = 1024  # frames encoded at once while building the offline bank


class StreamBank:
    """Every frame of a stream on the device; windows are gathered by start index."""

    def __init__(self, frames: torch.Tensor, window: int):
        if frames.shape[0] < window:
            raise ValueError(f"offline bank: {frames.shape[0]} frames is shorter than one window of {window}")
        self.frames, self.window = frames, window
        self._offsets = torch.arange(window, device=frames.device)

    @classmethod
    def from_stream(cls, stream, frames: int, window: int, autoencoder, *, dtype, device, log=print) -> StreamBank:
        """Read `frames` frames of `stream` and keep their latents (`autoencoder` None: the raw pixels) as `dtype`
        on `device`."""
        parts, read = [], 0
        while read < frames:
            chunk = stream.read(min(BANK_CHUNK, frames - read))
            if len(chunk) == 0:
                break
            pixels = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
            parts.append((pixels if autoencoder is None else encode_frames(autoencoder, pixels)).to(dtype))
            read += len(chunk)
        log(f"offline bank: {read} frames of {stream.info.name} held on {device} for i.i.d. windows")
        return cls(torch.cat(parts), window)

    @property
    def nbytes(self) -> int:
        return self.frames.numel() * self.frames.element_size()

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` windows (count, K, ...) with starts uniform over the whole stream; no host sync."""
        windows = self.frames.shape[0] - self.window + 1
        starts = torch.randint(0, windows, (count,), generator=generator, device=self.frames.device)
        return self.frames[starts[:, None] + self._offsets]


class GenerativeDistillation:
    """The teacher and the distillation part of the loss (see the module docstring)."""

    def __init__(self, teacher_every: int, steps: int, weight: float):
        self.teacher_every, self.steps, self.weight = teacher_every, steps, weight
        self.teacher: torch.nn.Module | None = None
        self.refreshed_at = -1

    def maybe_refresh(self, ema: torch.nn.Module, frames_seen: int) -> bool:
        if frames_seen % self.teacher_every != 0 or frames_seen == self.refreshed_at:
            return False
        self.teacher = copy.deepcopy(ema).requires_grad_(False).eval()
        self.refreshed_at = frames_seen
        return True

    @torch.no_grad()
    def generate(self, count: int, like: torch.Tensor, schedule, cfg, generator) -> torch.Tensor:
        """`count` whole windows from the teacher, nothing observed: (count, K, C, h, w)."""
        k = like.shape[1]
        clip = torch.zeros(count, *like.shape[1:], device=like.device)
        observed = torch.zeros(count, k, dtype=torch.bool, device=like.device)
        return ddim_sample(self.teacher, clip, observed, schedule, steps=self.steps, prediction=cfg.prediction,
                           generator=generator)

    def loss(self, model, live: torch.Tensor, replayed: int, schedule, cfg, generator) -> torch.Tensor:
        """The mixed live + distillation loss; falls back to the live windows while there is no teacher."""
        if self.teacher is None or replayed == 0:
            batch = live if replayed == 0 else torch.cat([live, live[-1:].expand(replayed, *live.shape[1:])])
            return training_loss(model, batch, schedule, cfg, generator)
        generated = self.generate(replayed, live, schedule, cfg, generator)
        x0 = torch.cat([live, generated.to(live.dtype)])
        b, k = x0.shape[:2]
        t, observed = sample_training_levels(b, k, schedule.timesteps, cfg.paper_pattern_prob, generator, x0.device,
                                             observed_frames(cfg, k), training_stagger(cfg))
        n_live = live.shape[0]

        def teacher_target(x_t, target):  # the replayed rows regress onto the teacher's prediction
            with torch.no_grad():
                teacher_out = self.teacher(x_t[n_live:], t[n_live:].float(), observed[n_live:]).to(target.dtype)
            return torch.cat([target[:n_live], teacher_out])

        weight = frame_weights(t, schedule, cfg)
        weight = torch.cat([weight[:n_live], self.weight * weight[n_live:]])
        return masked_diffusion_loss(model, x0, t, observed, schedule, cfg.prediction, generator, weight=weight,
                                     retarget=teacher_target)

    def state_dict(self) -> dict:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict(),
                "refreshed_at": self.refreshed_at}

    def load_state_dict(self, state: dict, ema: torch.nn.Module) -> None:
        self.refreshed_at = state["refreshed_at"]
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(ema).requires_grad_(False).eval()
            self.teacher.load_state_dict(state["teacher"])
