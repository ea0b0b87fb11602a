"""Optimizer choice and state-dict conversion between optimizers (so a resumed run can switch).

``build_optimizer(name, params, *, lr, betas, eps, weight_decay)`` with ``name`` one of
:data:`OPTIMIZERS`:

* ``adamw8bit-fused``: ours, :class:`kernels.adamw8bit.AdamW8bitFused` (CUDA-graph capturable);
* ``adamw8bit-bnb``: ``bitsandbytes.optim.AdamW8bit`` (the default of the eager step);
* ``adamw``: ``torch.optim.AdamW``, fused (and capturable for a captured step);
* ``muon``: :class:`MuonAdamW`, Muon on the model's hidden matrices and AdamW on the rest.

Conversion. Every optimizer's per-parameter state is read into one neutral form — either 8-bit
(uint8 exp_avg with the signed dynamic code, uint8 exp_avg_sq with the unsigned one, fp32 absmax per
256-element block) or fp32 (exp_avg, exp_avg_sq), plus the step count — and written out in the
destination's layout. Ours and bitsandbytes use the same code tables, block size and size rule
(tensors of at least 4,096 elements are 8-bit), so between them the bytes are copied unchanged.
Into ``adamw`` 8-bit moments are dequantised (cast to the parameter's dtype, as torch keeps them);
out of ``adamw`` fp32 moments are quantised blockwise. Where source and destination disagree on
whether a tensor is 8-bit (e.g. another ``min_8bit_size``) the moments are (de)quantised as needed.
Hyper-parameters (lr, betas, eps, weight_decay) come from the source; every other group key takes
the destination optimizer's value.

Use :func:`load_state_dict_any` on resume: it detects which optimizer wrote the state dict and
converts it for the optimizer at hand.
"""

from __future__ import annotations

import copy
import logging
import math

import torch

from fastdiff.config import OPTIMIZERS
from fastdiff_kernels.adamw8bit import (
    MIN_8BIT_SIZE,
    AdamW8bitFused,
    code_on,
    dequantize_blockwise,
    quantize_blockwise,
)

_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")
_BNB_WRAP_KEY = "__bnb_optimizer_quant_state__"


def _check_name(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _flat_params(params) -> list[torch.Tensor]:
    out = []
    for item in params:
        if isinstance(item, dict):
            ps = item["params"]
            out += [ps] if isinstance(ps, torch.Tensor) else list(ps)
        else:
            out.append(item)
    return out


class _DropHubKernelWarning(logging.Filter):
    """bitsandbytes' CPU backend tries `from kernels import get_kernel` (Hugging Face's `kernels` package, for a
    4-bit GEMM we never use) and warns on every start where that package is not installed. The warning is about
    4-bit inference only: drop it. (fastdiff's own kernels import as `fastdiff_kernels`, so they never stand in
    the way of that lookup: tests/test_kernels_import_name.py.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def _import_bitsandbytes():
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelWarning())
    import bitsandbytes

    return bitsandbytes


MUON_MOMENTUM = 0.95  # torch's and Keller Jordan's default


def orthogonalise(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Muon's Newton-Schulz iteration on one matrix (rows, cols) or a stack of them (n, rows, cols), rows <= cols:
    the same quintic iteration as ``torch.optim.Muon`` (bf16, Frobenius-normalised, x <- a x + (b G + c G G) x
    with G = x x^T), a stack all at once. Returns bf16 of the input's shape. (One matrix goes through the 2-D
    ``addmm``, as torch's does: the batched call with a batch of one measured 5-15% slower on a CPU.)"""
    a, b, c = coefficients
    fused_add = torch.addmm if updates.ndim == 2 else torch.baddbmm
    x = updates.bfloat16()
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = fused_add(x, fused_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def muon_lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor torch's Muon multiplies its lr by for a (rows, cols) matrix: Keller Jordan's sqrt(max(1, rows /
    cols)) ("original", torch's default) or Moonshot's 0.2 sqrt(max(rows, cols)) ("match_rms_adamw")."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"Muon: adjust_lr_fn={adjust_lr_fn!r} not supported because only 'original' and "
                     "'match_rms_adamw' are defined")


# Matrices stacked per Newton-Schulz call, at most this many elements in all: batching pays where the matrices are
# small and each call's overhead is most of its time; a stack of large matrices leaves the caches that one matrix
# fits in, and ran 5-15% slower than torch's one at a time at width 384 (bench/bench_muon.py, one CPU thread).
STACK_ELEMENTS = 1 << 19


def _stacks(shapes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of `shapes` grouped by shape, each group cut into stacks of at most STACK_ELEMENTS elements."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(i)
    stacks = []
    for shape, members in by_shape.items():
        size = max(1, STACK_ELEMENTS // math.prod(shape))
        stacks += [members[k:k + size] for k in range(0, len(members), size)]
    return stacks


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with the Newton-Schulz iteration batched over matrices of one shape.

    Why: torch's Muon orthogonalises one matrix at a time, five iterations of three small matmuls each, and for a
    small model those calls are most of a training step's extra cost: on `tiny`'s 28 matrices torch's Muon step
    takes 23.9 ms at one CPU thread (46% of the bf16 matmul rate measured on the same shapes), fused AdamW 1.0 ms
    (`bench/bench_muon.py`, `profiles/cpu/bench_muon.json`). A transformer's hidden matrices come in a few shapes
    (`tiny`: 4 once each is laid out with its short side first), so this steps each shape as one stack: 17.6 ms
    there (63% of that rate, 1.36x). Large matrices are not stacked (STACK_ELEMENTS): at width 384 both take
    2.1 s a step on one thread, at 82-85% of the rate, so there batching has nothing left to win. The momentum
    update and the weight decay are torch's, each matrix's orthogonalised update matches torch's to bf16 rounding
    (``tests/test_optim.py``), and the state (one ``momentum_buffer`` per matrix) and the hyper-parameters are
    torch's own, so a checkpoint of either loads into the other."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            momentum, lr = group["momentum"], float(group["lr"])
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            # a matrix taller than wide is orthogonalised transposed, as torch does: its Gram matrix is the small one
            tall = [u.shape[0] > u.shape[1] for u in updates]
            wide = [u.mT if t else u for u, t in zip(updates, tall)]
            for members in _stacks([tuple(u.shape) for u in wide]):
                stack = wide[members[0]] if len(members) == 1 else torch.stack([wide[i] for i in members])
                ortho = orthogonalise(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for i, o in zip(members, ortho.unbind(0) if len(members) > 1 else [ortho]):
                    p = params[i]
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(o.mT if tall[i] else o, alpha=-lr * muon_lr_scale(group["adjust_lr_fn"], p.shape))
        return loss


class MuonAdamW:
    """Muon on a model's hidden matrices and AdamW on its other parameters, stepped as one optimizer.

    Muon (Jordan et al. 2024, ``torch.optim.Muon``; here :class:`BatchedMuon`, the same step batched) keeps SGD
    momentum per weight matrix and steps along the momentum orthogonalised by a Newton-Schulz iteration: every
    direction of the matrix moves by about the same amount, where AdamW's per-element steps let a few directions
    dominate. The step is scaled by 0.2 sqrt(max(rows, columns)) (Moonshot's ``match_rms_adamw``), so it takes
    AdamW's learning rate, schedule and weight decay unchanged. Which matrices: those the model names
    (``VideoDiT.hidden_matrices``: the weights of its transformer blocks' linear layers); embeddings, the output
    layer, biases, convolutions and bias tables stay on AdamW, as Muon is meant to be used.

    Measured on the tiny recipe (profiles/learning/README.md, "Muon"): 18% lower held-out loss than AdamW after
    1,500 steps, lower at every noise level, and the study's lowest held-out loss at its CPU budget on two seeds
    (12% and 8% below the AdamW rows), at about 20% more CPU per step with torch's Muon (the Newton-Schulz matmuls; a
    loaded box; batched, the Muon step costs 6 ms less at one thread). Its samples move the balls at the true speed
    and merge them more often where they meet, so `tiny` keeps AdamW. Its state is one fp32 momentum per matrix
    element (4 B, against AdamW's 8 B), and it converts to no AdamW's state, so a run keeps its optimizer when it
    resumes. Eager step only: torch's Muon takes no ``found_inf``, so the sync-free step could not skip a non-finite
    step with it.

    The optimizer interface the trainer uses: ``param_groups`` (the schedule writes each group's lr), ``step``,
    ``zero_grad``, ``state_dict`` / ``load_state_dict`` (each part's under "muon" and "adamw")."""

    def __init__(self, params, matrices, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 momentum: float = MUON_MOMENTUM):
        params = _flat_params(params)
        chosen = {id(p) for p in matrices}
        hidden = [p for p in params if id(p) in chosen]
        rest = [p for p in params if id(p) not in chosen]
        if not hidden:
            raise ValueError("optim.name=muon: none of the parameters is a hidden matrix the model names, so Muon "
                             "would have nothing to step; use an AdamW")
        flat = [tuple(p.shape) for p in hidden if p.ndim != 2]
        if flat:
            raise ValueError(f"optim.name=muon: Muon orthogonalises 2-D matrices; got shapes {flat}")
        # Only the parts this model has: a model whose every parameter is a hidden matrix has no AdamW part.
        self.parts = {"muon": BatchedMuon(hidden, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                          adjust_lr_fn="match_rms_adamw")}
        if rest:
            self.parts["adamw"] = torch.optim.AdamW(rest, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                                    fused=True)

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {p: st for part in self.parts.values() for p, st in part.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.parts):
            raise ValueError(f"optim.name=muon: a saved state with parts {sorted(state_dict)} is not Muon's "
                             f"({sorted(self.parts)})")
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])


def build_optimizer(
    name: str,
    params,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float,
    capturable: bool = False,
    matrices=None,
) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer called ``name`` (one of :data:`OPTIMIZERS`) over ``params`` (tensors or groups).

    torch's AdamW is always its fused kernel, on CPU as on CUDA: the one that honours ``found_inf`` (the sync-free
    step skips through it), and on CPU the fastest (a tiny-preset step: 244 ms fused vs 282 ms foreach vs 490 ms
    with bitsandbytes' 8-bit AdamW, one thread, scripts/learning_study.py's notes). ``capturable`` keeps its step
    count on the device, which CUDA-graph capture requires of it (run.step=graph). ``matrices``: for ``muon``, the
    parameters Muon steps (the model's ``hidden_matrices``)."""
    _check_name(name)
    params = list(params)
    if name == "muon":
        return MuonAdamW(params, matrices or [], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit-fused":
        return AdamW8bitFused(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit-bnb":
        try:
            bnb = _import_bitsandbytes()
        except Exception as exc:  # pragma: no cover - bitsandbytes is a dependency
            raise RuntimeError(
                f"optimizer 'adamw8bit-bnb' not available because bitsandbytes fails to import: {exc}"
            ) from exc
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True,
                             capturable=capturable)


def optimizer_name(optimizer: torch.optim.Optimizer | MuonAdamW) -> str:
    """Which entry of :data:`OPTIMIZERS` this optimizer instance is."""
    if isinstance(optimizer, MuonAdamW):
        return "muon"
    if isinstance(optimizer, AdamW8bitFused):
        return "adamw8bit-fused"
    if type(optimizer).__module__.startswith("bitsandbytes"):
        return "adamw8bit-bnb"
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    raise ValueError(f"optimizer {type(optimizer).__name__} is not one of {', '.join(OPTIMIZERS)}")


def detect_format(state_dict: dict) -> str:
    """Which optimizer wrote ``state_dict`` (by its per-parameter keys)."""
    if "muon" in state_dict:
        return "muon"
    for st in state_dict["state"].values():
        if "state1" in st or _BNB_WRAP_KEY in st:
            return "adamw8bit-bnb"
        if "absmax_exp_avg" in st:
            return "adamw8bit-fused"
    groups = state_dict.get("param_groups", [])
    if groups and ("t_alpha" in groups[0] or "alpha" in groups[0]):
        return "adamw8bit-bnb"
    if groups and "amsgrad" in groups[0]:
        return "adamw"
    return "adamw8bit-fused"


# ---- neutral per-parameter state -------------------------------------------------------------


def _read_state(st: dict, fmt: str) -> dict | None:
    """-> {"step": float, "q": (m_u8, v_u8, absmax_m, absmax_v)} or {"step", "fp": (m, v)}; None if empty."""
    if not st:
        return None
    if fmt == "adamw8bit-bnb":
        st = dict(st)
        st.update(st.pop(_BNB_WRAP_KEY, {}))
        step = float(st["step"])
        if st["state1"].dtype == torch.uint8:
            m, v = st["state1"], st["state2"]
            am, av = st["absmax1"], st["absmax2"]
            # bitsandbytes keeps its code tables in the state; if they differ from ours, go through fp32.
            if not (
                torch.equal(st["qmap1"].cpu(), code_on(True, torch.device("cpu")))
                and torch.equal(st["qmap2"].cpu(), code_on(False, torch.device("cpu")))
            ):
                return {"step": step, "fp": (dequantize_blockwise(m, am, st["qmap1"]),
                                             dequantize_blockwise(v, av, st["qmap2"]))}
            return {"step": step, "q": (m, v, am, av)}
        return {"step": step, "fp": (st["state1"].float(), st["state2"].float())}
    step = float(st["step"])
    if "exp_avg" not in st:
        return {"step": step, "fp": None}
    if st["exp_avg"].dtype == torch.uint8:
        moments = (st["exp_avg"], st["exp_avg_sq"], st["absmax_exp_avg"], st["absmax_exp_avg_sq"])
        return {"step": step, "q": moments}
    return {"step": step, "fp": (st["exp_avg"].float(), st["exp_avg_sq"].float())}


def _as_q(neutral: dict, like: torch.Tensor):
    if "q" in neutral:
        return neutral["q"]
    m, v = neutral["fp"] if neutral["fp"] is not None else (torch.zeros_like(like, dtype=torch.float32),) * 2
    dev = m.device
    qm, am = quantize_blockwise(m, code_on(True, dev))
    qv, av = quantize_blockwise(v, code_on(False, dev), positive_floor=True)
    return qm, qv, am, av


def _as_fp(neutral: dict, like: torch.Tensor):
    if "fp" in neutral:
        if neutral["fp"] is None:
            return torch.zeros_like(like, dtype=torch.float32), torch.zeros_like(like, dtype=torch.float32)
        return neutral["fp"]
    m, v, am, av = neutral["q"]
    dev = m.device
    return dequantize_blockwise(m, am, code_on(True, dev)), dequantize_blockwise(v, av, code_on(False, dev))


def _write_state(neutral: dict, fmt: str, p: torch.Tensor, min_8bit_size: int) -> dict:
    eight_bit = p.numel() >= min_8bit_size
    step = neutral["step"]
    if fmt == "adamw":
        m, v = _as_fp(neutral, p)
        return {"step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": m.reshape(p.shape).to(p.dtype), "exp_avg_sq": v.reshape(p.shape).to(p.dtype)}
    if fmt == "adamw8bit-fused":
        if eight_bit:
            qm, qv, am, av = _as_q(neutral, p)
            return {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": qm.reshape(p.shape),
                    "exp_avg_sq": qv.reshape(p.shape), "absmax_exp_avg": am, "absmax_exp_avg_sq": av}
        m, v = _as_fp(neutral, p)
        return {"step": torch.tensor(step, dtype=torch.float32),
                "exp_avg": m.reshape(p.shape).float(), "exp_avg_sq": v.reshape(p.shape).float()}
    # bitsandbytes: int step, state1/state2, code tables in the state
    if eight_bit:
        qm, qv, am, av = _as_q(neutral, p)
        return {"step": int(round(step)), "state1": qm.reshape(p.shape), "state2": qv.reshape(p.shape),
                "absmax1": am, "absmax2": av,
                "qmap1": code_on(True, qm.device).clone(), "qmap2": code_on(False, qm.device).clone()}
    m, v = _as_fp(neutral, p)
    return {"step": int(round(step)), "state1": m.reshape(p.shape).float(),
            "state2": v.reshape(p.shape).float()}


_DEFAULT_GROUPS: dict[tuple[str, bool], dict] = {}


def _group_defaults(name: str, on_cuda: bool) -> dict:
    """Every group key the destination optimizer uses, with its default (from a throwaway instance)."""
    key = (name, on_cuda)
    if key not in _DEFAULT_GROUPS:
        dummy = torch.zeros(1, requires_grad=True)
        opt = build_optimizer(name, [dummy], lr=1e-3, weight_decay=0.0)
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        if name == "adamw" and on_cuda:
            group["fused"], group["foreach"] = True, None
        _DEFAULT_GROUPS[key] = group
    return dict(_DEFAULT_GROUPS[key])


def convert_state_dict(
    state_dict: dict,
    src_name: str,
    dst_name: str,
    params,
    *,
    min_8bit_size: int = MIN_8BIT_SIZE,
    dst_param_groups: list[dict] | None = None,
) -> dict:
    """``state_dict`` written by optimizer ``src_name`` -> the same training state for ``dst_name``.

    ``params``: the parameters (or param-group dicts) in the order the optimizer was given them, for
    shapes, dtypes and devices. ``dst_param_groups``: the destination optimizer's groups, whose
    non-hyper-parameter keys are kept (default: that optimizer's defaults).
    """
    _check_name(src_name)
    _check_name(dst_name)
    if "muon" in (src_name, dst_name):
        raise ValueError(f"converting optimizer state {src_name} -> {dst_name} is not supported because Muon keeps "
                         f"one momentum per matrix and no second moment, which no AdamW's state can stand for; "
                         f"resume with optim.name={src_name}, or start the optimizer afresh with the checkpoint's "
                         f"weights (fastdiff train --set optim.name={dst_name} on a new run)")
    flat = _flat_params(params)
    saved_groups = state_dict["param_groups"]
    saved_ids = [i for g in saved_groups for i in g["params"]]
    if len(saved_ids) != len(flat):
        raise ValueError(
            f"convert_state_dict: the state dict covers {len(saved_ids)} parameters but "
            f"{len(flat)} were given"
        )
    on_cuda = bool(flat) and all(p.is_cuda for p in flat)
    new_state = {}
    for new_id, (saved_id, p) in enumerate(zip(saved_ids, flat)):
        neutral = _read_state(state_dict["state"].get(saved_id, {}), src_name)
        if neutral is None:
            continue
        for key in ("q", "fp"):
            if neutral.get(key) is not None:
                neutral[key] = tuple(t.to(p.device) for t in neutral[key])
        new_state[new_id] = _write_state(neutral, dst_name, p, min_8bit_size)
    new_groups, start = [], 0
    for gi, sg in enumerate(saved_groups):
        base = (
            {k: v for k, v in dst_param_groups[gi].items() if k != "params"}
            if dst_param_groups is not None
            else _group_defaults(dst_name, on_cuda)
        )
        for k in _HYPER_KEYS:
            if k in sg:
                base[k] = copy.deepcopy(sg[k])
        n = len(sg["params"])
        base["params"] = list(range(start, start + n))
        start += n
        new_groups.append(base)
    return {"state": new_state, "param_groups": new_groups}


def load_state_dict_any(
    optimizer: torch.optim.Optimizer, state_dict: dict, src_name: str | None = None
) -> None:
    """Load a state dict written by any of :data:`OPTIMIZERS` into ``optimizer``, converting if needed."""
    dst_name = optimizer_name(optimizer)
    src_name = src_name or detect_format(state_dict)
    if src_name == dst_name:
        optimizer.load_state_dict(state_dict)
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    min_8bit = getattr(optimizer, "min_8bit_size", None)
    if min_8bit is None:
        min_8bit = getattr(getattr(optimizer, "args", None), "min_8bit_size", MIN_8BIT_SIZE)
    converted = convert_state_dict(
        state_dict, src_name, dst_name, params,
        min_8bit_size=min_8bit, dst_param_groups=optimizer.param_groups,
    )
    optimizer.load_state_dict(converted)
