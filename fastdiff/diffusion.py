"""Diffusion with per-frame noise levels: schedules, training noise patterns, loss, samplers, rollout.

Conventions: clips are (B, K, C, H, W); timesteps t are (B, K) integers in [0, T); observed frames
(B, K) bool are kept clean and excluded from the loss. alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar),
so x_t = alpha[t] x0 + sigma[t] eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdiff import ops
from fastdiff.config import DiffusionConfig


@dataclass
class Schedule:
    alpha: torch.Tensor  # (T,) float32 on the training device
    sigma: torch.Tensor  # (T,)

    @classmethod
    def make(cls, kind: str = "linear", timesteps: int = 1000, device="cpu") -> Schedule:
        if kind == "linear":  # DDPM's linear betas, rescaled so any T spans the same range as T=1000
            scale = 1000.0 / timesteps
            betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
            alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        elif kind == "cosine":  # Nichol & Dhariwal 2021
            s = 0.008
            steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
            alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        else:
            raise ValueError(f"unknown schedule {kind!r}")
        return cls(alpha_bar.sqrt().float().to(device), (1 - alpha_bar).sqrt().float().to(device))

    @property
    def timesteps(self) -> int:
        return self.alpha.numel()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return (self.alpha[t] / self.sigma[t]) ** 2

    def ve_sigma(self) -> torch.Tensor:
        """EDM's sigma for each discrete t: the noise-to-signal ratio sigma/alpha (increasing in t)."""
        return self.sigma / self.alpha

    def t_from_ve_sigma(self, s: torch.Tensor) -> torch.Tensor:
        """Fractional timestep whose sigma/alpha equals s (log-linear interpolation over the table)."""
        table = self.ve_sigma().log()
        x = s.clamp(min=float(self.ve_sigma()[0]), max=float(self.ve_sigma()[-1])).log()
        hi = torch.searchsorted(table, x.contiguous()).clamp(1, len(table) - 1)
        lo = hi - 1
        frac = (x - table[lo]) / (table[hi] - table[lo])
        return lo.float() + frac.clamp(0, 1)


def sample_training_levels(batch: int, frames: int, timesteps: int, paper_prob: float,
                           generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame timesteps (B, K) and observed mask (B, K) for training (decision 1).

    With probability `paper_prob` a window follows the paper: first K/2 frames observed, the rest share
    one noise level. Otherwise every frame draws its own level and a random clean prefix of 0..K/2
    frames is observed, so diagonal (FIFO) denoising sees nothing it was not trained on.
    """
    frame = torch.arange(frames, device=device)
    paper = torch.rand(batch, 1, generator=generator, device=device) < paper_prob
    t_shared = torch.randint(0, timesteps, (batch, 1), generator=generator, device=device).expand(batch, frames)
    t_free = torch.randint(0, timesteps, (batch, frames), generator=generator, device=device)
    prefix = torch.randint(0, frames // 2 + 1, (batch, 1), generator=generator, device=device)
    observed = torch.where(paper, frame < frames // 2, frame < prefix)
    t = torch.where(paper, t_shared, t_free).masked_fill(observed, 0)
    return t, observed


def frame_weights(t: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig) -> torch.Tensor:
    if cfg.loss_weight == "uniform":
        return torch.ones(t.shape, device=t.device)
    snr = schedule.snr(t)
    clipped = snr.clamp(max=cfg.min_snr_gamma)
    return clipped / snr if cfg.prediction == "eps" else clipped / (snr + 1)  # min-SNR-gamma


def training_loss(model, x0: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """The masked diffusion loss of one batch of clean clips x0 (B, K, C, H, W)."""
    b, k = x0.shape[:2]
    t, observed = sample_training_levels(b, k, schedule.timesteps, cfg.paper_pattern_prob, generator, x0.device)
    x_t, target = ops.add_noise(x0, t, observed, schedule.alpha, schedule.sigma, generator=generator,
                                prediction=cfg.prediction)
    pred = model(x_t, t.float(), observed)
    return ops.frame_mse_loss(pred, target, frame_weights(t, schedule, cfg), observed)


@torch.no_grad()
def loss_at_levels(model, x0: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig, levels: list[int],
                   n_observed: int, generator: torch.Generator) -> torch.Tensor:
    """Unweighted loss at fixed noise levels (evaluation): returns (len(levels),)."""
    b, k = x0.shape[:2]
    observed = (torch.arange(k, device=x0.device) < n_observed).expand(b, k)
    losses = []
    for level in levels:
        t = torch.full((b, k), level, device=x0.device, dtype=torch.long).masked_fill(observed, 0)
        x_t, target = ops.add_noise(x0, t, observed, schedule.alpha, schedule.sigma, generator=generator,
                                    prediction=cfg.prediction)
        pred = model(x_t, t.float(), observed)
        losses.append(ops.frame_mse_loss(pred, target, torch.ones(b, k, device=x0.device), observed))
    return torch.stack(losses)


def predict_x0_eps(model_out, x_t, a, s, prediction: str):
    if prediction == "eps":
        return (x_t - s * model_out) / a, model_out
    if prediction == "v":
        return a * x_t - s * model_out, s * x_t + a * model_out
    raise ValueError(prediction)


@torch.no_grad()
def ddim_sample(model, clip: torch.Tensor, observed: torch.Tensor, schedule: Schedule, *, steps: int,
                eta: float = 0.0, prediction: str = "eps", generator: torch.Generator | None = None,
                clip_x0: float | None = None) -> torch.Tensor:
    """Generate the non-observed frames of `clip` (their content is ignored) with DDIM."""
    b, k = clip.shape[:2]
    obs5 = observed[:, :, None, None, None]
    x = torch.where(obs5, clip, torch.randn(clip.shape, generator=generator, device=clip.device))
    levels = torch.linspace(schedule.timesteps - 1, 0, steps, device=clip.device).round().long()
    for i, level in enumerate(levels):
        t = torch.full((b, k), int(level), device=clip.device, dtype=torch.long).masked_fill(observed, 0)
        prev = int(levels[i + 1]) if i + 1 < steps else -1
        t_prev = torch.full((b, k), prev, device=clip.device, dtype=torch.long).masked_fill(observed, 0)
        out = model(x, t.float(), observed)
        if clip_x0 is not None:  # pixel space: keep x0 in range by re-deriving the prediction
            a, s = schedule.alpha[t][..., None, None, None], schedule.sigma[t][..., None, None, None]
            x0, eps = predict_x0_eps(out.float(), x, a, s, prediction)
            x0 = x0.clamp(-clip_x0, clip_x0)
            out = (x - a * x0) / s if prediction == "eps" else (a * x - x0) / s
        noise = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 else None
        x = ops.ddim_step(x, out.float(), t, t_prev, schedule.alpha, schedule.sigma, eta=eta, noise=noise,
                          prediction=prediction)
        x = torch.where(obs5, clip, x)
    return x


@torch.no_grad()
def heun_sample(model, clip: torch.Tensor, observed: torch.Tensor, schedule: Schedule, *, steps: int = 50,
                prediction: str = "eps", generator: torch.Generator | None = None, s_churn: float = 80.0,
                s_min: float = 0.0, s_max: float = float("inf"), s_noise: float = 1.0,
                sigma_min: float = 0.002, sigma_max: float = 1000.0, rho: float = 7.0) -> torch.Tensor:
    """The EDM stochastic Heun sampler (Karras et al. 2022, Alg. 2), the paper's default
    `heun-80-inf-0-1-1000-0.002-7-50`, run on the VP model through x_ve = x / alpha."""
    b, k = clip.shape[:2]
    device = clip.device
    obs5 = observed[:, :, None, None, None]
    table = schedule.ve_sigma()
    sigma_max = min(sigma_max, float(table[-1]))
    sigma_min = max(sigma_min, float(table[0]))
    i = torch.arange(steps, device=device, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas.float(), torch.zeros(1, device=device)])

    def denoise(x_ve, sig):
        t = schedule.t_from_ve_sigma(torch.full((b, k), float(sig), device=device)).masked_fill(observed, 0)
        a = 1.0 / math.sqrt(1.0 + float(sig) ** 2)
        x_vp = torch.where(obs5, clip, x_ve * a)
        out = model(x_vp, t, observed).float()
        x0, _ = predict_x0_eps(out, x_vp, a, a * float(sig), prediction)
        return torch.where(obs5, clip, x0)

    x = torch.randn(clip.shape, generator=generator, device=device) * sigmas[0]
    for n in range(steps):
        sig, sig_next = float(sigmas[n]), float(sigmas[n + 1])
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_min <= sig <= s_max else 0.0
        sig_hat = sig * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sig_hat**2 - sig**2) * s_noise * torch.randn(x.shape, generator=generator, device=device)
        d = (x - denoise(x, sig_hat)) / sig_hat
        x_next = x + (sig_next - sig_hat) * d
        if sig_next > 0:  # second-order correction
            d2 = (x_next - denoise(x_next, sig_next)) / sig_next
            x_next = x + (sig_next - sig_hat) * 0.5 * (d + d2)
        x = x_next
    return torch.where(obs5, clip, x)


@torch.no_grad()
def rollout(model, context: torch.Tensor, total: int, window: int, schedule: Schedule, cfg: DiffusionConfig, *,
            n_observed: int | None = None, generator: torch.Generator | None = None,
            clip_x0: float | None = None, sampler: str | None = None) -> torch.Tensor:
    """Autoregressive sliding rollout (the paper's): observe n frames, generate window - n, slide.

    context (B, n0, C, H, W) clean frames; returns (B, total, C, H, W) including the context."""
    b, n0 = context.shape[:2]
    n_obs = window // 2 if n_observed is None else n_observed
    if not 0 < n_obs < window:
        raise ValueError(f"n_observed must be in [1, {window - 1}], got {n_obs}")
    if n0 < 1:
        raise ValueError("rollout needs at least one context frame")
    frames = list(context.unbind(1))
    sampler = sampler or cfg.sampler
    while len(frames) < total:
        ctx = torch.stack(frames[-n_obs:], dim=1)
        n_ctx = ctx.shape[1]
        clip = torch.zeros(b, window, *ctx.shape[2:], device=ctx.device)
        clip[:, :n_ctx] = ctx
        observed = (torch.arange(window, device=ctx.device) < n_ctx).expand(b, window)
        if sampler == "heun":
            out = heun_sample(model, clip, observed, schedule, steps=cfg.sample_steps, prediction=cfg.prediction,
                              generator=generator)
        else:
            out = ddim_sample(model, clip, observed, schedule, steps=cfg.sample_steps, eta=cfg.ddim_eta,
                              prediction=cfg.prediction, generator=generator, clip_x0=clip_x0)
        frames.extend(out[:, n_ctx:].unbind(1))
    return torch.stack(frames[:total], dim=1)
