"""Blockwise 8-bit AdamW that runs as a few kernel launches with no host sync (CUDA-graph capturable).

Update, per element, at step t (decoupled weight decay, as torch.optim.AdamW and bitsandbytes):

    m   = beta1 * deq(m_q) + (1 - beta1) * g
    v   = beta2 * deq(v_q) + (1 - beta2) * g * g
    p   = p * (1 - lr * wd) - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    m_q, absmax_m = quant(m);  v_q, absmax_v = quant(v)

The step uses the fp32 m, v of this step; only the stored state is 8-bit.

Quantisation (bitsandbytes' "dynamic" data type, blockwise). The state of a tensor is cut into blocks
of BLOCKSIZE = 256 consecutive elements; each block keeps one fp32 absmax = max |x| of the block and
256 uint8 codes. A code is an index into a sorted 256-entry table (:func:`dynamic_code`): exp_avg uses
the signed table, exp_avg_sq the unsigned one. ``quant`` divides by the block's absmax and stores the
index of the nearest table value, found by an 8-step binary search over the sorted table (exact ties
go to the lower index); ``deq`` is ``table[code] * absmax``. State: 2 bytes + 8/256 bytes per element.
One deliberate exception: a positive exp_avg_sq never rounds to the code 0 (it takes the smallest
positive code, 3.25e-7 * absmax, instead). Nearest rounding sends v < 1.6e-7 * absmax_v to 0, i.e.
any element whose gradient is ~4e-4 of its block's largest, while its exp_avg stays representable;
the next step then divides m by eps alone and moves that element by up to ~1e4 * lr (seen in tests).
bitsandbytes' CPU quantiser never emits the zero code either.

Which tensors are 8-bit: those with at least ``min_8bit_size`` (4,096) elements, as bitsandbytes does.
Smaller tensors (biases, norms) keep fp32 exp_avg / exp_avg_sq and go through the same kernel
(``EIGHT_BIT=False``).

Launch design (multi-tensor, pointer table). Parameters are not moved or flattened: the optimizer
sorts its tensors into buckets by (parameter dtype, 8-bit or not) and launches the kernel once per
non-empty bucket, so a model with fp32 parameters costs two launches (+ one tiny ``steps += active``).
Each bucket owns flat, block-padded state buffers (every tensor's state starts at a multiple of 256,
so block ``b`` of the bucket lives at ``state[256 b : 256 b + 256]`` and ``absmax[b]``) and two
device tables built once at construction:

* ``blk_tensor`` int32 [n_blocks]: which tensor of the bucket a block belongs to;
* ``table`` int64 [n_tensors, 6]: param address, grad address (0 = no grad this step: skipped),
  numel, first block, param-group row in the hyper-parameter table, index into the step counters.

A program handles ``ROWS`` whole blocks (a [ROWS, 256] tile: one row per block), loads the raw
addresses from the table and casts them to typed pointers (``tl.pointer_type``). Grad addresses are
checked on the host each step (metadata only, no sync) and re-uploaded from pinned memory only when
they change (``zero_grad(set_to_none=True)`` may hand out new grad storage); inside a CUDA graph they
are static. The alternative, parameters as views of one flat storage, was rejected because autograd
allocates each ``.grad`` separately, so gradients would have to be gathered every step.

Device-side scalars: lr, beta1, beta2, eps and weight decay per param group live in an fp32 device
table [n_groups, 5]; step counters (fp32, one per tensor, as torch's AdamW) are incremented on the
device by ``steps += active``. A float ``lr`` changed on the host (a scheduler) is pushed with
``fill_`` (no sync); a 0-dim tensor ``lr`` on the parameters' device is copied device-to-device each
step, which is what a captured graph needs to follow a schedule.

Stochastic rounding (bf16 parameters, ``stochastic_rounding=True``): the fp32 result gets a uniform
16-bit Philox integer added to its low 16 bits before truncation to bf16, so E[p_bf16] = p_fp32. The
Philox key is a device seed; the counter is (step << 40) + element slot, so every step draws anew.

State layout (``optimizer.state[p]``, also what ``state_dict()`` saves, one entry per parameter):

* 8-bit tensors: ``step`` fp32 0-dim, ``exp_avg`` uint8 (p.shape, signed dynamic code),
  ``exp_avg_sq`` uint8 (p.shape, unsigned dynamic code), ``absmax_exp_avg`` and ``absmax_exp_avg_sq``
  fp32 [ceil(numel / 256)];
* fp32-state tensors: ``step``, ``exp_avg``, ``exp_avg_sq`` fp32 (p.shape), i.e. torch AdamW's layout.

Live ``optimizer.state`` entries are views into the flat buffers; ``state_dict()`` returns copies.
``load_state_dict`` accepts both kinds for any tensor (an fp32 exp_avg where we keep 8-bit is
quantised, 8-bit where we keep fp32 is dequantised), so a torch AdamW state dict loads directly;
bitsandbytes' layout is converted by ``fastdiff.optim.convert_state_dict``.

Dispatch: ``kernels.dispatch.resolve("adamw8bit", param)`` per bucket: Triton on CUDA, the PyTorch
reference (:func:`_bucket_step_reference`, the same algorithm on the same buffers) on CPU;
``FASTDIFF_KERNELS=triton`` with ``TRITON_INTERPRET=1`` runs the kernel on CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastdiff_kernels import autotune, dispatch

try:  # triton is optional at import time; the reference path needs only torch
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

BLOCKSIZE = 256
MIN_8BIT_SIZE = 4096
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
TABLE_COLUMNS = 6  # columns of the per-tensor table, see the module docstring
_NHYPER = 5  # lr, beta1, beta2, eps, weight_decay
# Blocks per program: one block per row of a [ROWS, 256] tile. Small on a GPU (many programs, each a
# few KB of traffic); large under the interpreter, whose cost is per program, not per element.
GPU_ROWS = 2
GPU_NUM_WARPS = 4
INTERPRETER_ROWS = 64


# --------------------------------------------------------------------------------------------
# The dynamic code and blockwise (de)quantisation (PyTorch)
# --------------------------------------------------------------------------------------------


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted values of the 8-bit dynamic data type (Dettmers 2016, as in bitsandbytes).

    A code is read as: [sign bit, signed only] [z leading zero bits] [one indicator bit] [fraction].
    z (0..6) is a decimal exponent, value scale 10^-z; the bits after the indicator are a linear
    fraction: with f of them the 2^f values are the midpoints of 2^f equal steps over [0.1, 1].
    The all-zero pattern is 0 and the one pattern left over (negative zero when signed) is 1.0.
    Signed: 127 positive and 127 negative values, 0 and 1. Unsigned: 254 positive values, 0 and 1.
    Arithmetic in fp32 in the same order as bitsandbytes, so the tables are bit-identical.
    """
    value_bits = 7 if signed else 8
    values: list[float] = []
    for z in range(7):
        fraction_bits = value_bits - z - 1
        edges = torch.linspace(0.1, 1.0, 2**fraction_bits + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = ((10.0 ** (-z)) * mids).tolist()
        values += scaled
        if signed:
            values += [-x for x in scaled]
    values += [0.0, 1.0]
    assert len(values) == 256, len(values)
    return torch.tensor(sorted(values), dtype=torch.float32)


_code_cache: dict[tuple[bool, str], torch.Tensor] = {}


def code_on(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _code_cache:
        _code_cache[key] = dynamic_code(signed).to(device)
    return _code_cache[key]


def nearest_code_index(x: torch.Tensor, code: torch.Tensor, positive_floor: bool = False) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` to each x (ties to the lower index).

    Same decisions as the kernel's binary search: lo = last index with code[lo] <= x (0 if none),
    then lo + 1 wins only if strictly nearer. ``positive_floor`` (the unsigned exp_avg_sq code, whose
    index 0 is the value 0): x > 0 never maps to index 0 (see the module docstring).
    """
    lo = (torch.searchsorted(code, x.contiguous(), right=True) - 1).clamp_(0, code.numel() - 1)
    hi = (lo + 1).clamp_(max=code.numel() - 1)
    idx = torch.where((x - code[lo]) > (code[hi] - x), hi, lo)
    if positive_floor:
        idx = torch.where((x > 0) & (idx == 0), torch.ones_like(idx), idx)
    return idx


def _pad_to_blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1).float()
    n_blocks = -(-flat.numel() // BLOCKSIZE)
    out = flat.new_zeros(n_blocks * BLOCKSIZE)
    out[: flat.numel()] = flat
    return out.view(n_blocks, BLOCKSIZE)


def _inverse_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """1 / absmax per block, 0 for an all-zero block (its codes then all point at the value 0)."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.where(absmax > 0, 1.0 / safe, torch.zeros_like(absmax))


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, positive_floor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, real) -> (uint8 codes of x's shape, fp32 absmax [ceil(numel / 256)]).

    Use ``positive_floor=True`` with the unsigned code for exp_avg_sq, as the optimizer does."""
    rows = _pad_to_blocks(x)
    absmax = rows.abs().amax(dim=1)
    scaled = rows * _inverse_absmax(absmax)[:, None]
    q = nearest_code_index(scaled, code.to(rows.device), positive_floor).to(torch.uint8)
    return q.reshape(-1)[: x.numel()].reshape(x.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` up to rounding: fp32 tensor of q's shape."""
    flat = code.to(q.device)[q.reshape(-1).long()]
    n_blocks = absmax.numel()
    if n_blocks * BLOCKSIZE < flat.numel() or (n_blocks - 1) * BLOCKSIZE >= max(flat.numel(), 1):
        raise ValueError(
            f"dequantize_blockwise: absmax has {n_blocks} blocks but the codes need "
            f"{-(-flat.numel() // BLOCKSIZE)} blocks of {BLOCKSIZE}"
        )
    padded = flat.new_zeros(n_blocks * BLOCKSIZE)
    padded[: flat.numel()] = flat
    out = padded.view(n_blocks, BLOCKSIZE) * absmax.float()[:, None]
    return out.reshape(-1)[: q.numel()].reshape(q.shape)


# --------------------------------------------------------------------------------------------
# The Triton kernel
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _nearest_code(x, code_ptr):
        """Binary search over the sorted 256-entry code: nearest entry's index (ties to the lower)."""
        lo = tl.zeros(x.shape, dtype=tl.int32)
        for k in tl.static_range(8):
            cand = lo + (128 >> k)
            lo = tl.where(tl.load(code_ptr + cand) <= x, cand, lo)
        hi = tl.minimum(lo + 1, 255)
        c_lo = tl.load(code_ptr + lo)
        c_hi = tl.load(code_ptr + hi)
        return tl.where((x - c_lo) > (c_hi - x), hi, lo)

    @triton.jit
    def _adamw_blockwise_kernel(
        blk_tensor_ptr, table_ptr, steps_ptr, hyper_ptr,
        m_ptr, v_ptr, absmax_m_ptr, absmax_v_ptr, code_m_ptr, code_v_ptr, seed_ptr, skip_ptr,
        n_blocks, salt,
        P_DTYPE: tl.constexpr, EIGHT_BIT: tl.constexpr, STOCHASTIC: tl.constexpr,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, NCOL: tl.constexpr, NHYPER: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        row_ok = rows < n_blocks
        t = tl.load(blk_tensor_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        entry = table_ptr + t * NCOL
        p_addr = tl.load(entry + 0, mask=row_ok, other=0)
        g_addr = tl.load(entry + 1, mask=row_ok, other=0)
        numel = tl.load(entry + 2, mask=row_ok, other=0)
        first_block = tl.load(entry + 3, mask=row_ok, other=0)
        hyper_row = hyper_ptr + tl.load(entry + 4, mask=row_ok, other=0) * NHYPER
        step_idx = tl.load(entry + 5, mask=row_ok, other=0)
        # A tensor without a grad this step is left untouched; so is everything when the step is skipped
        # (found_inf set on the device, e.g. by a non-finite loss): weights, moments and absmax alike.
        not_skipped = tl.load(skip_ptr + 0 * rows, mask=row_ok, other=1.0) == 0.0  # one flag, read per row
        row_on = row_ok & (g_addr != 0) & not_skipped

        # Inactive rows read harmless values (beta 0.5, step 1) so no inf/nan is formed there.
        lr = tl.load(hyper_row + 0, mask=row_on, other=0.0)
        beta1 = tl.load(hyper_row + 1, mask=row_on, other=0.5)
        beta2 = tl.load(hyper_row + 2, mask=row_on, other=0.5)
        eps = tl.load(hyper_row + 3, mask=row_on, other=1.0)
        wd = tl.load(hyper_row + 4, mask=row_on, other=0.0)
        step = tl.load(steps_ptr + step_idx, mask=row_on, other=1.0)

        lane = tl.arange(0, BLOCK)
        elem = (rows - first_block)[:, None] * BLOCK + lane[None, :]
        mask = row_on[:, None] & (elem < numel[:, None])
        slot = rows[:, None] * BLOCK + lane[None, :]  # position in the bucket's flat state
        p_ptrs = p_addr.to(tl.pointer_type(P_DTYPE))[:, None] + elem
        g_ptrs = g_addr.to(tl.pointer_type(P_DTYPE))[:, None] + elem
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)

        if EIGHT_BIT:
            q_m = tl.load(m_ptr + slot, mask=mask, other=0).to(tl.int32)
            q_v = tl.load(v_ptr + slot, mask=mask, other=0).to(tl.int32)
            absmax_m = tl.load(absmax_m_ptr + rows, mask=row_on, other=0.0)
            absmax_v = tl.load(absmax_v_ptr + rows, mask=row_on, other=0.0)
            m = tl.load(code_m_ptr + q_m) * absmax_m[:, None]
            v = tl.load(code_v_ptr + q_v) * absmax_v[:, None]
        else:
            m = tl.load(m_ptr + slot, mask=mask, other=0.0)
            v = tl.load(v_ptr + slot, mask=mask, other=0.0)

        m = beta1[:, None] * m + (1.0 - beta1)[:, None] * g
        v = beta2[:, None] * v + (1.0 - beta2)[:, None] * (g * g)
        m = tl.where(mask, m, 0.0)  # padding lanes must not raise a block's absmax
        v = tl.where(mask, v, 0.0)

        bias1 = 1.0 - tl.exp2(step * tl.log2(beta1))
        bias2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * tl.log2(beta2)))
        step_size = lr / bias1
        decay = 1.0 - lr * wd
        denom = tl.sqrt_rn(v) / bias2_sqrt[:, None] + eps[:, None]
        p = p * decay[:, None] - step_size[:, None] * (m / denom)

        if EIGHT_BIT:
            new_absmax_m = tl.max(tl.abs(m), axis=1)
            new_absmax_v = tl.max(v, axis=1)
            one = tl.full([ROWS], 1.0, tl.float32)
            inv_m = tl.where(new_absmax_m > 0, tl.div_rn(one, tl.where(new_absmax_m > 0, new_absmax_m, one)), 0.0)
            inv_v = tl.where(new_absmax_v > 0, tl.div_rn(one, tl.where(new_absmax_v > 0, new_absmax_v, one)), 0.0)
            q_m = _nearest_code(m * inv_m[:, None], code_m_ptr)
            q_v = _nearest_code(v * inv_v[:, None], code_v_ptr)
            q_v = tl.where((v > 0) & (q_v == 0), 1, q_v)  # positive v never stored as 0, see docstring
            tl.store(m_ptr + slot, q_m.to(tl.uint8), mask=mask)
            tl.store(v_ptr + slot, q_v.to(tl.uint8), mask=mask)
            tl.store(absmax_m_ptr + rows, new_absmax_m, mask=row_on)
            tl.store(absmax_v_ptr + rows, new_absmax_v, mask=row_on)
        else:
            tl.store(m_ptr + slot, m, mask=mask)
            tl.store(v_ptr + slot, v, mask=mask)

        if P_DTYPE == tl.bfloat16:  # noqa: SIM300 (P_DTYPE is a constexpr argument, not a constant)
            # Round fp32 -> bf16 on the bits: add an offset below bf16's mantissa, then truncate.
            # Nearest-even: offset 0x7FFF + lowest kept bit (done by hand because Triton's
            # interpreter truncates in .to(bf16) while GPUs round to nearest). Stochastic: 16
            # uniform random bits, so it rounds up with probability = the dropped fraction.
            bits = p.to(tl.uint32, bitcast=True)
            if STOCHASTIC:
                seed = tl.load(seed_ptr) + salt
                counter = (step.to(tl.int64) << 40)[:, None] + slot
                offset = (tl.randint(seed, counter) & 0xFFFF).to(tl.uint32)
            else:
                offset = 0x7FFF + ((bits >> 16) & 1)
            bits = ((bits + offset) >> 16) << 16
            p_out = bits.to(tl.float32, bitcast=True).to(P_DTYPE)
        else:
            p_out = p
        tl.store(p_ptrs, p_out, mask=mask)


_TL_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _tl_dtype(dtype: torch.dtype):
    return tl.float32 if dtype == torch.float32 else tl.bfloat16


# --------------------------------------------------------------------------------------------
# Buckets: one launch each
# --------------------------------------------------------------------------------------------


@dataclass
class _Bucket:
    dtype: torch.dtype
    eight_bit: bool
    salt: int
    params: list = field(default_factory=list)
    group_rows: list = field(default_factory=list)
    step_idx: list = field(default_factory=list)
    first_block: list = field(default_factory=list)
    n_blocks: int = 0
    # device buffers (set by _allocate)
    blk_tensor: torch.Tensor | None = None
    table: torch.Tensor | None = None
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    absmax_m: torch.Tensor | None = None
    absmax_v: torch.Tensor | None = None
    ptr_key: tuple | None = None  # (param addrs, grad addrs) last uploaded
    staging: torch.Tensor | None = None  # pinned buffer reserved for an upload inside graph capture
    any_active: bool = False
    # The reference step's per-block index tensors, by which parameters have grads: made once, not every step
    # (a tensor made from host data per step would be a host-to-device copy, and a constant in a captured graph).
    reference_index: dict = field(default_factory=dict)

    def add(self, p: torch.Tensor, group_row: int, step_idx: int) -> None:
        self.params.append(p)
        self.group_rows.append(group_row)
        self.step_idx.append(step_idx)
        self.first_block.append(self.n_blocks)
        self.n_blocks += -(-p.numel() // BLOCKSIZE)

    def allocate(self, device: torch.device) -> None:
        counts = [-(-p.numel() // BLOCKSIZE) for p in self.params]
        owner = torch.repeat_interleave(torch.arange(len(self.params), dtype=torch.int32), torch.tensor(counts))
        self.blk_tensor = owner.to(device)
        self.table = torch.zeros(len(self.params), TABLE_COLUMNS, dtype=torch.int64, device=device)
        n = self.n_blocks * BLOCKSIZE
        state_dtype = torch.uint8 if self.eight_bit else torch.float32
        # Zero codes decode to code[0] = -0.99 * absmax, but absmax starts at 0, so the state is 0.
        self.m = torch.zeros(n, dtype=state_dtype, device=device)
        self.v = torch.zeros(n, dtype=state_dtype, device=device)
        if self.eight_bit:
            self.absmax_m = torch.zeros(self.n_blocks, dtype=torch.float32, device=device)
            self.absmax_v = torch.zeros(self.n_blocks, dtype=torch.float32, device=device)
        if device.type == "cuda":
            self.staging = torch.empty(len(self.params), TABLE_COLUMNS, dtype=torch.int64).pin_memory()

    def host_table(self, grad_addrs: list[int]) -> torch.Tensor:
        rows = [
            [p.data_ptr(), ga, p.numel(), fb, gr, si]
            for p, ga, fb, gr, si in zip(self.params, grad_addrs, self.first_block, self.group_rows, self.step_idx)
        ]
        return torch.tensor(rows, dtype=torch.int64).view(len(self.params), TABLE_COLUMNS)

    def views(self, k: int) -> dict[str, torch.Tensor]:
        """Per-parameter views of the flat state (the layout in the module docstring)."""
        p = self.params[k]
        start, n_blk = self.first_block[k], -(-p.numel() // BLOCKSIZE)
        sl = slice(start * BLOCKSIZE, start * BLOCKSIZE + p.numel())
        out = {"exp_avg": self.m[sl].view(p.shape), "exp_avg_sq": self.v[sl].view(p.shape)}
        if self.eight_bit:
            out["absmax_exp_avg"] = self.absmax_m[start : start + n_blk]
            out["absmax_exp_avg_sq"] = self.absmax_v[start : start + n_blk]
        return out


def _upload(dst: torch.Tensor, host: torch.Tensor, bucket: _Bucket | None = None) -> None:
    """Host -> device copy that never synchronises and is legal inside CUDA-graph capture."""
    if dst.device.type != "cuda":
        dst.copy_(host)
        return
    if torch.cuda.is_current_stream_capturing():
        # The captured memcpy reads this pinned buffer at every replay: it must stay alive and
        # unchanged, so it is handed to the graph and never written again.
        if bucket is None or bucket.staging is None:
            raise RuntimeError(
                "adamw8bit: parameter/grad addresses changed twice during CUDA-graph capture without an "
                "eager step in between; run one eager optimizer step before capturing again"
            )
        bucket.staging.copy_(host)
        dst.copy_(bucket.staging, non_blocking=True)
        _GRAPH_OWNED.append(bucket.staging)
        bucket.staging = None
        return
    dst.copy_(host.pin_memory(), non_blocking=True)
    if bucket is not None and bucket.staging is None:
        bucket.staging = torch.empty_like(host).pin_memory()


_GRAPH_OWNED: list[torch.Tensor] = []


# --------------------------------------------------------------------------------------------
# Reference implementation (PyTorch), the same algorithm on the same buffers
# --------------------------------------------------------------------------------------------


def _stochastic_round_bf16(x: torch.Tensor, noise16: torch.Tensor) -> torch.Tensor:
    bits = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = ((bits + noise16) >> 16) << 16
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32).to(torch.bfloat16)


def adamw_rows_reference(p, g, m, v, lr, beta1, beta2, eps, wd, step):
    """One AdamW step on [rows, 256] fp32 tiles with per-row [rows, 1] hyper-parameters.

    Same operations in the same order as the kernel, so the fp32 m, v agree bit for bit.
    """
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    bias1 = 1.0 - torch.exp2(step * torch.log2(beta1))
    bias2_sqrt = torch.sqrt(1.0 - torch.exp2(step * torch.log2(beta2)))
    denom = torch.sqrt(v) / bias2_sqrt + eps
    p = p * (1.0 - lr * wd) - (lr / bias1) * (m / denom)
    return p, m, v


def _bucket_step_reference(bucket: _Bucket, steps, hyper, codes, stochastic: bool, generator=None,
                           skip=None) -> None:
    device = bucket.m.device
    active = [p.grad is not None for p in bucket.params]
    if not any(active):
        return
    nb = bucket.n_blocks
    P = torch.zeros(nb, BLOCKSIZE, dtype=torch.float32, device=device)
    G = torch.zeros_like(P)
    lane_ok = torch.zeros(nb, BLOCKSIZE, dtype=torch.bool, device=device)
    for p, fb, on in zip(bucket.params, bucket.first_block, active):
        if on:
            n = p.numel()
            P.view(-1)[fb * BLOCKSIZE : fb * BLOCKSIZE + n] = p.detach().reshape(-1).float()
            G.view(-1)[fb * BLOCKSIZE : fb * BLOCKSIZE + n] = p.grad.reshape(-1).float()
            lane_ok.view(-1)[fb * BLOCKSIZE : fb * BLOCKSIZE + n] = True
    key = tuple(active)
    if key not in bucket.reference_index:
        owner = bucket.blk_tensor.long()
        bucket.reference_index[key] = (torch.tensor(active, device=device)[owner],
                                       torch.tensor(bucket.group_rows, device=device)[owner],
                                       torch.tensor(bucket.step_idx, device=device)[owner])
    row_on, group_row, step_row = bucket.reference_index[key]
    if skip is not None:  # device-side skip: no host sync
        row_on = row_on & (skip.reshape(()) == 0)
    P_before = P.clone() if skip is not None else None
    rows_hyper = hyper[group_row]  # [nb, 5]
    lr, beta1, beta2, eps, wd = (rows_hyper[:, i : i + 1] for i in range(_NHYPER))
    step = steps[step_row][:, None]
    mask = lane_ok & row_on[:, None]

    if bucket.eight_bit:
        code_m, code_v = codes
        M = code_m[bucket.m.view(nb, BLOCKSIZE).long()] * bucket.absmax_m[:, None]
        V = code_v[bucket.v.view(nb, BLOCKSIZE).long()] * bucket.absmax_v[:, None]
    else:
        M, V = bucket.m.view(nb, BLOCKSIZE), bucket.v.view(nb, BLOCKSIZE)
    P, M, V = adamw_rows_reference(P, G, M, V, lr, beta1, beta2, eps, wd, step)
    if P_before is not None:
        P = torch.where(mask, P, P_before)
    M = torch.where(mask, M, torch.zeros_like(M))
    V = torch.where(mask, V, torch.zeros_like(V))

    if bucket.eight_bit:
        new_am, new_av = M.abs().amax(dim=1), V.amax(dim=1)
        q_m = nearest_code_index(M * _inverse_absmax(new_am)[:, None], code_m).to(torch.uint8)
        q_v = nearest_code_index(V * _inverse_absmax(new_av)[:, None], code_v, True).to(torch.uint8)
        old_qm, old_qv = bucket.m.view(nb, BLOCKSIZE), bucket.v.view(nb, BLOCKSIZE)
        old_qm.copy_(torch.where(mask, q_m, old_qm))
        old_qv.copy_(torch.where(mask, q_v, old_qv))
        bucket.absmax_m.copy_(torch.where(row_on, new_am, bucket.absmax_m))
        bucket.absmax_v.copy_(torch.where(row_on, new_av, bucket.absmax_v))
    else:
        old_m, old_v = bucket.m.view(nb, BLOCKSIZE), bucket.v.view(nb, BLOCKSIZE)
        old_m.copy_(torch.where(mask, M, old_m))
        old_v.copy_(torch.where(mask, V, old_v))

    if stochastic and bucket.dtype == torch.bfloat16:
        noise = torch.randint(0, 1 << 16, P.shape, device=device, dtype=torch.int64, generator=generator)
        P_out = _stochastic_round_bf16(P, noise)
    else:
        P_out = P.to(bucket.dtype)
    flat = P_out.view(-1)
    for p, fb, on in zip(bucket.params, bucket.first_block, active):
        if on:
            p.data.view(-1).copy_(flat[fb * BLOCKSIZE : fb * BLOCKSIZE + p.numel()])


def step_launch(blk_tensor, table, steps, hyper, m, v, absmax_m, absmax_v, codes, seed, skip, n_blocks: int,
                salt: int, p_dtype: torch.dtype, eight_bit: bool, stochastic: bool):
    """The kernel's launch for one bucket (absmax_m/v: any tensor when not eight_bit, unused). On CPU
    tensors (the interpreter) many blocks per program, whose cost there is per program; GPU_ROWS otherwise."""
    interpreted = m.device.type == "cpu"
    rows = min(INTERPRETER_ROWS if interpreted else GPU_ROWS, triton.next_power_of_2(max(n_blocks, 1)))
    code_m, code_v = codes
    args = (blk_tensor, table, steps, hyper, m, v, absmax_m, absmax_v, code_m, code_v, seed, skip, n_blocks, salt)
    constexprs = dict(P_DTYPE=_tl_dtype(p_dtype), EIGHT_BIT=eight_bit, STOCHASTIC=bool(stochastic and p_dtype == torch.bfloat16),
                      ROWS=rows, BLOCK=BLOCKSIZE, NCOL=TABLE_COLUMNS, NHYPER=_NHYPER)
    return autotune.Launch(_adamw_blockwise_kernel, (triton.cdiv(n_blocks, rows),), args, constexprs,
                           1 if interpreted else GPU_NUM_WARPS)


def _bucket_step_triton(bucket: _Bucket, steps, hyper, codes, seed, stochastic: bool, skip) -> None:
    am = bucket.absmax_m if bucket.eight_bit else bucket.m  # unused when not EIGHT_BIT
    av = bucket.absmax_v if bucket.eight_bit else bucket.v
    launch = step_launch(bucket.blk_tensor, bucket.table, steps, hyper, bucket.m, bucket.v, am, av, codes, seed, skip,
                         bucket.n_blocks, bucket.salt, bucket.dtype, bucket.eight_bit, stochastic)
    launch(wrap=False)


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------


def _check_param(p: torch.Tensor) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"AdamW8bitFused: parameters must be tensors, got {type(p).__name__}")
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"AdamW8bitFused: parameter dtype {p.dtype} not supported because the kernel handles "
            "float32 and bfloat16 parameters only"
        )
    if p.is_sparse:
        raise TypeError("AdamW8bitFused: sparse parameters not supported because state is blockwise-dense")


class AdamW8bitFused(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit state, one kernel launch per (dtype, 8-bit/fp32-state) bucket,
    no host sync in ``step()`` (CUDA-graph capturable). See the module docstring for the formula,
    the state layout and the launch design."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = MIN_8BIT_SIZE,
        stochastic_rounding: bool = False,
        seed: int | None = None,
    ):
        _check_hyper(lr, betas, eps, weight_decay)
        if int(min_8bit_size) < 0:
            raise ValueError(f"AdamW8bitFused: min_8bit_size must be >= 0, got {min_8bit_size}")
        self.min_8bit_size = int(min_8bit_size)
        self.stochastic_rounding = bool(stochastic_rounding)
        self._seed_value = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self._buckets: list[_Bucket] | None = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._build()

    # ---- construction -----------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            _check_param(p)
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check_hyper(g["lr"], g["betas"], g["eps"], g["weight_decay"])
        if self._buckets is not None:  # a group added after construction: rebuild, keep state
            saved = {p: {k: t.clone() for k, t in st.items()} for p, st in self.state.items()}
            self._build()
            with torch.no_grad():
                for p, st in saved.items():
                    self._load_param_state(p, st)

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _build(self) -> None:
        params = self._all_params()
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"AdamW8bitFused: parameters on several devices {sorted(map(str, devices))} not supported "
                "because one launch covers a bucket; use one optimizer per device"
            )
        self._device = devices.pop() if devices else torch.device("cpu")
        dev = self._device
        for p in params:
            if not p.is_contiguous():
                p.data = p.data.contiguous()  # once, at construction: addresses stay fixed afterwards
        self._steps = torch.zeros(len(params), dtype=torch.float32, device=dev)
        self._active = torch.zeros(len(params), dtype=torch.float32, device=dev)
        self._active_key: tuple | None = None
        self._hyper = torch.zeros(len(self.param_groups), _NHYPER, dtype=torch.float32, device=dev)
        self._hyper_key: list | None = None
        self._seed = torch.tensor([self._seed_value], dtype=torch.int64, device=dev)
        self._no_skip = torch.zeros(1, dtype=torch.float32, device=dev)  # found_inf when none is set
        self._codes = (code_on(True, dev), code_on(False, dev))
        self._active_staging = (
            torch.empty(len(params), dtype=torch.float32).pin_memory() if dev.type == "cuda" else None
        )
        buckets: dict[tuple, _Bucket] = {}
        index = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                key = (p.dtype, p.numel() >= self.min_8bit_size)
                if key not in buckets:
                    buckets[key] = _Bucket(p.dtype, key[1], salt=len(buckets))
                buckets[key].add(p, gi, index)
                index += 1
        self._buckets = [b for b in buckets.values() if b.n_blocks > 0]
        self._param_index = {id(p): i for i, p in enumerate(params)}
        self.state.clear()
        for b in self._buckets:
            b.allocate(dev)
            for k, p in enumerate(b.params):
                self.state[p] = {"step": self._steps[b.step_idx[k]], **b.views(k)}
        for p in params:  # empty tensors: nothing to do, but keep a step like torch does
            if p not in self.state:
                self.state[p] = {"step": self._steps[self._param_index[id(p)]]}

    # ---- per-step host bookkeeping (no device sync) -------------------------------------------

    def _sync_hyper(self) -> None:
        values = []
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                if lr.device != self._device or lr.numel() != 1:
                    raise ValueError(
                        f"AdamW8bitFused: a tensor lr must be a 1-element tensor on {self._device} (got "
                        f"{tuple(lr.shape)} on {lr.device}) so that step() can read it without a host copy"
                    )
                lr = None  # copied device-to-device below, every step
            b1, b2 = group["betas"]
            values.append([lr, float(b1), float(b2), float(group["eps"]), float(group["weight_decay"])])
        previous = self._hyper_key
        for gi, row in enumerate(values):
            for col, val in enumerate(row):
                if val is None:
                    self._hyper[gi, col].copy_(self.param_groups[gi]["lr"].reshape(()))
                elif previous is None or previous[gi][col] != val:
                    self._hyper[gi, col].fill_(val)
        self._hyper_key = values

    def _sync_pointers(self) -> None:
        active = []
        for b in self._buckets:
            grad_addrs = []
            for p in b.params:
                g = p.grad
                if g is None:
                    grad_addrs.append(0)
                    active.append((self._param_index[id(p)], 0.0))
                    continue
                if g.is_sparse:
                    raise TypeError("AdamW8bitFused: sparse gradients not supported because state is blockwise-dense")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise ValueError(
                        f"AdamW8bitFused: grad {tuple(g.shape)} {g.dtype} on {g.device} does not match its "
                        f"parameter {tuple(p.shape)} {p.dtype} on {p.device}"
                    )
                if not g.is_contiguous():  # e.g. expanded (stride 0) grads: the kernel reads flat memory
                    p.grad = g = g.contiguous()
                grad_addrs.append(g.data_ptr())
                active.append((self._param_index[id(p)], 1.0))
            param_addrs = [p.data_ptr() for p in b.params]
            key = (tuple(param_addrs), tuple(grad_addrs))
            if key != b.ptr_key:
                for p in b.params:
                    if not p.is_contiguous():
                        raise ValueError("AdamW8bitFused: a parameter became non-contiguous after construction")
                _upload(b.table, b.host_table(grad_addrs), b)
                b.ptr_key = key
            b.any_active = any(grad_addrs)
        active_key = tuple(sorted(active))
        if active_key != self._active_key:
            host = torch.zeros(len(self._param_index), dtype=torch.float32)
            for i, a in active:
                host[i] = a
            if self._device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                if self._active_staging is None:
                    raise RuntimeError("adamw8bit: grads changed twice during graph capture; step eagerly once first")
                self._active_staging.copy_(host)
                self._active.copy_(self._active_staging, non_blocking=True)
                _GRAPH_OWNED.append(self._active_staging)
                self._active_staging = None
            else:
                _upload(self._active, host)
                if self._device.type == "cuda" and self._active_staging is None:
                    self._active_staging = torch.empty_like(host).pin_memory()
            self._active_key = active_key

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._buckets:
            return loss
        self._sync_hyper()
        self._sync_pointers()
        # found_inf (a 0-dim device tensor, 1 = skip), as torch's fused optimizers take it from GradScaler:
        # a skipped step leaves weights, moments and step counts as they were, decided on the device.
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            self._steps.add_(self._active)
            skip = self._no_skip
        else:
            skip = found_inf.to(device=self._steps.device, dtype=torch.float32).reshape(1)
            self._steps.add_(self._active * (1.0 - skip))
        for b in self._buckets:
            if not b.any_active:
                continue
            backend = dispatch.resolve("adamw8bit", b.params[0])
            if backend == "triton":
                _bucket_step_triton(b, self._steps, self._hyper, self._codes, self._seed, self.stochastic_rounding,
                                    skip)
            else:
                _bucket_step_reference(b, self._steps, self._hyper, self._codes, self.stochastic_rounding,
                                       skip=None if found_inf is None else skip)
        return loss

    # ---- memory and state dicts ------------------------------------------------------------------

    def state_nbytes(self) -> dict[str, int]:
        """Bytes held by the optimizer on the device: moments, absmax, step counters, tables."""
        out = {"moments_8bit": 0, "absmax": 0, "moments_fp32": 0, "steps": 0, "tables": 0}
        for b in self._buckets:
            key = "moments_8bit" if b.eight_bit else "moments_fp32"
            out[key] += b.m.nbytes + b.v.nbytes
            if b.eight_bit:
                out["absmax"] += b.absmax_m.nbytes + b.absmax_v.nbytes
            out["tables"] += b.blk_tensor.nbytes + b.table.nbytes
        out["steps"] = self._steps.nbytes + self._active.nbytes
        out["tables"] += self._hyper.nbytes + self._seed.nbytes
        return out

    def state_dict(self) -> dict:
        sd = super().state_dict()
        # Live entries are views of the flat buffers: save standalone copies instead.
        sd["state"] = {
            k: {name: (t.clone() if isinstance(t, torch.Tensor) else t) for name, t in st.items()}
            for k, st in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"AdamW8bitFused.load_state_dict: {len(saved_groups)} saved param groups, optimizer has {len(groups)}"
            )
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"AdamW8bitFused.load_state_dict: group {gi} saved with {len(sg['params'])} params, "
                    f"optimizer has {len(g['params'])}"
                )
            for key in ("lr", "betas", "eps", "weight_decay"):
                if key in sg:
                    g[key] = tuple(sg[key]) if key == "betas" else sg[key]
        saved_ids = [i for sg in saved_groups for i in sg["params"]]
        params = self._all_params()
        with torch.no_grad():
            for saved_id, p in zip(saved_ids, params):
                st = state_dict["state"].get(saved_id)
                self._load_param_state(p, st if st is not None else {})
        self._hyper_key = None  # push every hyper-parameter at the next step

    def _load_param_state(self, p: torch.Tensor, saved: dict) -> None:
        live = self.state[p]
        step = saved.get("step", 0)
        live["step"].copy_(torch.as_tensor(step, dtype=torch.float32).reshape(()))
        if "exp_avg" not in live:
            return
        if "exp_avg" not in saved:
            for name, t in live.items():
                if name != "step":
                    t.zero_()
            return
        m, v = saved["exp_avg"], saved["exp_avg_sq"]
        if m.shape != p.shape or v.shape != p.shape:
            raise ValueError(
                f"AdamW8bitFused.load_state_dict: saved moments of shape {tuple(m.shape)} for a parameter "
                f"of shape {tuple(p.shape)}"
            )
        saved_8bit = m.dtype == torch.uint8
        live_8bit = live["exp_avg"].dtype == torch.uint8
        code_m, code_v = code_on(True, p.device), code_on(False, p.device)
        if saved_8bit and live_8bit:
            for name in ("exp_avg", "exp_avg_sq", "absmax_exp_avg", "absmax_exp_avg_sq"):
                live[name].copy_(saved[name])
        elif saved_8bit:  # we keep fp32 state for this tensor: dequantise
            live["exp_avg"].copy_(dequantize_blockwise(m.to(p.device), saved["absmax_exp_avg"].to(p.device), code_m))
            live["exp_avg_sq"].copy_(
                dequantize_blockwise(v.to(p.device), saved["absmax_exp_avg_sq"].to(p.device), code_v)
            )
        elif live_8bit:  # fp32 moments (torch AdamW, or a smaller min_8bit_size): quantise
            for name, src, code in (("exp_avg", m, code_m), ("exp_avg_sq", v, code_v)):
                q, absmax = quantize_blockwise(src.to(p.device).float(), code, positive_floor=code is code_v)
                live[name].copy_(q)
                live["absmax_" + name].copy_(absmax)
        else:
            live["exp_avg"].copy_(m)
            live["exp_avg_sq"].copy_(v)


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    lr_value = lr if not isinstance(lr, torch.Tensor) else None
    if lr_value is not None and not float(lr_value) >= 0.0:
        raise ValueError(f"AdamW8bitFused: lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"AdamW8bitFused: betas must be two values in [0, 1), got {betas}")
    if not float(eps) > 0.0:
        raise ValueError(f"AdamW8bitFused: eps must be > 0, got {eps}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"AdamW8bitFused: weight_decay must be >= 0, got {weight_decay}")
    if not math.isfinite(float(eps)):
        raise ValueError(f"AdamW8bitFused: eps must be finite, got {eps}")
