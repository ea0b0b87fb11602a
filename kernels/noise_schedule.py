"""Fused per-frame noise-schedule ops: noising, weighted frame loss, DDIM and EDM sampler steps.

Every op works on latent clips ``(B, K, C, H, W)`` with one noise level per frame ``(B, K)``
(fastdiff samples and trains with per-frame levels, observed frames at 0). Each Triton kernel runs on a 2-D grid: frames on axis 0 (the large count, no
65,535 limit there), chunks of ``BLOCK`` elements of one frame's ``C*H*W`` on axis 1. A program
loads its frame's coefficients once and streams its chunk: one read of each input, one write of
each output, fp32 math whatever the storage dtype (fp32 / bf16 / fp16). BLOCK follows the frame size
(a power of two, 16..2048) and the warps follow BLOCK (8 from 2048), except where the AOT compile sweep
found that spilling on a GPU arch with this Triton version (fastdiff_kernels.aot_table; see _config).

Formulas (a = alpha = sqrt(alpha_bar), s = sigma = sqrt(1 - alpha_bar), eps ~ N(0, 1)):

* ``add_noise`` (discrete t, tables ``alpha``/``sigma``):  x_t = a[t] x0 + s[t] eps, observed frames
  x_t = x0. Target: ``eps`` -> eps, ``v`` -> a eps - s x0, ``x0`` -> x0 (coefficients at t even on
  observed frames; the loss masks them anyway).
* ``frame_mse_loss``: L = sum_{b,k not observed} w[b,k] mean_chw (pred - target)^2 / max(#not observed, 1).
  dL/dpred = g 2 w (pred - target) / (C H W max(#, 1)) on non-observed frames, 0 on observed ones.
* ``ddim_step`` (Song et al. 2021, eq. 12): x0_hat, eps_hat from the model output, then
  x_prev = a' x0_hat + sqrt(s'^2 - c^2) eps_hat + c z, c = eta (s'/s) sqrt(1 - a^2/a'^2), with
  a' = alpha[t_prev], s' = sigma[t_prev] and t_prev = -1 meaning "to clean" (a' = 1, s' = 0).
* ``edm_euler_step`` / ``edm_heun_step`` / ``edm_churn`` (Karras et al. 2022, Algorithm 2), see their
  docstrings for the churn and the Heun two-call protocol: fastdiff.diffusion.heun_sample, the paper's
  sampler, runs on them.

Noise: given as a tensor, or drawn in the kernel with Philox (``seed`` / ``offset``: Python ints or
int64 device tensors of one element, so a CUDA graph can advance them in place). Element ``i`` of
frame ``f`` uses Philox counter ``offset + f * ceil(CHW / 4) + i // 4`` (lane ``i % 4``; one Philox
call yields four normals by two Box-Muller pairs), independent of the block size. A call consumes
:func:`philox_counters` counters: advance ``offset`` by that much between calls for fresh noise.
The reference path (CPU) draws its noise from a ``torch.Generator`` seeded with (seed, offset): also
reproducible, but a different stream from the kernel's.

Float scalars (``eta``, churn parameters): Inductor hands Python floats to user Triton kernels as
fp64 (Liger-Kernel PR #1364), which would drag the arithmetic they touch into fp64. Every float scalar
is therefore cast to fp32 on entry to the kernel (``.to(tl.float32)``); integer sizes are ints.

Dispatch (:func:`fastdiff_kernels.dispatch.resolve`): Triton on CUDA, the PyTorch reference on CPU;
``FASTDIFF_KERNELS=triton`` with ``TRITON_INTERPRET=1`` runs the kernels in Triton's interpreter on
CPU. The Triton path is registered as ``torch.library.triton_op`` (``fastdiff::*``) so torch.compile
traces it without graph breaks; the reference path is plain PyTorch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastdiff_kernels import autotune, dispatch

PREDICTIONS = ("eps", "v", "x0")
_PRED_CODE = {"eps": 0, "v": 1, "x0": 2}
_NOISE_NONE, _NOISE_GIVEN, _NOISE_PHILOX = 0, 1, 2
_MAX_BLOCK = 2048


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _philox_normal(seed, counter_base, BLOCK: tl.constexpr):
    """BLOCK standard normals for BLOCK consecutive elements starting at a multiple of 4: Philox
    counter counter_base + q gives elements 4q..4q+3 (two Box-Muller pairs from its four words)."""
    counters = counter_base + tl.arange(0, BLOCK // 4).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    u0 = tl.random.uint_to_uniform_float(r0)
    u1 = tl.random.uint_to_uniform_float(r1)
    u2 = tl.random.uint_to_uniform_float(r2)
    u3 = tl.random.uint_to_uniform_float(r3)
    n0, n1 = tl.random.pair_uniform_to_normal(u0, u1)
    n2, n3 = tl.random.pair_uniform_to_normal(u2, u3)
    quads = tl.join(tl.join(n0, n1), tl.join(n2, n3))  # (BLOCK/4, 2, 2)
    return tl.reshape(quads, (BLOCK,))


@triton.jit
def _frame_noise(noise_ptr, seed_ptr, offset_ptr, frame, chunk_start, offs, mask, N, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """Noise for one chunk of one frame: loaded (NOISE=1) or Philox (NOISE=2), fp32."""
    if NOISE == 1:
        z = tl.load(noise_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = tl.load(seed_ptr)
        counters_per_frame = (N + 3) // 4
        base = tl.load(offset_ptr) + frame * counters_per_frame + chunk_start // 4
        z = _philox_normal(seed, base, BLOCK)
    return z


@triton.jit
def _add_noise_kernel(
    x0_ptr, noise_ptr, t_ptr, observed_ptr, alpha_ptr, sigma_ptr, seed_ptr, offset_ptr,
    xt_ptr, target_ptr, N,
    NOISE: tl.constexpr, PRED: tl.constexpr, WRITE_TARGET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    frame = tl.program_id(0).to(tl.int64)
    chunk_start = tl.program_id(1) * BLOCK
    offs = chunk_start + tl.arange(0, BLOCK)
    mask = offs < N
    t = tl.load(t_ptr + frame)
    a = tl.load(alpha_ptr + t).to(tl.float32)
    s = tl.load(sigma_ptr + t).to(tl.float32)
    observed = tl.load(observed_ptr + frame) != 0
    a_eff = tl.where(observed, 1.0, a)
    s_eff = tl.where(observed, 0.0, s)

    x = tl.load(x0_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    z = _frame_noise(noise_ptr, seed_ptr, offset_ptr, frame, chunk_start, offs, mask, N, NOISE, BLOCK)
    tl.store(xt_ptr + frame * N + offs, (a_eff * x + s_eff * z).to(xt_ptr.dtype.element_ty), mask=mask)
    if WRITE_TARGET:
        if PRED == 0:
            target = z
        elif PRED == 1:
            target = a * z - s * x
        else:
            target = x
        tl.store(target_ptr + frame * N + offs, target.to(target_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _frame_sqerr_kernel(pred_ptr, target_ptr, observed_ptr, partial_ptr, N, BLOCK: tl.constexpr):
    """Stage 1 of the loss: partial[f, c] = sum over chunk c of frame f of (pred - target)^2.
    Observed frames load nothing (mask) and contribute 0."""
    frame = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    keep = tl.load(observed_ptr + frame) == 0
    mask = offs < tl.where(keep, N, 0)  # observed frame: nothing is read
    p = tl.load(pred_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(target_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    d = p - q
    tl.store(partial_ptr + frame * tl.num_programs(1) + chunk, tl.sum(d * d, axis=0))


@triton.jit
def _frame_loss_finalize_kernel(
    partial_ptr, weight_ptr, observed_ptr, frame_mse_ptr, loss_ptr, count_ptr, F, N, CHUNKS,
    BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Stage 2 (one program, fixed order, so deterministic): per-frame means, weighted sum, count."""
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        frames = f0 + tl.arange(0, BLOCK_F)
        fmask = frames < F
        row = tl.zeros((BLOCK_F,), dtype=tl.float32)
        for c0 in range(0, CHUNKS, BLOCK_C):
            chunks = c0 + tl.arange(0, BLOCK_C)
            tile = tl.load(
                partial_ptr + frames[:, None] * CHUNKS + chunks[None, :],
                mask=fmask[:, None] & (chunks[None, :] < CHUNKS), other=0.0,
            )
            row += tl.sum(tile, axis=1)
        frame_mse = row / tl.cast(N, tl.float32)
        tl.store(frame_mse_ptr + frames, frame_mse, mask=fmask)
        keep = fmask & (tl.load(observed_ptr + frames, mask=fmask, other=1) == 0)
        w = tl.load(weight_ptr + frames, mask=fmask, other=0.0).to(tl.float32)
        acc += tl.where(keep, w * frame_mse, 0.0)
        cnt += tl.where(keep, 1.0, 0.0)
    count = tl.sum(cnt, axis=0)
    tl.store(loss_ptr, tl.sum(acc, axis=0) / tl.maximum(count, 1.0))
    tl.store(count_ptr, count)


@triton.jit
def _frame_loss_backward_kernel(
    grad_ptr, pred_ptr, target_ptr, weight_ptr, observed_ptr, count_ptr, dpred_ptr, dtarget_ptr, N,
    WRITE_DTARGET: tl.constexpr, BLOCK: tl.constexpr,
):
    """d(pred) = g 2 w (pred - target) / (N max(count, 1)) per element, 0 on observed frames;
    d(target) = -d(pred). One read of pred and target, one write per gradient."""
    frame = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_frame = offs < N
    keep = tl.load(observed_ptr + frame) == 0
    mask = offs < tl.where(keep, N, 0)  # observed frame: nothing is read, zeros are written
    g = tl.load(grad_ptr).to(tl.float32)
    w = tl.load(weight_ptr + frame).to(tl.float32)
    scale = 2.0 * g * w / (tl.cast(N, tl.float32) * tl.maximum(tl.load(count_ptr), 1.0))
    p = tl.load(pred_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(target_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.where(keep, scale * (p - q), 0.0)
    tl.store(dpred_ptr + frame * N + offs, d.to(dpred_ptr.dtype.element_ty), mask=in_frame)
    if WRITE_DTARGET:
        tl.store(dtarget_ptr + frame * N + offs, (-d).to(dtarget_ptr.dtype.element_ty), mask=in_frame)


@triton.jit
def _ddim_step_kernel(
    x_ptr, out_ptr, t_ptr, t_prev_ptr, alpha_ptr, sigma_ptr, noise_ptr, seed_ptr, offset_ptr, eta,
    y_ptr, N, PRED: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    eta = tl.cast(eta, tl.float32)  # Inductor may pass Python floats as fp64: keep the math in fp32
    frame = tl.program_id(0).to(tl.int64)
    chunk_start = tl.program_id(1) * BLOCK
    offs = chunk_start + tl.arange(0, BLOCK)
    mask = offs < N
    t = tl.load(t_ptr + frame)
    t_prev = tl.load(t_prev_ptr + frame)
    a = tl.load(alpha_ptr + t).to(tl.float32)
    s = tl.load(sigma_ptr + t).to(tl.float32)
    to_clean = t_prev < 0
    a_prev = tl.where(to_clean, 1.0, tl.load(alpha_ptr + tl.maximum(t_prev, 0)).to(tl.float32))
    s_prev = tl.where(to_clean, 0.0, tl.load(sigma_ptr + tl.maximum(t_prev, 0)).to(tl.float32))
    c = eta * (s_prev / tl.where(s > 0, s, 1.0)) * tl.sqrt(tl.maximum(1.0 - (a * a) / (a_prev * a_prev), 0.0))
    c = tl.where(s > 0, c, 0.0)
    direction = tl.sqrt(tl.maximum(s_prev * s_prev - c * c, 0.0))

    x = tl.load(x_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(out_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    if PRED == 0:
        eps = m
        x0 = (x - s * m) / a
    elif PRED == 1:
        x0 = a * x - s * m
        eps = s * x + a * m
    else:
        x0 = m
        eps = (x - a * m) / s
    y = a_prev * x0 + direction * eps
    if NOISE != 0:
        y += c * _frame_noise(noise_ptr, seed_ptr, offset_ptr, frame, chunk_start, offs, mask, N, NOISE, BLOCK)
    tl.store(y_ptr + frame * N + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _edm_step_kernel(
    x_ptr, den_ptr, xpred_ptr, sigma_ptr, sigma_next_ptr, noise_ptr, seed_ptr, offset_ptr,
    churn_gamma, s_min, s_max, s_noise, y_ptr, sigma_hat_ptr, N,
    CORRECT: tl.constexpr, CHURN: tl.constexpr, NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    # Inductor may pass Python floats as fp64: cast so no arithmetic is promoted to fp64.
    churn_gamma = tl.cast(churn_gamma, tl.float32)
    s_min = tl.cast(s_min, tl.float32)
    s_max = tl.cast(s_max, tl.float32)
    s_noise = tl.cast(s_noise, tl.float32)
    frame = tl.program_id(0).to(tl.int64)
    chunk_start = tl.program_id(1) * BLOCK
    offs = chunk_start + tl.arange(0, BLOCK)
    mask = offs < N
    sig = tl.load(sigma_ptr + frame).to(tl.float32)
    sig_next = tl.load(sigma_next_ptr + frame).to(tl.float32)
    h = sig_next - sig

    x = tl.load(x_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    den = tl.load(den_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
    if CORRECT:
        # den = D(x_pred, sigma_next); x_next = (x + x_pred)/2 + h/2 * (x_pred - den)/sigma_next
        xp = tl.load(xpred_ptr + frame * N + offs, mask=mask, other=0.0).to(tl.float32)
        safe_next = tl.where(sig_next != 0.0, sig_next, 1.0)
        y = tl.where(sig_next != 0.0, 0.5 * (x + xp) + (0.5 * h / safe_next) * (xp - den), xp)
    else:
        y = x + tl.where(h != 0.0, h / sig, 0.0) * (x - den)  # h = 0 (edm_churn): identity even at sigma 0
    sig_hat = sig_next
    if CHURN:
        gamma = tl.where((sig_next >= s_min) & (sig_next <= s_max) & (sig_next > 0.0), churn_gamma, 0.0)
        sig_hat = sig_next * (1.0 + gamma)
        amp = tl.sqrt(tl.maximum(sig_hat * sig_hat - sig_next * sig_next, 0.0)) * s_noise
        if NOISE != 0:
            y += amp * _frame_noise(noise_ptr, seed_ptr, offset_ptr, frame, chunk_start, offs, mask, N, NOISE, BLOCK)
    tl.store(sigma_hat_ptr + frame, sig_hat, mask=tl.program_id(1) == 0)  # one writer per frame
    tl.store(y_ptr + frame * N + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the launchers and the references
# ----------------------------------------------------------------------------------------------------


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer the Triton path writes comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def block_for(n: int) -> int:
    return max(16, min(triton.next_power_of_2(n), _MAX_BLOCK))


def _grid(frames: int, n: int, block: int) -> tuple[int, int]:
    return (frames, triton.cdiv(n, block))


def default_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


OP_NAME = "noise_schedule"
CONFIG_FIELDS = ("num_warps",)


def config_key(kernel: str, block: int, dtype: torch.dtype) -> str:
    """Key of a streaming kernel's config, e.g. 'ddim_step|BLOCK=2048|dtype=float16'."""
    return f"{kernel}|BLOCK={block}|dtype={str(dtype).removeprefix('torch.')}"


def warp_candidates(block: int) -> list[dict]:
    """The AOT sweep's alternatives to the heuristic warp count: half and double it."""
    w = default_warps(block)
    return [{"num_warps": x} for x in (w // 2, w, 2 * w)]


def _config(kernel: str, block: int, dtype: torch.dtype, device) -> dict:
    """Warps for a streaming kernel: a forced config (the AOT sweep), else the AOT table's replacement for
    this GPU arch and Triton version (where the heuristic spills there), else the heuristic."""
    key = config_key(kernel, block, dtype)
    return (autotune.forced_config(OP_NAME, key) or autotune.aot_default(OP_NAME, key, autotune.device_arch(device))
            or {"num_warps": default_warps(block)})


def _streaming_launch(name: str, kernel, clip: torch.Tensor, args: tuple, **constexprs) -> autotune.Launch:
    """A per-frame streaming kernel's launch over ``clip`` (B, K, ...): BLOCK from the frame size, warps
    from BLOCK (see _config; the clip's dtype and device select the config)."""
    frames, n = clip.shape[0] * clip.shape[1], math.prod(clip.shape[2:])
    block = block_for(n)
    cfg = _config(name, block, clip.dtype, clip.device)
    return autotune.Launch(kernel, _grid(frames, n, block), args, {**constexprs, "BLOCK": block}, cfg["num_warps"])


def philox_counters(x: torch.Tensor | tuple[int, ...]) -> int:
    """Philox counters one in-kernel draw over a (B, K, ...) tensor consumes: advance ``offset`` by
    this between calls so that consecutive calls never reuse noise."""
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)
    n = math.prod(shape[2:])
    return shape[0] * shape[1] * ((n + 3) // 4)


def _check_clip(name: str, x: torch.Tensor, per_frame: dict[str, torch.Tensor]) -> None:
    if x.dim() < 3:
        raise ValueError(f"{name}: x must be (B, K, C, ...) with a frame axis; got shape {tuple(x.shape)}")
    for what, tensor in per_frame.items():
        if tensor is not None and tuple(tensor.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"{name}: {what} must have shape (B, K) = {tuple(x.shape[:2])}; got {tuple(tensor.shape)}"
            )
    if not x.is_floating_point():
        raise TypeError(f"{name}: x dtype {x.dtype} not supported because the ops need floating point")


def _check_same(name: str, x: torch.Tensor, **others: torch.Tensor | None) -> None:
    for what, tensor in others.items():
        if tensor is not None and tuple(tensor.shape) != tuple(x.shape):
            raise ValueError(f"{name}: {what} must have the clip's shape {tuple(x.shape)}; got {tuple(tensor.shape)}")


def _check_prediction(name: str, prediction: str, allowed=PREDICTIONS) -> None:
    if prediction not in allowed:
        raise ValueError(f"{name}: prediction {prediction!r} not supported; choose one of {', '.join(allowed)}")


def _seed_tensor(value, device) -> torch.Tensor:
    """Seed / offset as a one-element int64 device tensor (ints are wrapped; tensors pass through so a
    CUDA graph can advance them in place)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"seed/offset tensor must be one int32/int64 element; got {value.dtype} {tuple(value.shape)}")
        return value.reshape(1).to(device=device, dtype=torch.int64)
    return torch.full((1,), int(value), dtype=torch.int64, device=device)


def _reference_generator(seed, offset, device) -> torch.Generator:
    """The reference path's stand-in for Philox(seed, offset): reproducible, not bit-identical."""
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else int(seed)
    offset = int(offset.item()) if isinstance(offset, torch.Tensor) else int(offset)
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % (2**63))
    return gen


def _view_per_frame(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(*v.shape, *([1] * (like.dim() - v.dim())))


def _per_frame(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return _view_per_frame(table[t], like)


def _frames_flat(x: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) -> contiguous (B*K, N) view (copies only non-contiguous inputs)."""
    return x.contiguous().view(x.shape[0] * x.shape[1], -1)


def _mask_u8(observed: torch.Tensor) -> torch.Tensor:
    return observed.contiguous().view(torch.uint8).reshape(-1)


# ----------------------------------------------------------------------------------------------------
# PyTorch references (float64-capable; the tests run them in float64)
# ----------------------------------------------------------------------------------------------------


def add_noise_reference(x0, t, observed, alpha, sigma, noise, prediction="eps"):
    """x_t = alpha[t] x0 + sigma[t] noise per frame; observed frames stay clean (x_t = x0).
    Target: eps -> noise, v -> alpha noise - sigma x0, x0 -> x0."""
    _check_prediction("add_noise", prediction)
    a, s = _per_frame(alpha, t, x0).to(x0.dtype), _per_frame(sigma, t, x0).to(x0.dtype)
    obs = _view_per_frame(observed, x0)
    x_t = torch.where(obs, x0, a * x0 + s * noise)
    if prediction == "eps":
        target = noise
    elif prediction == "v":
        target = a * noise - s * x0
    else:
        target = x0
    return x_t, target


def frame_mse_reference(pred, target, observed):
    """Each frame's mean_chw (pred - target)^2, (B, K), in at least fp32; 0 for observed frames (never read)."""
    acc = torch.promote_types(pred.dtype, torch.float32)
    per_frame = (pred.to(acc) - target.to(acc)).pow(2).flatten(2).mean(-1)
    return torch.where(observed, 0.0, per_frame)


def frame_mse_loss_reference(pred, target, weight, observed):
    """sum over non-observed frames of weight[b,k] * mean_chw (pred - target)^2, divided by their count."""
    return _weighted_frame_loss(frame_mse_reference(pred, target, observed), weight, observed)


def _weighted_frame_loss(per_frame, weight, observed):
    keep = (~observed).to(per_frame.dtype)
    return (per_frame * weight.to(per_frame.dtype)).sum() / keep.sum().clamp_min(1.0)


def ddim_step_reference(x_t, model_out, t, t_prev, alpha, sigma, noise=None, *, eta=0.0, prediction="eps"):
    """One DDIM step per frame (t_prev = -1: to clean). ``noise`` is needed when eta > 0."""
    _check_prediction("ddim_step", prediction)
    dt = torch.promote_types(x_t.dtype, torch.float32)
    x, m = x_t.to(dt), model_out.to(dt)
    a, s = _per_frame(alpha.to(dt), t, x), _per_frame(sigma.to(dt), t, x)
    clean = _view_per_frame(t_prev < 0, x)
    tp = t_prev.clamp_min(0)
    a_prev = torch.where(clean, 1.0, _per_frame(alpha.to(dt), tp, x))
    s_prev = torch.where(clean, 0.0, _per_frame(sigma.to(dt), tp, x))
    c = eta * s_prev / torch.where(s > 0, s, 1.0) * (1.0 - a * a / (a_prev * a_prev)).clamp_min(0).sqrt()
    c = torch.where(s > 0, c, 0.0)
    direction = (s_prev * s_prev - c * c).clamp_min(0).sqrt()
    if prediction == "eps":
        eps, x0 = m, (x - s * m) / a
    elif prediction == "v":
        x0, eps = a * x - s * m, s * x + a * m
    else:
        x0, eps = m, (x - a * m) / s
    y = a_prev * x0 + direction * eps
    if eta != 0.0:
        y = y + c * noise.to(dt)
    return y.to(x_t.dtype)


def churn_gamma(S_churn: float, num_steps: int | None) -> float:
    """Karras et al. 2022: gamma = min(S_churn / N, sqrt(2) - 1) (applied only inside [S_min, S_max])."""
    if S_churn == 0.0:
        return 0.0
    if S_churn < 0.0:
        raise ValueError(f"edm step: S_churn={S_churn} not supported because churn must be >= 0")
    if not num_steps or num_steps < 1:
        raise ValueError("edm step: S_churn > 0 needs num_steps (the N in gamma = min(S_churn / N, sqrt 2 - 1))")
    return min(S_churn / num_steps, math.sqrt(2.0) - 1.0)


def edm_churn_reference(x, sigma, noise, *, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, num_steps=None):
    """Churn x at per-frame sigma up to sigma_hat = sigma (1 + gamma): returns (x_hat, sigma_hat)."""
    gamma = churn_gamma(S_churn, num_steps)
    inside = (sigma >= S_min) & (sigma <= S_max) & (sigma > 0)
    sigma_hat = sigma * (1.0 + torch.where(inside, gamma, 0.0))
    amp = (sigma_hat * sigma_hat - sigma * sigma).clamp_min(0).sqrt() * S_noise
    dt = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dt) + _view_per_frame(amp, x).to(dt) * noise.to(dt)).to(x.dtype), sigma_hat


def edm_euler_step_reference(x, denoised, sigma, sigma_next):
    """x_next = x + (sigma_next - sigma) (x - denoised) / sigma, per frame (math in >= fp32)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    s, sn = _view_per_frame(sigma, x).to(dt), _view_per_frame(sigma_next, x).to(dt)
    coef = torch.where(sn != s, (sn - s) / s, 0.0)
    return (x.to(dt) + coef * (x.to(dt) - denoised.to(dt))).to(x.dtype)


def edm_heun_correct_reference(x, x_pred, denoised_next, sigma, sigma_next):
    """Heun corrector: x + (sigma_next - sigma)(d + d')/2 with d = (x - D(x))/sigma = (x_pred - x)/h and
    d' = (x_pred - D(x_pred, sigma_next))/sigma_next; frames with sigma_next = 0 keep x_pred (Euler)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    x, xp, den = x.to(dt), x_pred.to(dt), denoised_next.to(dt)
    s, sn = _view_per_frame(sigma, x).to(dt), _view_per_frame(sigma_next, x).to(dt)
    d2 = (xp - den) / torch.where(sn != 0, sn, 1.0)
    return torch.where(sn != 0, 0.5 * (x + xp) + 0.5 * (sn - s) * d2, xp).to(x_pred.dtype)


def edm_heun_step_reference(x, denoised, sigma, sigma_next, denoised_next_fn):
    """Full Heun step: Euler predictor, then the trapezoid correction where sigma_next > 0."""
    x_pred = edm_euler_step_reference(x, denoised, sigma, sigma_next)
    den2 = denoised_next_fn(x_pred)
    s, sn = _view_per_frame(sigma, x).to(x.dtype), _view_per_frame(sigma_next, x).to(x.dtype)
    d = (x - denoised) / s
    d2 = (x_pred - den2) / torch.where(sn != 0, sn, 1.0)
    return torch.where(sn != 0, x + (sn - s) * 0.5 * (d + d2), x_pred)


# ----------------------------------------------------------------------------------------------------
# Per-frame loss weights (PyTorch; tiny (B, K) tensors)
# ----------------------------------------------------------------------------------------------------


def uniform_weight(t: torch.Tensor) -> torch.Tensor:
    return torch.ones(t.shape, dtype=torch.float32, device=t.device)


def min_snr_weight(t, alpha, sigma, gamma=5.0, prediction="eps"):
    """Min-SNR-gamma (Hang et al. 2023) per frame, snr = alpha[t]^2 / sigma[t]^2:
    eps -> min(snr, gamma) / snr, v -> min(snr, gamma) / (snr + 1), x0 -> min(snr, gamma)."""
    _check_prediction("min_snr_weight", prediction)
    a, s = alpha[t].float(), sigma[t].float()
    snr = (a * a) / (s * s)  # inf where sigma = 0 (clean)
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        return torch.clamp(gamma / snr, max=1.0)  # = min(snr, gamma) / snr, also at snr = 0 and inf
    if prediction == "v":
        return clipped / (snr + 1.0)
    return clipped


def x0_error_weight(t, alpha, sigma, prediction="v"):
    """The weight per frame that makes the MSE of a `prediction` target equal the MSE of the x0 it implies:
    x0 -> 1, v -> sigma[t]^2 (x0 = alpha x_t - sigma v). A v model trained with it keeps v's skip through x_t at
    low noise but learns with x0's emphasis on the noisy levels. Not for eps: there the weight is sigma^2 /
    alpha^2, which reaches 1 / alpha[T-1]^2 (about 25,000 on the linear schedule) and swamps every other level."""
    _check_prediction("x0_error_weight", prediction)
    if prediction == "eps":
        raise ValueError("x0_error_weight: eps not supported because its x0 weight sigma^2 / alpha^2 is unbounded "
                         "at the top noise level; use v or x0")
    if prediction == "x0":
        return uniform_weight(t)
    s = sigma[t].float()
    return s * s


# ----------------------------------------------------------------------------------------------------
# Triton launchers, registered as torch.library.triton_op so torch.compile sees through them
# ----------------------------------------------------------------------------------------------------


@torch.library.triton_op("fastdiff::add_noise", mutates_args=())
def _add_noise_op(
    x0: torch.Tensor, t: torch.Tensor, observed: torch.Tensor,
    alpha: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor | None,
    seed: torch.Tensor | None, offset: torch.Tensor | None, pred: int, write_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    x = _frames_flat(x0)
    x_t = _empty(x.shape, x.dtype, x.device)
    target = _empty(x.shape, x.dtype, x.device) if write_target else x.new_empty(0)
    add_noise_launch(x0, t, observed, alpha, sigma, noise, seed, offset, pred, write_target, x_t, target)()
    return x_t.view(x0.shape), (target.view(x0.shape) if write_target else target)


def add_noise_launch(x0, t, observed, alpha, sigma, noise, seed, offset, pred: int, write_target: bool,
                     x_t, target) -> autotune.Launch:
    n = x0[0, 0].numel()
    x = _frames_flat(x0)
    args = (x, _frames_flat(noise) if noise is not None else x, t.contiguous(), _mask_u8(observed), alpha, sigma,
            seed if seed is not None else x, offset if offset is not None else x,
            x_t, target if write_target else x_t, n)
    return _streaming_launch("add_noise", _add_noise_kernel, x0, args,
                             NOISE=_NOISE_GIVEN if noise is not None else _NOISE_PHILOX, PRED=pred,
                             WRITE_TARGET=write_target)


def _add_noise_setup(ctx, inputs, output):
    x0, t, observed, alpha, sigma, noise, _, _, pred, write_target = inputs
    ctx.pred, ctx.write_target, ctx.has_noise = pred, write_target, noise is not None
    ctx.save_for_backward(t, observed, alpha, sigma)


def _add_noise_backward(ctx, grad_xt, grad_target):
    """d x_t / d x0 = a_eff, d x_t / d noise = s_eff (a_eff = 1, s_eff = 0 on observed frames);
    v target: d/d x0 = -s, d/d noise = a; eps target: d/d noise = 1; x0 target: d/d x0 = 1."""
    t, observed, alpha, sigma = ctx.saved_tensors
    a, s = alpha[t].float(), sigma[t].float()
    a_eff, s_eff = torch.where(observed, 1.0, a), torch.where(observed, 0.0, s)
    g = grad_xt.float()
    gt = grad_target.float() if (ctx.write_target and grad_target is not None and grad_target.numel()) else None
    dx0 = _view_per_frame(a_eff, g) * g
    dnoise = _view_per_frame(s_eff, g) * g if ctx.has_noise else None
    if gt is not None:
        if ctx.pred == 1:
            dx0 = dx0 - _view_per_frame(s, g) * gt
            if dnoise is not None:
                dnoise = dnoise + _view_per_frame(a, g) * gt
        elif ctx.pred == 2:
            dx0 = dx0 + gt
        elif dnoise is not None:
            dnoise = dnoise + gt
    dx0 = dx0.to(grad_xt.dtype)
    dnoise = dnoise.to(grad_xt.dtype) if dnoise is not None else None
    return dx0, None, None, None, None, dnoise, None, None, None, None


torch.library.register_autograd("fastdiff::add_noise", _add_noise_backward, setup_context=_add_noise_setup)


@torch.library.triton_op("fastdiff::frame_mse_loss", mutates_args=())
def _frame_mse_loss_op(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, observed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, per-frame mean squared error (B*K,), count of non-observed frames), fp32."""
    frames, n = pred.shape[0] * pred.shape[1], pred[0, 0].numel()
    partial = _empty(_grid(frames, n, block_for(n)), torch.float32, pred.device)
    frame_mse = _empty(frames, torch.float32, pred.device)
    loss = _empty((), torch.float32, pred.device)
    count = _empty((), torch.float32, pred.device)
    sqerr, finalize = frame_mse_loss_launches(pred, target, weight, observed, partial, frame_mse, loss, count)
    sqerr()
    finalize()
    return loss, frame_mse, count


def frame_mse_loss_launches(pred, target, weight, observed, partial, frame_mse, loss, count):
    """(stage 1, stage 2) launches of the loss; ``partial`` is (frames, chunks) fp32, chunks of BLOCK."""
    frames, n = pred.shape[0] * pred.shape[1], pred[0, 0].numel()
    sqerr = _streaming_launch("frame_sqerr", _frame_sqerr_kernel, pred,
                              (_frames_flat(pred), _frames_flat(target), _mask_u8(observed), partial, n))
    chunks = sqerr.grid[1]
    finalize = autotune.Launch(
        _frame_loss_finalize_kernel, (1,),
        (partial, weight.contiguous().reshape(-1), _mask_u8(observed), frame_mse, loss, count, frames, n, chunks),
        dict(BLOCK_F=64, BLOCK_C=min(triton.next_power_of_2(chunks), 64)),
    )
    return sqerr, finalize


@torch.library.triton_op("fastdiff::frame_mse_loss_backward", mutates_args=())
def _frame_mse_loss_backward_op(
    grad: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, observed: torch.Tensor,
    count: torch.Tensor, need_dtarget: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    dpred = _empty(pred.shape, pred.dtype, pred.device)
    dtarget = _empty(target.shape, target.dtype, pred.device) if need_dtarget else pred.new_empty(0)
    frame_mse_loss_backward_launch(grad, pred, target, weight, observed, count, need_dtarget, dpred, dtarget)()
    return dpred, dtarget


def frame_mse_loss_backward_launch(grad, pred, target, weight, observed, count, need_dtarget: bool, dpred,
                                   dtarget) -> autotune.Launch:
    n = pred[0, 0].numel()
    args = (grad.contiguous(), _frames_flat(pred), _frames_flat(target), weight.contiguous().reshape(-1),
            _mask_u8(observed), count, dpred, dtarget if need_dtarget else dpred, n)
    return _streaming_launch("frame_loss_backward", _frame_loss_backward_kernel, pred, args, WRITE_DTARGET=need_dtarget)


def _loss_setup(ctx, inputs, output):
    pred, target, weight, observed = inputs
    _, frame_mse, count = output
    ctx.needs = (pred.requires_grad, target.requires_grad, weight.requires_grad)
    ctx.save_for_backward(pred, target, weight, observed, frame_mse, count)


def _loss_backward(ctx, grad_loss, _grad_frame_mse, _grad_count):
    pred, target, weight, observed, frame_mse, count = ctx.saved_tensors
    dpred = dtarget = dweight = None
    if ctx.needs[0] or ctx.needs[1]:
        dpred, dtarget = torch.ops.fastdiff.frame_mse_loss_backward(
            grad_loss, pred, target, weight, observed, count, ctx.needs[1]
        )
        dtarget = dtarget if ctx.needs[1] else None
        dpred = dpred if ctx.needs[0] else None
    if ctx.needs[2]:  # dL/dw[b,k] = g keep mse[b,k] / max(count, 1)
        keep = (~observed).float()
        dweight = (grad_loss * keep * frame_mse.view(keep.shape) / count.clamp_min(1.0)).to(weight.dtype)
    return dpred, dtarget, dweight, None


torch.library.register_autograd("fastdiff::frame_mse_loss", _loss_backward, setup_context=_loss_setup)


@torch.library.triton_op("fastdiff::ddim_step", mutates_args=())
def _ddim_step_op(
    x_t: torch.Tensor, model_out: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, alpha: torch.Tensor,
    sigma: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None, offset: torch.Tensor | None,
    eta: float, pred: int,
) -> torch.Tensor:
    x = _frames_flat(x_t)
    y = _empty(x.shape, x.dtype, x.device)
    ddim_step_launch(x_t, model_out, t, t_prev, alpha, sigma, noise, seed, offset, eta, pred, y)()
    return y.view(x_t.shape)


def ddim_step_launch(x_t, model_out, t, t_prev, alpha, sigma, noise, seed, offset, eta: float, pred: int,
                     y) -> autotune.Launch:
    n = x_t[0, 0].numel()
    x = _frames_flat(x_t)
    mode = _NOISE_NONE if eta == 0.0 else (_NOISE_GIVEN if noise is not None else _NOISE_PHILOX)
    args = (x, _frames_flat(model_out), t.contiguous(), t_prev.contiguous(), alpha, sigma,
            _frames_flat(noise) if noise is not None else x, seed if seed is not None else x,
            offset if offset is not None else x, eta, y, n)
    return _streaming_launch("ddim_step", _ddim_step_kernel, x_t, args, PRED=pred, NOISE=mode)


@torch.library.triton_op("fastdiff::edm_step", mutates_args=())
def _edm_step_op(
    x: torch.Tensor, denoised: torch.Tensor, x_pred: torch.Tensor | None, sigma: torch.Tensor,
    sigma_next: torch.Tensor, noise: torch.Tensor | None, seed: torch.Tensor | None, offset: torch.Tensor | None,
    churn_gamma: float, s_min: float, s_max: float, s_noise: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler step (x_pred None) or Heun correction (x_pred given), then churn toward the next level."""
    frames = x.shape[0] * x.shape[1]
    xf = _frames_flat(x)
    y = _empty(xf.shape, xf.dtype, xf.device)
    sigma_hat = _empty(frames, torch.float32, x.device)
    edm_step_launch(x, denoised, x_pred, sigma, sigma_next, noise, seed, offset, churn_gamma, s_min, s_max, s_noise,
                    y, sigma_hat)()
    return y.view(x.shape), sigma_hat.view(sigma.shape)


def edm_step_launch(x, denoised, x_pred, sigma, sigma_next, noise, seed, offset, churn_gamma: float, s_min: float,
                    s_max: float, s_noise: float, y, sigma_hat) -> autotune.Launch:
    n = x[0, 0].numel()
    xf = _frames_flat(x)
    churn = churn_gamma > 0.0
    mode = _NOISE_NONE if not churn else (_NOISE_GIVEN if noise is not None else _NOISE_PHILOX)
    args = (xf, _frames_flat(denoised), _frames_flat(x_pred) if x_pred is not None else xf,
            sigma.contiguous(), sigma_next.contiguous(), _frames_flat(noise) if noise is not None else xf,
            seed if seed is not None else xf, offset if offset is not None else xf,
            churn_gamma, s_min, s_max, s_noise, y, sigma_hat, n)
    return _streaming_launch("edm_step", _edm_step_kernel, x, args, CORRECT=x_pred is not None, CHURN=churn, NOISE=mode)


# ----------------------------------------------------------------------------------------------------
# Public API (dispatching)
# ----------------------------------------------------------------------------------------------------


def _use_triton(op: str, x: torch.Tensor) -> bool:
    return dispatch.resolve(f"noise_schedule.{op}", x) == "triton"


def _reference_noise(x, noise, generator, seed, offset):
    if noise is not None:
        return noise
    if seed is not None:
        generator = _reference_generator(seed, offset, x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _kernel_rng(x, noise, generator, seed, offset):
    """(noise, seed, offset) for a kernel: given noise passes through; otherwise Philox, seeded from
    ``seed`` or, failing that, from torch's generator on the device (no host sync)."""
    if noise is not None:
        return noise.to(x.dtype), None, None
    if seed is None:
        seed = torch.randint(0, 2**62, (1,), device=x.device, generator=generator)
        offset = 0
    return None, _seed_tensor(seed, x.device), _seed_tensor(offset, x.device)


def add_noise(
    x0, t, observed, alpha, sigma, *, noise=None, generator=None, prediction="eps", seed=None, offset=0
):
    """Noise a (B, K, C, H, W) clip per frame from discrete timesteps t (B, K) int64 (indices into the
    1-D tables alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar)); observed (B, K) bool frames stay
    clean. Returns (x_t, target) for ``prediction`` eps | v | x0.

    Noise: ``noise`` if given, else Philox in the kernel from ``seed``/``offset`` (ints or int64 device
    tensors; see :func:`philox_counters`), else Philox seeded from ``generator`` (torch's default when
    None). With in-kernel noise and prediction eps the kernel writes the noise as the target.
    """
    _check_clip("add_noise", x0, {"t": t, "observed": observed})
    _check_same("add_noise", x0, noise=noise)
    _check_prediction("add_noise", prediction)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"add_noise: t dtype {t.dtype} not supported because t indexes the tables (int64)")
    if not _use_triton("add_noise", x0):
        return add_noise_reference(x0, t, observed, alpha, sigma, _reference_noise(x0, noise, generator, seed, offset), prediction)
    kernel_noise, seed_t, offset_t = _kernel_rng(x0, noise, generator, seed, offset)
    reuse = prediction == "x0" or (prediction == "eps" and kernel_noise is not None)
    x_t, target = torch.ops.fastdiff.add_noise(
        x0, t, observed, alpha, sigma, kernel_noise, seed_t, offset_t, _PRED_CODE[prediction], not reuse
    )
    if reuse:
        target = x0 if prediction == "x0" else kernel_noise
    return x_t, target


def frame_mse_loss(pred, target, weight, observed, *, per_frame: bool = False):
    """Weighted per-frame MSE over non-observed frames (see module docstring); 0 when every frame is
    observed. ``weight`` (B, K) or None for uniform. Returns an fp32 scalar; differentiable in pred,
    target and weight. With ``per_frame``, returns (loss, each frame's unweighted MSE (B, K) fp32, detached, 0 for
    observed frames): the kernel's stage 2 computes it anyway, so asking costs no extra pass."""
    _check_clip("frame_mse_loss", pred, {"weight": weight, "observed": observed})
    _check_same("frame_mse_loss", pred, target=target)
    if weight is None:
        weight = torch.ones(pred.shape[:2], dtype=torch.float32, device=pred.device)
    if not _use_triton("frame_mse_loss", pred):
        frames = frame_mse_reference(pred, target, observed)
        loss = _weighted_frame_loss(frames, weight, observed)
    else:
        loss, frames, _ = torch.ops.fastdiff.frame_mse_loss(pred, target, weight, observed)
    return (loss, frames.detach().float().view(pred.shape[:2])) if per_frame else loss


def ddim_step(
    x_t, model_out, t, t_prev, alpha, sigma, *, eta=0.0, noise=None, seed=None, offset=0, generator=None,
    prediction="eps",
):
    """One DDIM step per frame, every frame at its own level (one FIFO-queue step = one launch).
    t, t_prev (B, K) int64; t_prev = -1 means "to clean". eta > 0 adds c z (noise as in add_noise)."""
    _check_clip("ddim_step", x_t, {"t": t, "t_prev": t_prev})
    _check_same("ddim_step", x_t, model_out=model_out, noise=noise)
    _check_prediction("ddim_step", prediction)
    eta = float(eta)
    if not _use_triton("ddim_step", x_t):
        z = _reference_noise(x_t, noise, generator, seed, offset) if eta != 0.0 else None
        return ddim_step_reference(x_t, model_out, t, t_prev, alpha, sigma, z, eta=eta, prediction=prediction)
    kernel_noise, seed_t, offset_t = (None, None, None) if eta == 0.0 else _kernel_rng(x_t, noise, generator, seed, offset)
    return torch.ops.fastdiff.ddim_step(
        x_t, model_out, t, t_prev, alpha, sigma, kernel_noise, seed_t, offset_t, eta, _PRED_CODE[prediction]
    )


def _edm(op, x, denoised, x_pred, sigma, sigma_next, S_churn, S_min, S_max, S_noise, num_steps, noise, seed, offset, generator):
    _check_clip(op, x, {"sigma": sigma, "sigma_next": sigma_next})
    _check_same(op, x, denoised=denoised, x_pred=x_pred, noise=noise)
    gamma = churn_gamma(float(S_churn), num_steps)
    churn = dict(S_churn=float(S_churn), S_min=float(S_min), S_max=float(S_max), S_noise=float(S_noise), num_steps=num_steps)
    if not _use_triton(op, x):
        if x_pred is None:
            y = edm_euler_step_reference(x, denoised, sigma, sigma_next)
        else:
            y = edm_heun_correct_reference(x, x_pred, denoised, sigma, sigma_next)
        if gamma == 0.0:
            return y, sigma_next
        z = _reference_noise(x, noise, generator, seed, offset)
        return edm_churn_reference(y, sigma_next, z, **churn)
    kernel_noise, seed_t, offset_t = (None, None, None) if gamma == 0.0 else _kernel_rng(x, noise, generator, seed, offset)
    y, sigma_hat = torch.ops.fastdiff.edm_step(
        x, denoised, x_pred, sigma, sigma_next, kernel_noise, seed_t, offset_t, gamma, churn["S_min"], churn["S_max"],
        churn["S_noise"],
    )
    return y, (sigma_hat.to(sigma_next.dtype) if gamma > 0.0 else sigma_next)


def edm_euler_step(
    x, denoised, sigma, sigma_next, *, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, num_steps=None,
    noise=None, seed=None, offset=0, generator=None,
):
    """EDM Euler step per frame: x_next = x + (sigma_next - sigma)(x - denoised)/sigma, where
    denoised = D(x; sigma) and sigma, sigma_next are (B, K).

    Churn (Karras et al. 2022, Alg. 2) is fused at the end of the step, for the *next* evaluation:
    gamma = min(S_churn / num_steps, sqrt 2 - 1) on frames with S_min <= sigma_next <= S_max (and
    sigma_next > 0), sigma_hat = sigma_next (1 + gamma), x_next += sqrt(sigma_hat^2 - sigma_next^2)
    S_noise z. Returns (x_next, sigma_hat): evaluate the denoiser next at sigma_hat (sigma_hat is
    sigma_next itself when churn is off). For churn before the very first evaluation use
    :func:`edm_churn`."""
    return _edm("edm_euler_step", x, denoised, None, sigma, sigma_next, S_churn, S_min, S_max, S_noise, num_steps,
                noise, seed, offset, generator)


def edm_heun_step(
    x, denoised, sigma, sigma_next, *, x_pred=None, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0,
    num_steps=None, noise=None, seed=None, offset=0, generator=None,
):
    """EDM Heun step per frame, in two calls (the model runs between them)::

        x_pred, _ = edm_heun_step(x, D(x, sigma), sigma, sigma_next)                    # 1: Euler predictor
        x_next, sigma_hat = edm_heun_step(x, D(x_pred, sigma_next), sigma, sigma_next,  # 2: corrector
                                          x_pred=x_pred, S_churn=..., num_steps=...)

    Call 2 computes x + (sigma_next - sigma)(d + d')/2 = (x + x_pred)/2 + (sigma_next - sigma)/2 d'
    with d' = (x_pred - D(x_pred))/sigma_next (three reads, one write); frames whose sigma_next is 0
    keep the Euler result x_pred (Karras Alg. 2 skips the correction at the last step). Churn, if
    any, belongs to call 2 and is fused as in :func:`edm_euler_step`. Both calls return (x, sigma)."""
    if x_pred is None and S_churn != 0.0:
        raise ValueError("edm_heun_step: churn not supported on the predictor call; pass it to the corrector (x_pred=...)")
    return _edm("edm_heun_step", x, denoised, x_pred, sigma, sigma_next, S_churn, S_min, S_max, S_noise, num_steps,
                noise, seed, offset, generator)


def edm_churn(x, sigma, *, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, num_steps=None, noise=None,
              seed=None, offset=0, generator=None):
    """Churn alone (before the first denoiser evaluation): returns (x_hat, sigma_hat). Runs the step
    kernel with denoised = x and sigma_next = sigma, so the step part is exactly the identity."""
    return edm_euler_step(x, x, sigma, sigma, S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise,
                          num_steps=num_steps, noise=noise, seed=seed, offset=offset, generator=generator)
