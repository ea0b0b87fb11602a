"""Per-frame noise-schedule ops (placeholder: references only; Triton kernels land with issue 5)."""

from __future__ import annotations

import torch


def _per_frame(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table[t].to(like.dtype).view(*t.shape, *([1] * (like.dim() - t.dim())))


def add_noise_reference(x0, t, observed, alpha, sigma, noise, prediction="eps"):
    """x_t = alpha[t] x0 + sigma[t] noise per frame; observed frames stay clean (x_t = x0).
    Target: eps -> noise, v -> alpha noise - sigma x0, x0 -> x0."""
    a, s = _per_frame(alpha, t, x0), _per_frame(sigma, t, x0)
    obs = observed.view(*observed.shape, *([1] * (x0.dim() - observed.dim())))
    x_t = torch.where(obs, x0, a * x0 + s * noise)
    if prediction == "eps":
        target = noise
    elif prediction == "v":
        target = a * noise - s * x0
    elif prediction == "x0":
        target = x0
    else:
        raise ValueError(f"unknown prediction {prediction!r}")
    return x_t, target


def add_noise(x0, t, observed, alpha, sigma, *, noise=None, generator=None, prediction="eps"):
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return add_noise_reference(x0, t, observed, alpha, sigma, noise, prediction)


def frame_mse_loss_reference(pred, target, weight, observed):
    """sum over non-observed frames of weight[b,k] * mean_chw (pred - target)^2, divided by their count."""
    per_frame = (pred.float() - target.float()).pow(2).flatten(2).mean(-1)
    keep = (~observed).float()
    return (per_frame * weight.float() * keep).sum() / keep.sum().clamp_min(1.0)


def frame_mse_loss(pred, target, weight, observed):
    return frame_mse_loss_reference(pred, target, weight, observed)
