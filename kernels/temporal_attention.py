"""Fused temporal attention: many short sequences (T <= 64) packed into each Triton program.

For every frame sequence n (a (batch, patch) pair) and head h, over the frames i, j < T:

    s[n,h,i,j] = scale * <q[n,i,h], k[n,j,h]> + bias[h,i,j]         (scale defaults to D**-0.5)
    allowed    = (j <= i if causal) and key_mask[n,j]
    p[n,h,i,:] = softmax_j(s[n,h,i,j] where allowed, -inf elsewhere)  (a row with no allowed key: p = 0)
    out[n,i,h] = sum_j p[n,h,i,j] v[n,j,h]
    lse[h,n,i] = log sum_j exp(s) over allowed j (-inf for an empty row), saved for the backward.

Backward, with P recomputed from the saved lse (delta_i = <dout_i, out_i>):

    dv = P^T dout,  dP = dout V^T,  dS = P * (dP - delta),  dq = scale dS K,  dk = scale dS^T Q,
    dbias[h] = sum_n dS[n,h]   (per-program partial sums, then a deterministic sum over programs; with
                                dbias the programs of a head walk several blocks each, so there are at
                                most about MAX_DBIAS_PROGRAMS partials whatever N is).

Layout: q, k, v are (N, T, H, D) with any strides but a contiguous last dim, so the three slices of a
fused projection qkv (N, T, 3, H, D) are read in place. Each program handles BLOCK_SEQ sequences of one
head h: a [BLOCK_SEQ, T_PAD, D] tile of q, k and v sits in registers, scores come from batched
(3-D) tl.dot with T padded to a power of two >= 16 (the tensor-core minimum), the bias tile [T_PAD,
T_PAD] is loaded once per block. The grid is one axis, H * ceil(N / BLOCK_SEQ) (the backward with
dbias: H * programs per head), so a million sequences never hit the 65,535 limit of grid axes y/z.
Launch configs come from profiles/<gpu>/ (written by `fastdiff tune attention`), else from the
heuristic default, replaced per GPU arch and Triton version where the AOT compile sweep found it
spilling or not fitting (fastdiff_kernels.aot, aot_table.py; see :func:`select_config`).

Dispatch (kernels.dispatch): 'triton' on CUDA (or on CPU under TRITON_INTERPRET=1), 'reference' on
CPU, 'sdpa' / 'xformers' for comparison. The Triton path is a torch.library triton_op with autograd,
so torch.compile on a GPU traces into it without graph breaks.
"""

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from fastdiff_kernels import autotune, dispatch

OP_NAME = "temporal_attention"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (32, 64, 128)
MAX_FRAMES = 64
PEER_SEQUENCE_LIMIT = 65_535  # CUDA grid y/z limit hit by SDPA (pytorch #146704) and xformers (#845)
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------


def _allowed_keys(n: int, t: int, causal: bool, key_mask, device) -> torch.Tensor:
    """Bool (n or 1, 1, T, T): may query frame i attend key frame j."""
    allowed = torch.ones(t, t, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(n, 1, t, t)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    return allowed


def temporal_attention_reference(q, k, v, *, bias=None, causal=False, key_mask=None, scale=None):
    """PyTorch reference. q, k, v: (N, T, H, D); bias (H, T, T); key_mask bool (N, T). Rows with no
    allowed key return zeros."""
    n, t, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    scores = torch.einsum("nihd,njhd->nhij", q, k) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    allowed = _allowed_keys(n, t, causal, key_mask, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("nhij,njhd->nihd", probs, v)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr):
    """Batched [BS, M, K] @ [BS, K, N] with fp32 accumulation. DOT_PRECISION 'bf16-as-fp32' is the
    interpreter workaround: Triton 3.9's interpreter multiplies the raw uint16 bits of bf16 operands, so
    they are widened first (bf16 products are exact in fp32, so the arithmetic is the GPU's)."""
    if DOT_PRECISION == "bf16-as-fp32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _scores_log2(q, k, Bias, Mask, h, offs_n, offs_i, offs_j, N, T, qk_scale_log2,
                 sbh, sbi, sbj, smn, smt,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Scores in log2 units (s * log2 e) for a [BLOCK_SEQ, T_PAD, T_PAD] tile, and which are allowed."""
    s = _mm(q, tl.permute(k, (0, 2, 1)), DOT_PRECISION) * qk_scale_log2
    i2 = offs_i[:, None]
    j2 = offs_j[None, :]
    if HAS_BIAS:
        bias = tl.load(Bias + h * sbh + i2 * sbi + j2 * sbj, mask=(i2 < T) & (j2 < T), other=0.0)
        s += (bias.to(tl.float32) * 1.4426950408889634)[None, :, :]
    n3 = offs_n[:, None, None]
    allowed = (n3 < N) & (i2 < T)[None, :, :] & (j2 < T)[None, :, :]
    if CAUSAL:
        allowed = allowed & (j2 <= i2)[None, :, :]
    if HAS_MASK:
        key_ok = tl.load(Mask + offs_n.to(tl.int64)[:, None] * smn + offs_j[None, :] * smt,
                         mask=(offs_n[:, None] < N) & (offs_j[None, :] < T), other=0)
        allowed = allowed & (key_ok != 0)[:, None, :]
    return s, allowed


@triton.jit
def _lse_offsets(h, N, T, offs_n, offs_t):
    """[BLOCK_SEQ, T_PAD] offsets of lse[h, n, t] in the (H, N, T) buffer. h is widened first: h * N
    in int32 wraps once H * N reaches 2^31 (the int32 GPU arithmetic the interpreter reproduces)."""
    return (h.to(tl.int64) * N + offs_n.to(tl.int64)[:, None]) * T + offs_t[None, :]


@triton.jit
def _load_tile(Ptr, h, offs_n, offs_t, offs_d, N, T, sn, st, sh):
    n3 = offs_n.to(tl.int64)[:, None, None]
    t3 = offs_t[None, :, None]
    ptrs = Ptr + n3 * sn + t3 * st + h * sh + offs_d[None, None, :]
    return tl.load(ptrs, mask=(n3 < N) & (t3 < T), other=0.0)


@triton.jit
def _store_tile(Ptr, x, h, offs_n, offs_t, offs_d, N, T, sn, st, sh):
    n3 = offs_n.to(tl.int64)[:, None, None]
    t3 = offs_t[None, :, None]
    ptrs = Ptr + n3 * sn + t3 * st + h * sh + offs_d[None, None, :]
    tl.store(ptrs, x.to(Ptr.dtype.element_ty), mask=(n3 < N) & (t3 < T))


@triton.jit
def _temporal_attention_fwd_kernel(
    Q, K, V, Bias, Mask, Out, Lse,
    N, T, n_blocks, scale,
    sqn, sqt, sqh, skn, skt, skh, svn, svt, svh, son, sot, soh,
    sbh, sbi, sbj, smn, smt,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    T_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SEQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program -> (head, block of sequences): every sequence in a program shares h, hence one bias tile.
    pid = tl.program_id(0)
    h = pid // n_blocks
    offs_n = (pid % n_blocks) * BLOCK_SEQ + tl.arange(0, BLOCK_SEQ)
    offs_t = tl.arange(0, T_PAD)
    offs_d = tl.arange(0, D)
    # Inductor hands Python floats to user kernels as fp64: compute in fp32 regardless.
    qk_scale_log2 = tl.cast(scale, tl.float32) * 1.4426950408889634

    q = _load_tile(Q, h, offs_n, offs_t, offs_d, N, T, sqn, sqt, sqh)
    k = _load_tile(K, h, offs_n, offs_t, offs_d, N, T, skn, skt, skh)
    v = _load_tile(V, h, offs_n, offs_t, offs_d, N, T, svn, svt, svh)
    s, allowed = _scores_log2(q, k, Bias, Mask, h, offs_n, offs_t, offs_t, N, T, qk_scale_log2,
                              sbh, sbi, sbj, smn, smt, HAS_BIAS, HAS_MASK, CAUSAL, DOT_PRECISION)
    s = tl.where(allowed, s, float("-inf"))
    row_max = tl.max(s, axis=2)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # empty rows: keep exp2 at 0, not NaN
    p = tl.exp2(s - row_max[:, :, None])
    row_sum = tl.sum(p, axis=2)
    acc = _mm(p.to(v.dtype), v, DOT_PRECISION)
    has_key = row_sum > 0.0
    safe_sum = tl.where(has_key, row_sum, 1.0)
    inv = tl.where(has_key, 1.0 / safe_sum, 0.0)
    _store_tile(Out, acc * inv[:, :, None], h, offs_n, offs_t, offs_d, N, T, son, sot, soh)

    lse = tl.where(has_key, (row_max + tl.log2(safe_sum)) / 1.4426950408889634, float("-inf"))
    tl.store(Lse + _lse_offsets(h, N, T, offs_n, offs_t), lse, mask=(offs_n[:, None] < N) & (offs_t[None, :] < T))


@triton.jit
def _temporal_attention_bwd_kernel(
    Q, K, V, Out, DOut, Lse, Bias, Mask, DQ, DK, DV, DBiasPartial,
    N, T, n_blocks, progs_per_head, scale,
    sqn, sqt, sqh, skn, skt, skh, svn, svt, svh, son, sot, soh, sdon, sdot, sdoh,
    sdqn, sdqt, sdqh, sdkn, sdkt, sdkh, sdvn, sdvt, sdvh,
    sbh, sbi, sbj, smn, smt,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, NEED_DBIAS: tl.constexpr,
    T_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SEQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Program -> (head h, first block); it walks the blocks first, first + progs_per_head, ... of head h.
    # Without dbias progs_per_head = n_blocks (one block each); with dbias it is capped so that the fp32
    # partials, one [T, T] per program, stay a few MB however many sequences there are (see
    # _dbias_programs_per_head).
    pid = tl.program_id(0)
    h = pid // progs_per_head
    offs_t = tl.arange(0, T_PAD)
    offs_d = tl.arange(0, D)
    scale = tl.cast(scale, tl.float32)
    qk_scale_log2 = scale * 1.4426950408889634
    dbias_acc = tl.zeros((T_PAD, T_PAD), dtype=tl.float32)
    # num_stages=1: no software pipelining of this loop, whatever the launch's num_stages; the kernel has
    # no other loop, so num_stages does not change the binary and is not a tuning axis (tests/test_aot.py).
    for blk in tl.range(pid % progs_per_head, n_blocks, progs_per_head, num_stages=1, disable_licm=True):
        offs_n = blk * BLOCK_SEQ + tl.arange(0, BLOCK_SEQ)
        q = _load_tile(Q, h, offs_n, offs_t, offs_d, N, T, sqn, sqt, sqh)
        k = _load_tile(K, h, offs_n, offs_t, offs_d, N, T, skn, skt, skh)
        v = _load_tile(V, h, offs_n, offs_t, offs_d, N, T, svn, svt, svh)
        o = _load_tile(Out, h, offs_n, offs_t, offs_d, N, T, son, sot, soh)
        do = _load_tile(DOut, h, offs_n, offs_t, offs_d, N, T, sdon, sdot, sdoh)
        lse = tl.load(Lse + _lse_offsets(h, N, T, offs_n, offs_t),
                      mask=(offs_n[:, None] < N) & (offs_t[None, :] < T), other=0.0)

        # Recompute P from the saved log-sum-exp (in log2 units, like the scores).
        s, allowed = _scores_log2(q, k, Bias, Mask, h, offs_n, offs_t, offs_t, N, T, qk_scale_log2,
                                  sbh, sbi, sbj, smn, smt, HAS_BIAS, HAS_MASK, CAUSAL, DOT_PRECISION)
        p = tl.exp2(tl.where(allowed, s - (lse * 1.4426950408889634)[:, :, None], float("-inf")))
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=2)

        dv = _mm(tl.permute(p.to(do.dtype), (0, 2, 1)), do, DOT_PRECISION)
        dp = _mm(do, tl.permute(v, (0, 2, 1)), DOT_PRECISION)
        ds = p * (dp - delta[:, :, None])  # gradient of the loss w.r.t. s (scale*qk + bias)
        ds_lp = ds.to(q.dtype)
        dq = _mm(ds_lp, k, DOT_PRECISION) * scale
        dk = _mm(tl.permute(ds_lp, (0, 2, 1)), q, DOT_PRECISION) * scale
        _store_tile(DQ, dq, h, offs_n, offs_t, offs_d, N, T, sdqn, sdqt, sdqh)
        _store_tile(DK, dk, h, offs_n, offs_t, offs_d, N, T, sdkn, sdkt, sdkh)
        _store_tile(DV, dv, h, offs_n, offs_t, offs_d, N, T, sdvn, sdvt, sdvh)
        if NEED_DBIAS:
            dbias_acc += tl.sum(ds, axis=0)

    if NEED_DBIAS:
        # One [T, T] partial per program (all its sequences share h), summed over a head's programs on the
        # host side in a fixed order: dbias is deterministic (no atomics).
        i2 = offs_t[:, None]
        j2 = offs_t[None, :]
        tl.store(DBiasPartial + pid.to(tl.int64) * T * T + i2 * T + j2, dbias_acc, mask=(i2 < T) & (j2 < T))


# --------------------------------------------------------------------------------------------------
# Launch configuration: tuned (profiles/<gpu>/temporal_attention.json) or heuristic
# --------------------------------------------------------------------------------------------------


def padded_frames(t: int) -> int:
    return max(16, triton.next_power_of_2(t))


def config_key(kind: str, t_pad: int, d: int, dtype: torch.dtype) -> str:
    return f"{kind}|T_PAD={t_pad}|D={d}|dtype={str(dtype).removeprefix('torch.')}"


CONFIG_FIELDS = ("BLOCK_SEQ", "num_warps", "num_stages")
# Query rows (BLOCK_SEQ * T_PAD) a program may hold: beyond these the tiles spill (the backward holds five).
MAX_TILE_ROWS = {"fwd": 256, "bwd": 128}
# The backward's dbias partials: at most about this many programs per launch when dbias is needed, each
# writing one fp32 [T, T] partial, so the buffer stays <= (2048 + H) * 64 * 64 * 4 B (~34 MB) for any N
# (one partial per block of sequences would be H * ceil(N / BLOCK_SEQ) * T^2 floats: GBs near 1M sequences).
# 2048 programs are still >= 8 per SM on the largest GPUs.
MAX_DBIAS_PROGRAMS = 2048


def default_config(kind: str, t_pad: int, d: int, dtype: torch.dtype) -> dict:
    """Heuristic launch config for an untuned GPU: about 128 (forward) or 64 (backward, which holds
    five [rows, D] tiles) query rows per program, fewer for D=128 and fp32, 4 warps (8 for D=128).
    Where the AOT sweep found it spilling or not fitting an arch, :func:`arch_default` replaces it."""
    rows = 128 if kind == "fwd" else 64
    if d >= 128:
        rows //= 2
    if dtype == torch.float32:
        rows //= 2
    return {"BLOCK_SEQ": max(1, rows // t_pad), "num_warps": 8 if d >= 128 else 4, "num_stages": 1}


def arch_default(kind: str, t_pad: int, d: int, dtype: torch.dtype, arch: int | None) -> dict:
    """The default for a GPU arch (e.g. 86 for sm_86; None: unknown, e.g. the interpreter): the AOT
    table's replacement for this Triton version if the heuristic spills or does not fit there."""
    key = config_key(kind, t_pad, d, dtype)
    return autotune.aot_default(OP_NAME, key, arch) or default_config(kind, t_pad, d, dtype)


def tune_candidates(kind: str, t_pad: int, d: int, dtype: torch.dtype, arch: int | None = None) -> list[dict]:
    """Configs a tuning sweep tries: BLOCK_SEQ x num_warps within the tile budget, less those the AOT
    sweep found failing, compiling too slowly or over the arch's shared memory (``arch`` None: all).
    num_stages is always 1: the kernels have no pipelined loop, so it would not change the binary."""
    configs = [{**cfg, "num_stages": 1} for cfg in autotune.grid(BLOCK_SEQ=[1, 2, 4, 8, 16], num_warps=[2, 4, 8])
               if cfg["BLOCK_SEQ"] * t_pad <= MAX_TILE_ROWS[kind]]
    return autotune.aot_allowed(OP_NAME, config_key(kind, t_pad, d, dtype), configs, arch, CONFIG_FIELDS)


def select_config(kind: str, t_pad: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[dict, str]:
    """(config, source): the tuned config for this GPU if profiles/ has one, else the arch's default."""
    tuned = autotune.lookup(OP_NAME, config_key(kind, t_pad, d, dtype), device)
    if tuned is not None:
        return {name: int(tuned[name]) for name in CONFIG_FIELDS}, "tuned"
    return arch_default(kind, t_pad, d, dtype, autotune.device_arch(device)), "default"


def launch_block_seq(cfg: dict, n: int) -> int:
    # Never pack more sequences than exist (tiny N): keeps masked-off work small.
    return max(1, min(cfg["BLOCK_SEQ"], triton.next_power_of_2(n)))


def _dbias_programs_per_head(h: int, n_blocks: int) -> int:
    """Backward programs per head when dbias is needed (each walks several blocks): <= MAX_DBIAS_PROGRAMS
    in all, bounding the partial buffer; see MAX_DBIAS_PROGRAMS."""
    return max(1, min(n_blocks, triton.cdiv(MAX_DBIAS_PROGRAMS, h)))


def dbias_partial_shape(n: int, t: int, h: int, block_seq: int) -> tuple[int, int, int]:
    """Shape of the backward's fp32 dbias partial buffer: (H * programs per head, T, T)."""
    return (h * _dbias_programs_per_head(h, triton.cdiv(n, block_seq)), t, t)


def _dot_precision(q: torch.Tensor) -> str:
    # fp32 inputs get full fp32 products (PyTorch's own fp32 attention does not use TF32 by default).
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "bf16-as-fp32"  # interpreter only; see _mm (meta tensors stand for a GPU in the AOT sweep)
    return "ieee" if q.dtype == torch.float32 else "tf32"


# Output allocator; tests swap in a NaN-filled one so that any element a kernel fails to write shows up.
_empty = torch.empty


def _bias_strides(bias):
    return (0, 0, 0) if bias is None else tuple(bias.stride())


def _mask_strides(mask):
    return (0, 0) if mask is None else tuple(mask.stride())


def _mask_as_bytes(key_mask):
    # Same storage viewed as uint8 (no copy): Triton loads bytes, bool pointers are awkward across versions.
    return None if key_mask is None else key_mask.view(torch.uint8)


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def fwd_launch(q, k, v, bias, mask, out, lse, causal: bool, scale: float, cfg: dict) -> autotune.Launch:
    """The forward kernel's launch for a config (mask: the uint8 view of key_mask, or None)."""
    n, t, h, d = q.shape
    block_seq = launch_block_seq(cfg, n)
    n_blocks = triton.cdiv(n, block_seq)
    args = (q, k, v, q if bias is None else bias, q if mask is None else mask, out, lse, n, t, n_blocks, scale,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_bias_strides(bias), *_mask_strides(mask))
    constexprs = dict(HAS_BIAS=bias is not None, HAS_MASK=mask is not None, CAUSAL=causal, T_PAD=padded_frames(t),
                      D=d, BLOCK_SEQ=block_seq, DOT_PRECISION=_dot_precision(q))
    return autotune.Launch(_temporal_attention_fwd_kernel, (h * n_blocks,), args, constexprs,
                           cfg["num_warps"], cfg["num_stages"])


def bwd_launch(dout, q, k, v, out, lse, bias, mask, dq, dk, dv, partial, causal: bool, scale: float,
               cfg: dict) -> autotune.Launch:
    """The backward kernel's launch for a config; ``partial`` None: no dbias, else the buffer of
    :func:`dbias_partial_shape`."""
    n, t, h, d = q.shape
    block_seq = launch_block_seq(cfg, n)
    n_blocks = triton.cdiv(n, block_seq)
    need_dbias = partial is not None
    per_head = _dbias_programs_per_head(h, n_blocks) if need_dbias else n_blocks
    args = (q, k, v, out, dout, lse, q if bias is None else bias, q if mask is None else mask,
            dq, dk, dv, partial if need_dbias else q, n, t, n_blocks, per_head, scale,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_strides3(dout),
            *_strides3(dq), *_strides3(dk), *_strides3(dv), *_bias_strides(bias), *_mask_strides(mask))
    constexprs = dict(HAS_BIAS=bias is not None, HAS_MASK=mask is not None, CAUSAL=causal, NEED_DBIAS=need_dbias,
                      T_PAD=padded_frames(t), D=d, BLOCK_SEQ=block_seq, DOT_PRECISION=_dot_precision(q))
    return autotune.Launch(_temporal_attention_bwd_kernel, (h * per_head,), args, constexprs,
                           cfg["num_warps"], cfg["num_stages"])


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.library.triton_op) with autograd
# --------------------------------------------------------------------------------------------------


@torch.library.triton_op("fastdiff::temporal_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
    key_mask: Optional[torch.Tensor], causal: bool, scale: float,  # noqa: UP045 (schema inference on torch 2.11)
) -> tuple[torch.Tensor, torch.Tensor]:
    n, t, h, d = q.shape
    out = _empty((n, t, h, d), dtype=q.dtype, device=q.device)
    lse = _empty((h, n, t), dtype=torch.float32, device=q.device)
    cfg, _ = select_config("fwd", padded_frames(t), d, q.dtype, q.device)
    fwd_launch(q, k, v, bias, _mask_as_bytes(key_mask), out, lse, causal, scale, cfg)()
    return out, lse


@torch.library.triton_op("fastdiff::temporal_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, bias: Optional[torch.Tensor], key_mask: Optional[torch.Tensor], causal: bool,  # noqa: UP045
    scale: float, need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, t, h, d = q.shape
    dq = _empty((n, t, h, d), dtype=q.dtype, device=q.device)
    dk = _empty((n, t, h, d), dtype=k.dtype, device=q.device)
    dv = _empty((n, t, h, d), dtype=v.dtype, device=q.device)
    cfg, _ = select_config("bwd", padded_frames(t), d, q.dtype, q.device)
    need_dbias = need_dbias and bias is not None
    partial = None
    if need_dbias:
        partial = _empty(dbias_partial_shape(n, t, h, launch_block_seq(cfg, n)), dtype=torch.float32,
                         device=q.device)
    bwd_launch(dout, q, k, v, out, lse, bias, _mask_as_bytes(key_mask), dq, dk, dv, partial, causal, scale, cfg)()
    if need_dbias:
        dbias = partial.view(h, -1, t, t).sum(dim=1).to(bias.dtype)
    else:
        dbias = torch.empty((0,), dtype=q.dtype, device=q.device)
    return dq, dk, dv, dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, key_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, key_mask)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias, key_mask = ctx.saved_tensors
    if dout.stride(-1) != 1:  # e.g. expanded (stride 0) from out.sum().backward()
        dout = dout.contiguous()
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    why = backward_unlaunchable(q)
    if why is not None:
        _warn_once(f"temporal_attention backward: the Triton kernel not supported here because {why}; "
                   "the PyTorch reference computes this backward instead (slower, same gradients)")
        return (*_reference_backward(dout, q, k, v, bias, key_mask, ctx.causal, ctx.scale, need_dbias), None, None, None)
    dq, dk, dv, dbias = _bwd_op(dout, q, k, v, out, lse, bias, key_mask, ctx.causal, ctx.scale, need_dbias)
    return dq, dk, dv, (dbias if need_dbias else None), None, None, None


def backward_unlaunchable(q: torch.Tensor) -> str | None:
    """Why the backward kernel cannot launch on q's GPU (no config of this shape fits its shared memory: fp32,
    T_pad 64, D 128 on sm_86 / sm_89, per the AOT sweep), or None. CPU tensors (the interpreter) always launch."""
    if not q.is_cuda:
        return None
    key = config_key("bwd", padded_frames(q.shape[1]), q.shape[-1], q.dtype)
    arch = autotune.device_arch(q.device)
    why = autotune.aot_unlaunchable(OP_NAME, key, arch)
    return None if why is None else f"on sm_{arch} {key} {why}"


def _reference_backward(dout, q, k, v, bias, key_mask, causal, scale, need_dbias):
    """dq, dk, dv, dbias of the PyTorch reference, recomputed from the inputs."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        b = bias.detach().requires_grad_() if need_dbias else bias
        out = temporal_attention_reference(*leaves, bias=b, causal=causal, key_mask=key_mask, scale=scale)
        grads = torch.autograd.grad(out, leaves + ([b] if need_dbias else []), dout)
    return (*grads[:3], grads[3] if need_dbias else None)


@functools.cache
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def temporal_attention_triton(q, k, v, *, bias=None, causal=False, key_mask=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = _fwd_op(q, k, v, bias, key_mask, bool(causal), scale)
    return out


# --------------------------------------------------------------------------------------------------
# Peers for comparison: SDPA and xformers (bias and masks turned into an additive mask)
# --------------------------------------------------------------------------------------------------


def _refuse_large_batches(name: str, q) -> None:
    n, _, h, _ = q.shape
    if q.is_cuda and n * h > PEER_SEQUENCE_LIMIT:
        raise dispatch.BackendNotSupported(
            f"{OP_NAME}: {name} not supported because {n * h:,} sequences (N*H) exceed {PEER_SEQUENCE_LIMIT:,}, "
            "the CUDA grid-axis limit its kernels launch on (pytorch/pytorch#146704, "
            "facebookresearch/xformers#845); the triton backend has no such limit"
        )


def _additive_mask(q, bias, causal, key_mask, pad_to: int = 1):
    """(mask (N|1, H|1, T, T) in q.dtype or None, is_causal flag, rows_with_keys (N, T, 1, 1) or None).
    A row with no allowed key is opened to every key (so the peer does not produce NaN) and zeroed after."""
    n, t, h, _ = q.shape
    if bias is None and key_mask is None and pad_to == 1:
        return None, causal, None
    allowed = _allowed_keys(n if key_mask is not None else 1, t, causal, key_mask, q.device)
    has_key = allowed.any(dim=-1, keepdim=True)  # (N|1, 1, T, 1)
    allowed = allowed | ~has_key
    t_cols = -(-t // pad_to) * pad_to
    mask = torch.zeros((allowed.shape[0], h if bias is not None else 1, t, t_cols), dtype=q.dtype, device=q.device)
    mask = mask[..., :t]  # xformers wants the row stride aligned: keep the padded storage
    if bias is not None:
        mask += bias.to(q.dtype)
    mask.masked_fill_(~allowed, float("-inf"))
    rows = None if key_mask is None else has_key[:, 0].unsqueeze(-1)  # (N, T, 1, 1)
    return mask, False, rows


def temporal_attention_sdpa(q, k, v, *, bias=None, causal=False, key_mask=None, scale=None):
    _refuse_large_batches("sdpa", q)
    mask, is_causal, rows = _additive_mask(q, bias, causal, key_mask)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=is_causal, scale=scale,
    ).transpose(1, 2)
    return out if rows is None else out.masked_fill(~rows, 0.0)


def temporal_attention_xformers(q, k, v, *, bias=None, causal=False, key_mask=None, scale=None):
    if not q.is_cuda:
        raise dispatch.BackendNotSupported("xformers: not supported because it has no CPU operator")
    _refuse_large_batches("xformers", q)
    try:
        import xformers.ops as xops
    except Exception as err:  # pragma: no cover - depends on the install
        raise dispatch.BackendNotSupported(f"xformers: not supported because it cannot be imported ({err})") from err
    n, t, h, _ = q.shape
    mask, _, rows = _additive_mask(q, bias, causal, key_mask, pad_to=8)
    if mask is not None:
        mask = mask.expand(n, h, t, t)
    elif causal:
        mask = xops.LowerTriangularMask()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=mask, scale=scale)
    return out if rows is None else out.masked_fill(~rows, 0.0)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _unsupported(why: str):
    return ValueError(f"{OP_NAME}: not supported because {why}")


def check_inputs(q, k, v, bias, key_mask, scale) -> None:
    """Raise a clear error for anything outside the op's contract (every backend enforces it)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise _unsupported(f"{name} must be a 4-D tensor (N, T, H, D), got {getattr(x, 'shape', type(x))}")
    if not (q.shape == k.shape == v.shape):
        raise _unsupported(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise _unsupported(f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: q, k, v must share one of fp16, bf16, fp32")
    if not (q.device == k.device == v.device):
        raise _unsupported(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    n, t, h, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise _unsupported(f"head dim D={d} is not one of {SUPPORTED_HEAD_DIMS}")
    if not 1 <= t <= MAX_FRAMES:
        raise _unsupported(f"T={t} frames is outside 1..{MAX_FRAMES} (this op is for short temporal sequences)")
    if n == 0 or h == 0:
        raise _unsupported(f"empty batch (N={n}, H={h})")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise _unsupported(f"{name}'s last dim has stride {x.stride(-1)}; it must be contiguous (stride 1)")
    if bias is not None:
        if tuple(bias.shape) != (h, t, t) or not bias.is_floating_point():
            raise _unsupported(f"bias must be a float tensor of shape (H, T, T) = {(h, t, t)}, got "
                               f"{tuple(bias.shape)} {bias.dtype}")
        if bias.device != q.device:
            raise _unsupported(f"bias is on {bias.device}, q on {q.device}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (n, t):
            raise _unsupported(f"key_mask must be bool of shape (N, T) = {(n, t)}, got "
                               f"{tuple(key_mask.shape)} {key_mask.dtype}")
        if key_mask.device != q.device:
            raise _unsupported(f"key_mask is on {key_mask.device}, q on {q.device}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise _unsupported(f"scale must be a Python number, got {type(scale).__name__}")


_BACKENDS = {
    "triton": temporal_attention_triton,
    "reference": temporal_attention_reference,
    "sdpa": temporal_attention_sdpa,
    "xformers": temporal_attention_xformers,
}


def temporal_attention(q, k, v, *, bias=None, causal=False, key_mask=None, scale=None):
    """Attention over the T frames of each of the N*H sequences; see the module docstring for the formula.

    q, k, v: (N, T, H, D) fp16/bf16/fp32, D in {32, 64, 128}, T in 1..64, last dim contiguous (views of a
    fused qkv projection work as they are). bias: additive (H, T, T) (differentiable). causal: key j <= i
    only. key_mask: bool (N, T), True where a key frame may be attended; a query row with no allowed key
    returns zeros. scale: defaults to D**-0.5.
    """
    check_inputs(q, k, v, bias, key_mask, scale)
    backend = dispatch.resolve(OP_NAME, q, extra=("sdpa", "xformers"))
    return _BACKENDS[backend](q, k, v, bias=bias, causal=causal, key_mask=key_mask, scale=scale)


# --------------------------------------------------------------------------------------------------
# Tuning sweep (run by `fastdiff tune attention` on a GPU)
# --------------------------------------------------------------------------------------------------


def tune(device=None, *, frames=(16, 32, 64), head_dims=SUPPORTED_HEAD_DIMS,
         dtypes=(torch.bfloat16, torch.float16, torch.float32), sequences: int = 1 << 16, log=print) -> dict:
    """Sweep :func:`tune_candidates` (BLOCK_SEQ x num_warps) for each (fwd|bwd, T_PAD, D, dtype) key on a CUDA
    device and return {key: best config with its time}; :func:`kernels.autotune.save` persists it."""
    device = torch.device(device or "cuda")
    arch = autotune.device_arch(device)
    results = {}
    for t_pad in frames:
        for d in head_dims:
            for dtype in dtypes:
                heads = 8
                n = max(1, sequences // heads)
                qkv = torch.randn(n, t_pad, 3, heads, d, device=device, dtype=dtype)
                q, k, v = qkv.unbind(2)
                bias = torch.randn(heads, t_pad, t_pad, device=device, dtype=dtype)
                out, lse = _fwd_op(q, k, v, bias, None, False, d**-0.5)
                dout = torch.randn_like(out)
                calls = {"fwd": functools.partial(_fwd_op, q, k, v, bias, None, False, d**-0.5),
                         "bwd": functools.partial(_bwd_op, dout, q, k, v, out, lse, bias, None, False, d**-0.5, True)}
                for kind, call in calls.items():
                    key = config_key(kind, t_pad, d, dtype)
                    best = autotune.sweep(OP_NAME, key, tune_candidates(kind, t_pad, d, dtype, arch), call,
                                          arch_default(kind, t_pad, d, dtype, arch), log)
                    if best is not None:
                        best["sequences"] = n * heads
                        results[key] = best
                        log(f"{key}: {best}")
    return results

