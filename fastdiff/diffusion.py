"""Diffusion with per-frame noise levels: schedules, training noise patterns, loss, samplers, rollout.

Conventions: clips are (B, K, C, H, W); timesteps t are (B, K) integers in [0, T); observed frames
(B, K) bool are kept clean and excluded from the loss. alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar),
so x_t = alpha[t] x0 + sigma[t] eps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.config import HEUN_REFUSES_CONTEXT_NOISE, DiffusionConfig


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


def observed_frames(cfg: DiffusionConfig, window: int) -> int:
    """Frames a rollout window observes: `rollout_observed`, or K/2 (the paper's) when 0."""
    return cfg.rollout_observed or window // 2


def sample_training_levels(batch: int, frames: int, timesteps: int, paper_prob: float,
                           generator: torch.Generator, device, observed: int,
                           stagger: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame timesteps (B, K) and observed mask (B, K) for training.

    With probability `paper_prob` a window follows the rollout: its first `observed` frames (`observed_frames`:
    K/2 by default, the paper's) clean, the rest sharing one noise level. Otherwise every frame draws its own
    level and a random clean prefix of 0 .. max(K/2, observed) frames is observed, so diagonal (FIFO) and pyramid
    denoising see nothing they were not trained on.

    `stagger` > 0 (`training_stagger`) makes the rollout's windows those of the pyramid sampler instead: each
    generated frame is `stagger` * (T - 1) levels noisier than the one before, clamped to [0, T - 1], at a random
    point of the whole schedule (0 is the shared level above).
    """
    frame = torch.arange(frames, device=device)
    paper = torch.rand(batch, 1, generator=generator, device=device) < paper_prob
    t_shared = torch.randint(0, timesteps, (batch, 1), generator=generator, device=device).expand(batch, frames)
    t_free = torch.randint(0, timesteps, (batch, frames), generator=generator, device=device)
    prefix = torch.randint(0, max(frames // 2, observed) + 1, (batch, 1), generator=generator, device=device)
    if stagger > 0:  # progress: the share of its own schedule each generated frame has done, in [0, 1]
        point = torch.rand(batch, 1, generator=generator, device=device) * (1 + stagger * (frames - observed - 1))
        progress = (point - (frame - observed).clamp(min=0) * stagger).clamp(0, 1)
        t_shared = ((timesteps - 1) * (1 - progress)).round().long()
    observed = torch.where(paper, frame < observed, frame < prefix)
    t = torch.where(paper, t_shared, t_free).masked_fill(observed, 0)
    return t, observed


def training_stagger(cfg: DiffusionConfig) -> float:
    """The level gap between successive generated frames, as a share of T - 1, in training's rollout-pattern
    windows: where `train_staggered` asks training to follow the pyramid sampler, the gap its frame delay leaves
    (`ddim_sample` steps each frame down a ladder of sample_steps levels from T - 1 to 0), else 0."""
    if not cfg.train_staggered:
        return 0.0
    return frame_delay(cfg) / max(cfg.sample_steps - 1, 1)


def frame_weights(t: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig) -> torch.Tensor:
    """Per-frame loss weights (B, K): uniform, min-SNR-gamma (Hang et al. 2023) for the prediction target, or x0
    (the implied x0's error, whatever the model predicts)."""
    if cfg.loss_weight == "uniform":
        return ops.uniform_weight(t)
    if cfg.loss_weight == "x0":
        return ops.x0_error_weight(t, schedule.alpha, schedule.sigma, prediction=cfg.prediction)
    return ops.min_snr_weight(t, schedule.alpha, schedule.sigma, gamma=cfg.min_snr_gamma, prediction=cfg.prediction)


# A pixel is foreground where some channel differs from the frame's median by more than this (model units, [-1, 1]:
# 0.1 is 13 of 255 uint8 levels, above the balls renderer's faint anti-aliased edge).
FOREGROUND_THRESHOLD = 0.1


def foreground_weights(x0: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, K, 1, H, W) of clean clips x0 (B, K, C, H, W): 1 + foreground_weight near the
    foreground, 1 elsewhere, scaled to mean 1 in every frame (so the loss keeps the plain MSE's scale, and grad_clip
    its meaning). Foreground: the pixels whose colour differs from the frame's median colour (its background, where
    that covers most of the frame, as balls' black) in some channel, grown by one pixel, so that every object's rim
    and the background between two objects that touch count as foreground."""
    b, k, _, h, w = x0.shape
    flat = x0.detach().flatten(3).float()  # (B, K, C, H*W)
    background = flat.median(dim=3, keepdim=True).values
    mask = ((flat - background).abs() > FOREGROUND_THRESHOLD).any(dim=2).float().view(b * k, 1, h, w)
    mask = F.max_pool2d(mask, 3, stride=1, padding=1).view(b, k, 1, h, w)
    pixel = 1.0 + foreground_weight * mask
    return pixel / pixel.mean(dim=(3, 4), keepdim=True)


def masked_diffusion_loss(model, x0: torch.Tensor, t: torch.Tensor, observed: torch.Tensor, schedule: Schedule,
                          prediction: str, generator: torch.Generator | None, *, weight: torch.Tensor | None = None,
                          excluded: torch.Tensor | None = None, retarget=None,
                          context_noised: bool = False, per_window: bool = False,
                          pixel_weight: torch.Tensor | None = None, self_condition: bool = False):
    """The loss every caller trains or measures with: noise clean clips x0 (B, K, C, H, W) to per-frame levels t
    (B, K), observed frames kept clean, predict, and take the (weighted) MSE over the frames that are neither
    observed nor `excluded`. `retarget(x_t, target)` may replace the regression target (generative
    distillation regresses onto its teacher). With `context_noised`, observed frames whose level in t is above 0
    are noised to it too (context noise); they stay out of the loss. With `per_window`, returns (loss, each
    window's unweighted MSE over the same frames (B,), detached), the scores of prioritised replay.
    `pixel_weight` (broadcast to x0's shape, e.g. :func:`foreground_weights`) weighs each pixel's squared error
    (the per-window scores too). With `self_condition`, the model also reads :func:`self_condition_estimate`."""
    clean = observed & (t == 0) if context_noised else observed
    x_t, target = ops.add_noise(x0, t, clean, schedule.alpha, schedule.sigma, generator=generator,
                                prediction=prediction)
    if retarget is not None:
        target = retarget(x_t, target)
    # self-conditioning: the graded call also reads the estimate of a first, gradient-free one
    extra = ((self_condition_estimate(model, x_t, t, observed, schedule, prediction, generator),)
             if self_condition else ())
    pred = model(x_t, t.float(), observed, *extra)
    if pixel_weight is not None:  # sum w (pred - target)^2 == sum (sqrt(w) pred - sqrt(w) target)^2: the same kernel
        root = pixel_weight.sqrt()
        pred, target = pred * root, target * root
    masked = observed if excluded is None else observed | excluded
    if not per_window:
        return ops.frame_mse_loss(pred, target, weight, masked)
    loss, per_frame = ops.frame_mse_loss(pred, target, weight, masked, per_frame=True)  # (B, K), the same pass
    kept = (~masked).float()
    return loss, (per_frame * kept).sum(1) / kept.sum(1).clamp(min=1.0)


def clean_estimate(model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, observed: torch.Tensor,
                   schedule: Schedule, prediction: str) -> torch.Tensor:
    """The x0 that a model output (B, K, C, H, W) at noisy frames x_t and levels t (B, K) implies, zero on the
    observed frames (whose clean content the input already holds): the self-conditioning estimate."""
    a = schedule.alpha[t][..., None, None, None]
    s = schedule.sigma[t][..., None, None, None]
    dtype = torch.promote_types(x_t.dtype, torch.float32)  # bf16 inputs: the division by alpha in float32
    x0, _ = predict_x0_eps(model_out.to(dtype), x_t.to(dtype), a, s, prediction)
    return x0.masked_fill(observed[:, :, None, None, None], 0.0).to(x_t.dtype)


def self_condition_estimate(model, x_t: torch.Tensor, t: torch.Tensor, observed: torch.Tensor, schedule: Schedule,
                            prediction: str, generator: torch.Generator | None) -> torch.Tensor:
    """Training's self-conditioning input: in a random half of the windows the model's own x0 estimate from a
    gradient-free call at the same noisy input (with the zero estimate), zeros in the others, so the model learns
    both to start a sample and to refine its previous estimate (Chen et al., "Analog Bits"). Drawn per window on
    the device, so the step stays capturable."""
    keep = torch.rand(t.shape[0], generator=generator, device=t.device) < 0.5
    with torch.no_grad():
        estimate = clean_estimate(model(x_t, t.float(), observed), x_t, t, observed, schedule, prediction)
    return estimate * keep[:, None, None, None, None].to(estimate.dtype)


def redrawn_context(model, x0: torch.Tensor, observed: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Training's redrawn context (`diffusion.context_redraw`): clean clips x0 (B, K, C, H, W) whose observed
    frames, in a random share of the windows, are the model's own x0 of them from one gradient-free call. That
    call sees the observed frames noised to one level per window in [0, context_redraw_level * T) and the other
    frames pure noise (their future hidden, as the rollout's window before drew them), no frame held clean. The
    frames to predict keep their true content. Drawn per window on the device, so the step stays capturable."""
    b = x0.shape[0]
    level = window_context_levels(cfg.context_redraw_level, b, schedule.timesteps, generator, x0.device)
    redraw = torch.rand(b, 1, generator=generator, device=x0.device) < cfg.context_redraw
    t_draw = torch.where(observed, level, schedule.timesteps - 1)
    none_clean = torch.zeros_like(observed)
    with torch.no_grad():
        x_t, _ = ops.add_noise(x0, t_draw, none_clean, schedule.alpha, schedule.sigma, generator=generator,
                               prediction=cfg.prediction)
        drawn = clean_estimate(model(x_t, t_draw.float(), none_clean), x_t, t_draw, none_clean, schedule,
                               cfg.prediction)
    return torch.where((redraw & observed)[:, :, None, None, None], drawn.to(x0.dtype), x0)


def context_level(share: float, timesteps: int) -> int:
    """The noise level that a context-noise share of T names. Training draws each window's context level below it
    (`diffusion.context_noise`); the DDIM rollouts condition at it (`diffusion.sample_context_noise`)."""
    return int(share * timesteps)


def window_context_levels(share: float, batch: int, timesteps: int, generator: torch.Generator | None,
                          device) -> torch.Tensor:
    """(batch, 1): one noise level per training window, uniform in [0, share * T) (at least level 0): the level
    context noise noises the observed frames to, and the one the redrawn context is drawn from."""
    top = max(1, context_level(share, timesteps))
    return torch.randint(0, top, (batch, 1), generator=generator, device=device)


def training_loss(model, x0: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig,
                  generator: torch.Generator, *, per_window: bool = False):
    """The masked diffusion loss of one batch of clean clips x0 (B, K, C, H, W) at the training noise levels
    (with `per_window`, also each window's loss: :func:`masked_diffusion_loss`)."""
    b, k = x0.shape[:2]
    t, observed = sample_training_levels(b, k, schedule.timesteps, cfg.paper_pattern_prob, generator, x0.device,
                                         observed_frames(cfg, k), training_stagger(cfg))
    weight = frame_weights(t, schedule, cfg)
    noised = cfg.context_noise > 0
    if noised:
        t = torch.where(observed, window_context_levels(cfg.context_noise, b, schedule.timesteps, generator,
                                                        x0.device), t)
    pixel_weight = foreground_weights(x0, cfg.foreground_weight) if cfg.foreground_weight > 0 else None
    if cfg.context_redraw > 0:  # after the weights: those follow the true frames, and the redraw is context only
        x0 = redrawn_context(model, x0, observed, schedule, cfg, generator)
    return masked_diffusion_loss(model, x0, t, observed, schedule, cfg.prediction, generator, weight=weight,
                                 context_noised=noised, per_window=per_window, pixel_weight=pixel_weight,
                                 self_condition=cfg.self_condition)


@torch.no_grad()
def loss_at_levels(model, x0: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig, levels: list[int],
                   n_observed: int, generator: torch.Generator) -> torch.Tensor:
    """Unweighted loss at fixed noise levels (evaluation): returns (len(levels),)."""
    b, k = x0.shape[:2]
    observed = (torch.arange(k, device=x0.device) < n_observed).expand(b, k)
    ones = torch.ones(b, k, device=x0.device)
    return torch.stack([
        masked_diffusion_loss(model, x0, torch.full((b, k), level, device=x0.device, dtype=torch.long)
                              .masked_fill(observed, 0), observed, schedule, cfg.prediction, generator, weight=ones)
        for level in levels])


def predict_x0_eps(model_out, x_t, a, s, prediction: str):
    """(x0, eps) implied by the model's output in its parameterisation, at x_t = a x0 + s eps."""
    if prediction == "eps":
        return (x_t - s * model_out) / a, model_out
    if prediction == "v":
        return a * x_t - s * model_out, s * x_t + a * model_out
    if prediction == "x0":
        return model_out, (x_t - a * model_out) / s
    raise ValueError(prediction)


def clamp_prediction(model_out, x_t, a, s, prediction: str, limit: float):
    """The model output re-derived from its x0 prediction clamped to [-limit, limit] (pixel space: the sampler
    stays in range)."""
    x0, _ = predict_x0_eps(model_out, x_t, a, s, prediction)
    x0 = x0.clamp(-limit, limit)
    if prediction == "eps":
        return (x_t - a * x0) / s
    if prediction == "v":
        return (a * x_t - x0) / s
    return x0


@torch.no_grad()
def ddim_sample(model, clip: torch.Tensor, observed: torch.Tensor, schedule: Schedule, *, steps: int,
                eta: float = 0.0, prediction: str = "eps", generator: torch.Generator | None = None,
                clip_x0: float | None = None, start: float = 1.0, context_level: int = 0,
                frame_delay: int = 0, history_guidance: float = 0.0, spacing: float = 1.0,
                self_condition: bool = False) -> torch.Tensor:
    """Generate the non-observed frames of `clip` (their content is ignored) with DDIM.

    Each frame steps down the levels top * (1 - u)^spacing for u evenly spaced over [0, 1], then to clean:
    `spacing` 1 spaces them evenly (the usual DDIM ladder), < 1 keeps them high longer and takes fewer steps at
    low noise, > 1 takes more there (as EDM's schedule does).

    `frame_delay` > 0 staggers the generated frames (Diffusion Forcing's pyramid schedule): the j-th generated
    frame begins its `steps` DDIM steps `j * frame_delay` model calls after the first, waiting at the start level
    until then, so each frame is denoised beside nearer frames that are already cleaner. The model was trained
    on independent per-frame levels (`sample_training_levels`), so these windows are in its distribution (and
    with `diffusion.train_staggered`, on exactly these patterns as well). It
    costs `(G - 1) * frame_delay` more model calls for G generated frames; 0 is the paper's synchronous window.

    `start` < 1 begins at level start * T from the latest observed frame noised to that level (as FIFO's queue
    begins), instead of from pure noise at T: the sample keeps that frame's structure where the model does not
    move it. `context_level` > 0 conditions on the observed frames noised once to that level (a model trained with
    context noise); the returned observed frames are then the noised ones.

    `history_guidance` w > 0 also predicts each call without the history (the observed frames pure noise at
    T - 1, unobserved) and steps with cond + w * (cond - uncond), in one model call over both batches.

    `self_condition` (a model built with it) hands every call the clean estimate of the call before it
    (:func:`clean_estimate` of its output, after the clamp; zeros at the first call)."""
    b, k = clip.shape[:2]
    obs5 = observed[:, :, None, None, None]
    noise = torch.randn(clip.shape, generator=generator, device=clip.device)
    clean = clip
    every_frame = torch.zeros_like(observed)  # q-sample every frame of what is passed (none held clean)

    def q_sample(x: torch.Tensor, level: int, eps: torch.Tensor) -> torch.Tensor:
        t = torch.full((b, k), level, device=x.device, dtype=torch.long)
        return ops.add_noise(x, t, every_frame, schedule.alpha, schedule.sigma, noise=eps, prediction="x0")[0]

    if context_level > 0:
        clip = q_sample(clip, context_level, torch.randn(clip.shape, generator=generator, device=clip.device))
    top = schedule.timesteps - 1 if start >= 1.0 else max(int(round(start * (schedule.timesteps - 1))), 0)
    if start >= 1.0:
        x = torch.where(obs5, clip, noise)
    else:
        from fastdiff.models.dit import last_observed

        x = torch.where(obs5, clip, q_sample(last_observed(clean, observed), top, noise))
    # ladder[p]: a frame's level after p of its steps; -1 is "clean" (ops.ddim_step's to-clean), held there
    if spacing == 1.0:
        levels = torch.linspace(top, 0, steps, device=clip.device)
    else:
        levels = top * (1.0 - torch.linspace(0.0, 1.0, steps, device=clip.device, dtype=torch.float64)) ** spacing
    ladder = torch.cat([levels.round().long(),
                        torch.full((1,), -1, device=clip.device, dtype=torch.long)])
    # order[b, k]: 0 for the first generated frame of row b, 1 for the next, ...; observed frames are not stepped
    order = (torch.cumsum((~observed).long(), dim=1) - 1).clamp(min=0)
    calls = steps + frame_delay * max(int((~observed).sum(1).max()) - 1, 0)
    if history_guidance > 0:  # what the unconditional calls see in place of the history: noise, not observed
        history_noise = torch.randn(clip.shape, generator=generator, device=clip.device)
        observed_both = torch.cat([observed, torch.zeros_like(observed)])
    estimate = torch.zeros_like(x) if self_condition else None
    for i in range(calls):
        progress = i - order * frame_delay  # steps this frame has taken (< 0: not begun, >= steps: clean)
        # a frame that has not begun waits at `top`; a finished one is clean and goes in at level 0; observed
        # frames sit at context_level throughout (0: clean), their step undone by the where below
        t = ladder[progress.clamp(0, steps)].clamp(min=0).masked_fill(observed, context_level)
        stepping = (progress >= 0) & (progress < steps) & ~observed
        t_prev = torch.where(stepping, ladder[(progress + 1).clamp(0, steps)], t)  # observed: t, context_level
        extra = () if estimate is None else (estimate,)
        if history_guidance > 0:
            x_free = torch.where(obs5, history_noise, x)
            t_free = torch.where(observed, schedule.timesteps - 1, t)
            both = model(torch.cat([x, x_free]), torch.cat([t, t_free]).float(), observed_both,
                         *(torch.cat([e, e]) for e in extra))
            cond, uncond = both.float().chunk(2)
            out = cond + history_guidance * (cond - uncond)
        else:
            out = model(x, t.float(), observed, *extra)
        if clip_x0 is not None:  # pixel space: keep x0 in range by re-deriving the prediction
            a, s = schedule.alpha[t][..., None, None, None], schedule.sigma[t][..., None, None, None]
            out = clamp_prediction(out.float(), x, a, s, prediction, clip_x0)
        if estimate is not None:
            estimate = clean_estimate(out, x, t, observed, schedule, prediction)
        noise = torch.randn(x.shape, generator=generator, device=x.device) if eta > 0 else None
        stepped = ops.ddim_step(x, out.float(), t, t_prev, schedule.alpha, schedule.sigma, eta=eta, noise=noise,
                                prediction=prediction)
        x = torch.where(obs5, clip, torch.where(stepping[:, :, None, None, None], stepped, x))
    return x


@torch.no_grad()
def heun_sample(model, clip: torch.Tensor, observed: torch.Tensor, schedule: Schedule, *, steps: int = 50,
                prediction: str = "eps", generator: torch.Generator | None = None, s_churn: float = 80.0,
                s_min: float = 0.0, s_max: float = float("inf"), s_noise: float = 1.0,
                sigma_min: float = 0.002, sigma_max: float = 1000.0, rho: float = 7.0) -> torch.Tensor:
    """The EDM stochastic Heun sampler (Karras et al. 2022, Alg. 2), the paper's default
    `heun-80-inf-0-1-1000-0.002-7-50`, run on the VP model through x_ve = x / alpha.

    The per-element math is the fused per-frame EDM kernels (fastdiff_kernels.noise_schedule: predictor,
    corrector and the next step's churn in one pass each); observed frames have sigma 0 throughout, which those
    steps leave untouched."""
    b, k = clip.shape[:2]
    device = clip.device
    obs5 = observed[:, :, None, None, None]
    table = schedule.ve_sigma()
    sigma_max = min(sigma_max, float(table[-1]))
    sigma_min = max(sigma_min, float(table[0]))
    i = torch.arange(steps, device=device, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas.float(), torch.zeros(1, device=device)])
    churn = {"S_churn": s_churn, "S_min": s_min, "S_max": s_max, "S_noise": s_noise, "num_steps": steps}

    def per_frame(level: float) -> torch.Tensor:  # (B, K): the level on generated frames, 0 on observed ones
        return torch.full((b, k), level, device=device).masked_fill(observed, 0.0)

    def noise():
        return torch.randn(clip.shape, generator=generator, device=device)

    def denoise(x_ve, sig):  # D(x; sigma) of the VP model, per frame
        t = schedule.t_from_ve_sigma(sig).masked_fill(observed, 0)
        a = (1.0 / (1.0 + sig**2).sqrt())[..., None, None, None]
        x_vp = torch.where(obs5, clip, x_ve * a)
        x0, _ = predict_x0_eps(model(x_vp, t, observed).float(), x_vp, a, a * sig[..., None, None, None],
                               prediction)
        return torch.where(obs5, clip, x0)

    x = noise() * sigmas[0]
    x, sig_hat = ops.edm_churn(x, per_frame(float(sigmas[0])), noise=noise() if s_churn > 0 else None, **churn)
    for n in range(steps):
        sig_next = per_frame(float(sigmas[n + 1]))
        x_pred, _ = ops.edm_heun_step(x, denoise(x, sig_hat), sig_hat, sig_next)
        if float(sigmas[n + 1]) == 0.0:  # the last step is Euler's
            x = x_pred
            break
        # the corrector, fused with the churn of the next step's level
        x, sig_hat = ops.edm_heun_step(x, denoise(x_pred, sig_next), sig_hat, sig_next, x_pred=x_pred,
                                       noise=noise() if s_churn > 0 else None, **churn)
    return torch.where(obs5, clip, x)


def frame_delay(cfg: DiffusionConfig) -> int:
    """Model calls between the starts of successive generated frames: `sample_frame_lag` of `sample_steps`."""
    return int(round(cfg.sample_frame_lag * cfg.sample_steps))


def rollout_model_calls(cfg: DiffusionConfig, window: int, context: int, total: int,
                        sampler: str | None = None) -> int:
    """Model calls (each over the whole batch) that `rollout` takes from `context` real frames to `total` frames
    per video: what a sample costs, for planning a run that must leave time for its final sample."""
    n_obs, have, calls = observed_frames(cfg, window), context, 0
    while have < total:  # the windows rollout_chunks steps through
        new = window - min(have, n_obs)
        if (sampler or cfg.sampler) == "heun":  # a predictor and a corrector a step, but no corrector on the last
            calls += max(2 * cfg.sample_steps - 1, 1)
        else:
            calls += cfg.sample_steps + frame_delay(cfg) * (new - 1)
        have += new
    return calls


def sample_window(model, clip: torch.Tensor, observed: torch.Tensor, schedule: Schedule, cfg: DiffusionConfig, *,
                  generator: torch.Generator | None = None, clip_x0: float | None = None,
                  sampler: str | None = None) -> torch.Tensor:
    """Generate the frames of one window that are not observed, with the configured sampler."""
    if (sampler or cfg.sampler) == "heun":
        if cfg.sample_context_noise > 0:
            raise ValueError(f"diffusion.sample_context_noise with the Heun sampler {HEUN_REFUSES_CONTEXT_NOISE}; "
                             "sample with DDIM")
        return heun_sample(model, clip, observed, schedule, steps=cfg.sample_steps, prediction=cfg.prediction,
                           generator=generator)
    return ddim_sample(model, clip, observed, schedule, steps=cfg.sample_steps, eta=cfg.ddim_eta,
                       prediction=cfg.prediction, generator=generator, clip_x0=clip_x0, start=cfg.sample_start,
                       context_level=context_level(cfg.sample_context_noise, schedule.timesteps),
                       frame_delay=frame_delay(cfg), history_guidance=cfg.history_guidance,
                       spacing=cfg.sample_spacing, self_condition=cfg.self_condition)


@torch.no_grad()
def rollout_chunks(model, context: torch.Tensor, window: int, schedule: Schedule, cfg: DiffusionConfig, *,
                   n_observed: int | None = None, generator: torch.Generator | None = None,
                   clip_x0: float | None = None, sampler: str | None = None,
                   observe=None) -> Iterator[torch.Tensor]:
    """The paper's autoregressive sliding rollout, endless: observe the last n frames (`observed_frames`), generate
    the rest of the window, slide. context (B, n0, C, H, W) clean frames; yields the new frames of each window
    (B, K - n, C, H, W). Only the observed frames are kept, so memory does not grow with the video. `observe`
    (B, n, C, H, W) -> same: what the later windows observe of the new frames in place of the frames as sampled
    (e.g. the autoencoder's round trip, `models.autoencoder.reencoder`); the yielded frames are the sampled ones."""
    b, n0 = context.shape[:2]
    n_obs = observed_frames(cfg, window) if n_observed is None else n_observed
    if not 0 < n_obs < window:
        raise ValueError(f"n_observed must be in [1, {window - 1}], got {n_obs}")
    if n0 < 1:
        raise ValueError("rollout needs at least one context frame")
    recent = context[:, -n_obs:]
    while True:
        n_ctx = recent.shape[1]
        clip = torch.zeros(b, window, *recent.shape[2:], device=recent.device)
        clip[:, :n_ctx] = recent
        observed = (torch.arange(window, device=recent.device) < n_ctx).expand(b, window)
        new = sample_window(model, clip, observed, schedule, cfg, generator=generator, clip_x0=clip_x0,
                            sampler=sampler)[:, n_ctx:]
        yield new
        recent = torch.cat([recent, new if observe is None else observe(new)], dim=1)[:, -n_obs:]


@torch.no_grad()
def rollout(model, context: torch.Tensor, total: int, window: int, schedule: Schedule, cfg: DiffusionConfig, *,
            n_observed: int | None = None, generator: torch.Generator | None = None,
            clip_x0: float | None = None, sampler: str | None = None, on_frames=None,
            observe=None) -> torch.Tensor:
    """:func:`rollout_chunks` collected: (B, total, C, H, W), the context included. `on_frames(n)` is told how
    many frames (per video) each chunk added, for a progress bar."""
    frames = list(context.unbind(1))
    chunks = rollout_chunks(model, context, window, schedule, cfg, n_observed=n_observed, generator=generator,
                            clip_x0=clip_x0, sampler=sampler, observe=observe)
    while len(frames) < total:
        new = next(chunks)
        frames.extend(new.unbind(1))
        if on_frames is not None:
            on_frames(min(new.shape[1], total - len(frames) + new.shape[1]))
    return torch.stack(frames[:total], dim=1)
