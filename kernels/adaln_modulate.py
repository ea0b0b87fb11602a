"""Fused LayerNorm (no affine) + adaLN modulation, per frame: the DiT block's norm-then-modulate.

For tokens x (B, K, S, D) and one modulation vector per frame, shift and scale (B, K, 1, D)
(broadcast over the S tokens of the frame), with every row r = (b, k, s) normalised over D:

    mean[r] = sum_d x[r, d] / D
    rstd[r] = 1 / sqrt(sum_d (x[r, d] - mean[r])^2 / D + eps)              (biased variance, eps 1e-6)
    x_hat   = (x - mean) rstd
    y       = x_hat (1 + scale[b, k]) + shift[b, k]

Backward, with the per-row effective weight w = 1 + scale[b, k] and g = dy w:

    dx          = rstd (g - mean_d(g) - x_hat mean_d(g x_hat))               (LayerNorm backward)
    dshift[b,k] = sum_s dy[b, k, s]
    dscale[b,k] = sum_s dy[b, k, s] x_hat[b, k, s]

Forward: one grid axis of (frame, tile) pairs, B*K frames times tiles of BLOCK_S rows (one axis, since
S / BLOCK_S passes the 65,535 limit of axes y/z at S > 65,535 with BLOCK_S = 1); a program loads
its frame's shift and scale once, normalises its [BLOCK_S, D] tile in fp32 (fp64 for fp64 inputs;
two-pass variance on the tile in registers), writes y and saves mean and rstd (fp32) per row.
Backward: one grid axis of (frame, split of S) pairs, ROWS = BLOCK_S * TILES rows per program (TILES
from the tuned config, or chosen so that the grid holds about two programs per SM); the program walks
its rows in BLOCK_S tiles, writes dx and accumulates fp32 partial sums of dy and dy x_hat in
registers, then stores one partial per (frame, split); the splits are summed in a fixed order
afterwards (deterministic, no atomics; one split needs no sum). x, shift, scale and dy may have any strides (views of a fused ada
projection, stride-0 expanded gradients); y and dx come out contiguous. shift and scale may have a
different float dtype from x (bf16 modulations on an fp32 residual stream under autocast); y has
x's dtype, dshift/dscale their inputs' dtypes.

Dispatch (kernels.dispatch): Triton on CUDA, the PyTorch reference on CPU, 'triton' on CPU under
TRITON_INTERPRET=1. The Triton path is a torch.library triton_op (``fastdiff::adaln_modulate_fwd`` /
``_bwd``, fake implementations derived by triton_op) with autograd, so torch.compile traces it
without graph breaks; the reference is plain PyTorch, so compile traces that on CPU. Launch configs
come from profiles/<gpu>/adaln_modulate.json (:func:`tune`) or from :func:`default_config`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastdiff_kernels import autotune, dispatch

OP_NAME = "adaln_modulate"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_D = 8192  # one row must fit one program's register tile
DEFAULT_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------


def adaln_modulate_reference(x, shift, scale, eps: float = DEFAULT_EPS):
    """layer_norm(x over D, no affine) * (1 + scale) + shift, math in fp32 (fp64 for fp64 x), result in
    x's dtype. For fp32 tensors this is exactly the unfused ``modulate(LayerNorm(x), shift, scale)``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x_hat = F.layer_norm(x.to(acc), (x.shape[-1],), eps=eps)
    return (x_hat * (1 + scale.to(acc)) + shift.to(acc)).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _adaln_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr,
    K, S, D, TILES_S, eps,
    sxb, sxk, sxs, sxd, shb, shk, shd, scb, sck, scd,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    eps = tl.cast(eps, ACC)  # Inductor may pass the Python float as fp64: keep fp32 math in fp32
    # One grid axis, (frame, tile) flattened: S / BLOCK_S tiles may exceed axis y's 65,535 limit.
    pid = tl.program_id(0).to(tl.int64)
    frame = pid // TILES_S
    b = frame // K
    k = frame % K
    rows = (pid % TILES_S) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < S
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + b * sxb + k * sxk + rows[:, None] * sxs + cols[None, :] * sxd, mask=mask, other=0.0)
    x = x.to(ACC)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    shift = tl.load(shift_ptr + b * shb + k * shk + cols * shd, mask=cmask, other=0.0).to(ACC)
    w = 1.0 + tl.load(scale_ptr + b * scb + k * sck + cols * scd, mask=cmask, other=0.0).to(ACC)
    y = xc * rstd[:, None] * w[None, :] + shift[None, :]
    out_rows = frame * S + rows
    tl.store(y_ptr + out_rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + out_rows, mean.to(mean_ptr.dtype.element_ty), mask=rmask)
    tl.store(rstd_ptr + out_rows, rstd.to(rstd_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _adaln_bwd_kernel(
    x_ptr, dy_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_ptr, dscale_ptr,
    K, S, D, ROWS, SPLITS,
    sxb, sxk, sxs, sxd, syb, syk, sys, syd, scb, sck, scd,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One grid axis, (frame, split) flattened: the split count may exceed axis y's 65,535 limit.
    pid = tl.program_id(0).to(tl.int64)
    frame = pid // SPLITS
    split = pid % SPLITS
    b = frame // K
    k = frame % K
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = 1.0 + tl.load(scale_ptr + b * scb + k * sck + cols * scd, mask=cmask, other=0.0).to(ACC)
    acc_shift = tl.zeros((BLOCK_D,), dtype=ACC)
    acc_scale = tl.zeros((BLOCK_D,), dtype=ACC)
    start = split * ROWS
    end = tl.minimum(start + ROWS, S)
    for r0 in range(start, end, BLOCK_S):
        rows = r0 + tl.arange(0, BLOCK_S).to(tl.int64)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + b * sxb + k * sxk + rows[:, None] * sxs + cols[None, :] * sxd, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + b * syb + k * syk + rows[:, None] * sys + cols[None, :] * syd, mask=mask, other=0.0)
        x = x.to(ACC)
        dy = dy.to(ACC)
        out_rows = frame * S + rows
        mean = tl.load(mean_ptr + out_rows, mask=rmask, other=0.0).to(ACC)
        rstd = tl.load(rstd_ptr + out_rows, mask=rmask, other=0.0).to(ACC)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        acc_shift += tl.sum(dy, axis=0)
        acc_scale += tl.sum(dy * x_hat, axis=0)
        g = dy * w[None, :]
        c_hat = tl.sum(g * x_hat, axis=1) / D
        c_one = tl.sum(g, axis=1) / D
        dx = (g - c_one[:, None] - x_hat * c_hat[:, None]) * rstd[:, None]
        tl.store(dx_ptr + out_rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = pid * D + cols  # partial (frame, split) of the (B, K, SPLITS, D) buffers
    tl.store(dshift_ptr + part, acc_shift, mask=cmask)
    tl.store(dscale_ptr + part, acc_scale, mask=cmask)


# --------------------------------------------------------------------------------------------------
# Launch configs (tuned per GPU through kernels.autotune, else heuristics)
# --------------------------------------------------------------------------------------------------


def block_d_for(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def config_key(kind: str, block_d: int, dtype: torch.dtype) -> str:
    return f"{kind}|BLOCK_D={block_d}|dtype={str(dtype).removeprefix('torch.')}"


def default_config(kind: str, block_d: int, dtype: torch.dtype) -> dict:
    """Heuristic: a forward tile of about 4096 elements (2048 in the backward, which holds x, dy and g),
    halved for 8-byte types; 4 warps, 8 from 2048-wide rows. Backward TILES = 0 means "as many tiles
    per program as leave about two programs per SM" (:func:`_backward_rows`)."""
    elems = 4096 if kind == "fwd" else 2048
    if dtype == torch.float64:
        elems //= 2
    cfg = {"BLOCK_S": max(1, elems // block_d), "num_warps": 8 if block_d >= 2048 else 4}
    if kind == "bwd":
        cfg["TILES"] = 0
    return cfg


def config_fields(kind: str) -> tuple[str, ...]:
    return ("BLOCK_S", "num_warps") + (("TILES",) if kind == "bwd" else ())


# Elements (BLOCK_S * BLOCK_D) a program's tile may hold in a tuning sweep: beyond this the tile spills.
MAX_TILE_ELEMS = 16384


def arch_default(kind: str, block_d: int, dtype: torch.dtype, arch: int | None) -> dict:
    """The default for a GPU arch (sm_86 -> 86; None: unknown): the AOT table's replacement for this
    Triton version where the heuristic spills or does not fit there, else :func:`default_config`."""
    return autotune.aot_default(OP_NAME, config_key(kind, block_d, dtype), arch) or default_config(kind, block_d, dtype)


def tune_candidates(kind: str, block_d: int, dtype: torch.dtype, arch: int | None = None) -> list[dict]:
    """Configs a tuning sweep tries: BLOCK_S x num_warps (x TILES for the backward) within the tile
    budget, less those the AOT sweep found failing or not fitting ``arch`` (None: all)."""
    axes = dict(BLOCK_S=[1, 2, 4, 8, 16, 32], num_warps=[2, 4, 8])
    if kind == "bwd":
        axes["TILES"] = [0, 1, 2, 4, 8, 16]
    configs = [cfg for cfg in autotune.grid(**axes) if cfg["BLOCK_S"] * block_d <= MAX_TILE_ELEMS]
    return autotune.aot_allowed(OP_NAME, config_key(kind, block_d, dtype), configs, arch, config_fields(kind))


def select_config(kind: str, block_d: int, dtype: torch.dtype, device) -> tuple[dict, str]:
    """(config, source): the tuned config for this GPU if profiles/ has one, else the arch's default."""
    tuned = autotune.lookup(OP_NAME, config_key(kind, block_d, dtype), device)
    if tuned is not None:
        return {name: int(tuned[name]) for name in config_fields(kind)}, "tuned"
    return arch_default(kind, block_d, dtype, autotune.device_arch(torch.device(device))), "default"


def _rows_per_tile(cfg: dict, s: int) -> int:
    return max(1, min(cfg["BLOCK_S"], triton.next_power_of_2(s)))  # tiny S: no masked-off rows


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Backward programs worth launching: two per SM on a GPU; on CPU (interpreter) a few, so that the
    split reduction runs by default there too."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index or 0)
    return 4


def _backward_rows(cfg: dict, block_s: int, frames: int, s: int, programs: int) -> int:
    """Rows per backward program, a multiple of block_s: TILES tiles if the config says so, else
    enough splits of S to reach ``programs`` in all (few splits: few fp32 partials to sum)."""
    if cfg["TILES"] > 0:
        return block_s * cfg["TILES"]
    splits = min(triton.cdiv(programs, frames), triton.cdiv(s, block_s))
    return triton.cdiv(triton.cdiv(s, max(1, splits)), block_s) * block_s


def backward_splits(cfg: dict, frames: int, s: int, programs: int) -> int:
    """Splits of S in the backward (programs per frame): the second dim of the dshift/dscale partials."""
    rows = _backward_rows(cfg, _rows_per_tile(cfg, s), frames, s, programs)
    return triton.cdiv(s, rows)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Output allocator; tests swap in a NaN-filled one so that any element a kernel fails to write shows up.
_empty = torch.empty


def _frame_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(b, k, d) strides of a (B, K, 1, D) per-frame vector (its S stride is never used)."""
    return t.stride(0), t.stride(1), t.stride(3)


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.library.triton_op) with autograd
# --------------------------------------------------------------------------------------------------


def fwd_launch(x, shift, scale, y, mean, rstd, eps: float, cfg: dict) -> autotune.Launch:
    """The forward kernel's launch for a config: one program per tile of BLOCK_S rows of a frame."""
    b, k, s, d = x.shape
    block_s = _rows_per_tile(cfg, s)
    tiles = triton.cdiv(s, block_s)
    args = (x, shift, scale, y, mean, rstd, k, s, d, tiles, eps,
            *x.stride(), *_frame_strides(shift), *_frame_strides(scale))
    constexprs = dict(ACC=_acc_dtype(x.dtype), BLOCK_S=block_s, BLOCK_D=block_d_for(d))
    return autotune.Launch(_adaln_fwd_kernel, (b * k * tiles,), args, constexprs, cfg["num_warps"])


def bwd_launch(dy, x, scale, mean, rstd, dx, dshift_part, dscale_part, cfg: dict, programs: int) -> autotune.Launch:
    """The backward kernel's launch for a config; the partials are (B, K, backward_splits(...), D)."""
    b, k, s, d = x.shape
    block_s = _rows_per_tile(cfg, s)
    rows = _backward_rows(cfg, block_s, b * k, s, programs)
    splits = triton.cdiv(s, rows)
    args = (x, dy, scale, mean, rstd, dx, dshift_part, dscale_part, k, s, d, rows, splits,
            *x.stride(), *dy.stride(), *_frame_strides(scale))
    constexprs = dict(ACC=_acc_dtype(x.dtype), BLOCK_S=block_s, BLOCK_D=block_d_for(d))
    return autotune.Launch(_adaln_bwd_kernel, (b * k * splits,), args, constexprs, cfg["num_warps"])


@torch.library.triton_op("fastdiff::adaln_modulate_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y (B, K, S, D) in x's dtype, mean (B*K*S,), rstd (B*K*S,)) with fp32 statistics."""
    b, k, s, d = x.shape
    cfg, _ = select_config("fwd", block_d_for(d), x.dtype, x.device)
    y = _empty((b, k, s, d), dtype=x.dtype, device=x.device)
    mean = _empty((b * k * s,), dtype=stats_dtype(x.dtype), device=x.device)
    rstd = _empty((b * k * s,), dtype=stats_dtype(x.dtype), device=x.device)
    fwd_launch(x, shift, scale, y, mean, rstd, eps, cfg)()
    return y, mean, rstd


@torch.library.triton_op("fastdiff::adaln_modulate_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx in x's dtype, dshift, dscale as fp32 (B, K, 1, D) sums over S)."""
    b, k, s, d = x.shape
    cfg, _ = select_config("bwd", block_d_for(d), x.dtype, x.device)
    programs = target_programs(x.device)
    splits = backward_splits(cfg, b * k, s, programs)
    acc = stats_dtype(x.dtype)
    dx = _empty((b, k, s, d), dtype=x.dtype, device=x.device)
    dshift_part = _empty((b, k, splits, d), dtype=acc, device=x.device)
    dscale_part = _empty((b, k, splits, d), dtype=acc, device=x.device)
    bwd_launch(dy, x, scale, mean, rstd, dx, dshift_part, dscale_part, cfg, programs)()
    if splits == 1:
        return dx, dshift_part, dscale_part
    return dx, dshift_part.sum(dim=2, keepdim=True), dscale_part.sum(dim=2, keepdim=True)


def _fwd_fake(x, shift, scale, eps):
    n = x.shape[0] * x.shape[1] * x.shape[2]
    stats = stats_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty((n,), dtype=stats), x.new_empty((n,), dtype=stats)


def _bwd_fake(dy, x, scale, mean, rstd):
    b, k, _, d = x.shape
    stats = stats_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty((b, k, 1, d), dtype=stats), x.new_empty((b, k, 1, d), dtype=stats)


if dispatch.interpreter_active():
    # triton_op derives its fake implementation from the launcher, which works where wrap_triton sees a
    # compiled kernel (GPU). Under TRITON_INTERPRET=1 the launcher would run the kernel on fake tensors,
    # so state the shapes instead: Dynamo then traces the op on CPU (aot/Inductor still cannot, since
    # they decompose the launcher itself).
    _fwd_op.register_fake(_fwd_fake)
    _bwd_op.register_fake(_bwd_fake)


def _setup_context(ctx, inputs, output):
    x, shift, scale, _eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_dtype = shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = _bwd_op(dy, x, scale, mean, rstd)
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        dshift.to(ctx.shift_dtype) if needs[1] else None,
        dscale.to(scale.dtype) if needs[2] else None,
        None,
    )


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def adaln_modulate_triton(x, shift, scale, eps: float = DEFAULT_EPS):
    return _fwd_op(x, shift, scale, float(eps))[0]


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _unsupported(why: str):
    return ValueError(f"{OP_NAME}: not supported because {why}")


def check_inputs(x, shift, scale, eps) -> None:
    """Raise a clear error for anything outside the op's contract (every backend enforces it)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise _unsupported(f"x must be a 4-D tensor (B, K, S, D) of tokens, got {getattr(x, 'shape', type(x))}")
    b, k, s, d = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, k, 1, d):
            raise _unsupported(f"{name} must be one modulation vector per frame, shape (B, K, 1, D) = "
                               f"{(b, k, 1, d)}, got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise _unsupported(f"{name} dtype {t.dtype} is not a float type the kernel loads (fp32, bf16, fp16, fp64)")
        if t.device != x.device:
            raise _unsupported(f"{name} is on {t.device}, x on {x.device}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise _unsupported(f"x dtype {x.dtype} is not one of fp32, bf16, fp16, fp64")
    if d > MAX_D:
        raise _unsupported(f"D={d} > {MAX_D}: a row must fit one program's register tile")
    if x.numel() == 0:
        raise _unsupported(f"x is empty (shape {tuple(x.shape)})")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise _unsupported(f"eps must be a positive Python number, got {eps!r}")


def adaln_modulate(x, shift, scale, eps: float = DEFAULT_EPS):
    """``LayerNorm(x) * (1 + scale) + shift`` in one pass (formula in the module docstring).

    x: (B, K, S, D) tokens, fp32 / bf16 / fp16 / fp64, any strides. shift, scale: (B, K, 1, D), one
    vector per frame broadcast over the S tokens, any float dtype and strides (chunks of an ada
    projection work as they are). Returns y (B, K, S, D) in x's dtype; differentiable in all three.
    """
    check_inputs(x, shift, scale, eps)
    if dispatch.resolve(OP_NAME, x) == "triton":
        return adaln_modulate_triton(x, shift, scale, eps)
    return adaln_modulate_reference(x, shift, scale, eps)


# --------------------------------------------------------------------------------------------------
# Tuning sweep (run by `fastdiff tune` on a GPU)
# --------------------------------------------------------------------------------------------------


def tune(device=None, *, widths=(256, 384, 512, 1024), dtypes=(torch.bfloat16, torch.float16, torch.float32),
         frames: int = 64, tokens: int = 256, log=print, **_ignored) -> dict:
    """Sweep BLOCK_S x num_warps (x TILES for the backward) for each (fwd|bwd, BLOCK_D, dtype) key on a
    CUDA device at (frames, tokens) = (B*K, S) and return {key: best config with its time};
    :func:`kernels.autotune.save` persists it. Options other commands pass (e.g. ``frames`` tuples for
    attention) that do not apply here are ignored."""
    device = torch.device(device or "cuda")
    frames = frames if isinstance(frames, int) else 64
    arch = autotune.device_arch(device)
    results = {}
    for d in widths:
        block_d = block_d_for(d)
        for dtype in dtypes:
            x = torch.randn(frames, 1, tokens, d, device=device, dtype=dtype)
            mods = torch.randn(frames, 1, 1, 2 * d, device=device, dtype=dtype) * 0.1
            shift, scale = mods.chunk(2, dim=-1)
            y, mean, rstd = _fwd_op(x, shift, scale, DEFAULT_EPS)
            dy = torch.randn_like(y)
            calls = {"fwd": functools.partial(_fwd_op, x, shift, scale, DEFAULT_EPS),
                     "bwd": functools.partial(_bwd_op, dy, x, scale, mean, rstd)}
            for kind, call in calls.items():
                key = config_key(kind, block_d, dtype)
                best = autotune.sweep(OP_NAME, key, tune_candidates(kind, block_d, dtype, arch), call,
                                      arch_default(kind, block_d, dtype, arch), log)
                if best is not None:
                    best["shape"] = [frames, tokens, d]
                    results[key] = best
                    log(f"{key}: {best}")
    return results
