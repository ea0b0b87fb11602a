"""Ahead-of-time compilation of every Triton kernel in fastdiff_kernels for the GPUs users run, without a GPU.

The Triton interpreter accepts programs the real compiler refuses, and it says nothing about registers or
shared memory. This sweep compiles each (kernel, launch config, dtype, arch) spec with Triton's own compiler
and bundled ptxas for sm_80 (A100), sm_86 (RTX 30xx), sm_89 (RTX 40xx) and sm_90 (H100/H200) and records,
per spec: compiled or the compiler's error, compile seconds, shared memory against the arch's per-block
opt-in limit, registers per thread and spilled bytes (ptxas' own report).

A spec is built by the kernel module's launch function (``fwd_launch``, ``step_launch``, ...: the same
function its launcher calls) on meta tensors of a representative call, then bound by Triton's JIT binder,
so the signature, constexprs and specialisations (16-byte alignment, ints equal to 1 or divisible by 16)
are exactly those of a real launch of that call. Specs run in worker processes (``--jobs``); one over
``--timeout`` seconds is recorded as "timeout" and its worker killed: a compile that slow would stall a
user's tuning sweep, so it counts as a defect like a compile error.

    python -m fastdiff_kernels.aot --out profiles/aot [--jobs N] [--timeout S] [--subset defaults|all]
    python -m fastdiff_kernels.aot --out profiles/aot --table     # rebuild aot_table.py from the JSONs

Writes ``<out>/<triton version>.json`` (every record) and ``.md`` (a summary table) for ``--subset all``,
``<version>-defaults.{json,md}`` for ``--subset defaults``. ``--table`` turns the full sweeps found in
``<out>`` into fastdiff_kernels/aot_table.py: per (Triton minor version, arch), the tuning candidates to
drop (compile error, timeout, over shared memory) and replacements for heuristic defaults that spill or do
not fit (read at run time by fastdiff_kernels.autotune). Compiled results are cached by compile key under
``--cache`` (default ``$FASTDIFF_AOT_CACHE`` or ~/.cache/fastdiff/aot), so a re-run compiles only what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
ARCH_NAMES = {80: "sm_80 (A100)", 86: "sm_86 (RTX 30xx)", 89: "sm_89 (RTX 40xx)", 90: "sm_90 (H100/H200)"}
# SMs of a representative GPU per arch (A100, RTX 3090, RTX 4090, H100 SXM): adaLN's backward sizes its
# split count from the SM count, which changes one integer's specialisation.
SM_COUNT = {80: 108, 86: 82, 89: 128, 90: 132}
DEFAULT_TIMEOUT = 120.0
ERROR_CHARS = 1500


# --------------------------------------------------------------------------------------------------
# Specs: what to compile
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    kernel: str  # e.g. "temporal_attention.bwd"
    op: str  # the op's name in profiles/ and in the AOT table ("" for kernels without tunable configs)
    key: str  # the op's config key ("" likewise)
    shape: dict  # the representative call
    config: dict
    dtype: str
    arch: int
    roles: tuple[str, ...]  # "default" (what an untuned GPU runs), "heuristic" (default_config), "candidate"

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"roles": list(self.roles)}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _merge(specs: list[Spec]) -> list[Spec]:
    """One spec per (kernel, key, shape, config, dtype, arch), with the union of its roles."""
    merged: dict[str, Spec] = {}
    for s in specs:
        ident = json.dumps([s.kernel, s.key, s.shape, s.config, s.dtype, s.arch], sort_keys=True)
        if ident in merged:
            old = merged[ident]
            merged[ident] = dataclasses.replace(old, roles=tuple(sorted(set(old.roles) | set(s.roles))))
        else:
            merged[ident] = s
    return list(merged.values())


@dataclasses.dataclass(frozen=True)
class Family:
    """A kernel (or a tunable op's kind): how to enumerate its specs and how to build a spec's launch."""

    name: str
    enumerate: Callable[[str, Iterable[int], bool], list[Spec]]  # (subset, archs, small) -> specs
    build: Callable[[Spec], object]  # spec -> autotune.Launch on meta tensors


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


# ---- temporal attention -----------------------------------------------------------------------------

ATTENTION_FRAMES = {16: 10, 32: 20, 64: 64}  # T_PAD -> the T of the representative call
# (T_PAD, D, dtype) of the CI subset: each T_PAD, each head dim, each dtype at least once.
ATTENTION_SMALL = ((16, 32, "float32"), (32, 64, "bfloat16"), (64, 64, "float16"), (64, 128, "bfloat16"))


def _attention_specs(kind: str):
    def enumerate_(subset: str, archs, small: bool) -> list[Spec]:
        import torch

        from fastdiff_kernels import temporal_attention as ta

        dtypes = ("float32", "bfloat16", "float16")
        shapes = ATTENTION_SMALL if small else [(tp, d, dt) for tp in ATTENTION_FRAMES for d in ta.SUPPORTED_HEAD_DIMS
                                                for dt in dtypes]
        out = []
        for arch in archs:
            for t_pad, d, dtype_name in shapes:
                dtype = getattr(torch, dtype_name)
                shape = {"N": 8192, "T": ATTENTION_FRAMES[t_pad], "H": 8, "D": d}
                key = ta.config_key(kind, t_pad, d, dtype)
                common = dict(kernel=f"temporal_attention.{kind}", op=ta.OP_NAME, key=key, shape=shape,
                              dtype=str(dtype).removeprefix("torch."), arch=arch)
                out.append(Spec(config=ta.arch_default(kind, t_pad, d, dtype, arch), roles=("default",), **common))
                if subset == "all":
                    out.append(Spec(config=ta.default_config(kind, t_pad, d, dtype), roles=("heuristic",),
                                    **common))
                    out += [Spec(config=cfg, roles=("candidate",), **common)
                            for cfg in ta.tune_candidates(kind, t_pad, d, dtype)]
        return out

    def build(spec: Spec):
        import torch

        from fastdiff_kernels import temporal_attention as ta

        n, t, h, d = (spec.shape[k] for k in ("N", "T", "H", "D"))
        dtype = _torch_dtype(spec.dtype)
        # The model's layout: q, k, v are slices of one fused (N, T, 3, H, D) projection; bias, key mask
        # and causal all on (the variant with the most code, hence the most registers).
        q, k, v = _meta(n, t, 3, h, d, dtype=dtype).unbind(2)
        out = _meta(n, t, h, d, dtype=dtype)
        lse = _meta(h, n, t, dtype=torch.float32)
        bias = _meta(h, t, t, dtype=dtype)
        mask = _meta(n, t, dtype=torch.uint8)
        if kind == "fwd":
            return ta.fwd_launch(q, k, v, bias, mask, out, lse, True, d**-0.5, spec.config)
        grads = [_meta(n, t, h, d, dtype=dtype) for _ in range(4)]
        partial = _meta(*ta.dbias_partial_shape(n, t, h, ta.launch_block_seq(spec.config, n)), dtype=torch.float32)
        return ta.bwd_launch(grads[0], q, k, v, out, lse, bias, mask, *grads[1:], partial, True, d**-0.5,
                             spec.config)

    return Family(f"temporal_attention.{kind}", enumerate_, build)


# ---- adaLN modulate -----------------------------------------------------------------------------------

ADALN_WIDTHS = (256, 384, 1024, 1152)  # D of the representative calls: BLOCK_D 256, 512, 1024, 2048
ADALN_SMALL = ((384, "bfloat16"), (1152, "float32"))  # (D, dtype) of the CI subset
# Where `fastdiff tune adaln` sweeps candidates (its dtypes and widths 256..1024): elsewhere (fp64, BLOCK_D
# 2048) a launcher can only pick the default, so only the default is compiled.
ADALN_TUNED_DTYPES = ("float32", "bfloat16", "float16")
ADALN_TUNED_BLOCK_D = 1024
ADALN_SHAPE = {"B": 8, "K": 16, "S": 256}


def _adaln_specs(kind: str):
    def enumerate_(subset: str, archs, small: bool) -> list[Spec]:
        import torch

        from fastdiff_kernels import adaln_modulate as am

        dtypes = ("float32", "bfloat16", "float16", "float64")
        shapes = ADALN_SMALL if small else [(d, dt) for d in ADALN_WIDTHS for dt in dtypes]
        out = []
        for arch in archs:
            for d, dtype_name in shapes:
                block_d = am.block_d_for(d)
                dtype = getattr(torch, dtype_name)
                key = am.config_key(kind, block_d, dtype)
                dtype_name = str(dtype).removeprefix("torch.")
                common = dict(kernel=f"adaln_modulate.{kind}", op=am.OP_NAME, key=key,
                              shape={**ADALN_SHAPE, "D": d}, dtype=str(dtype).removeprefix("torch."), arch=arch)
                out.append(Spec(config=am.arch_default(kind, block_d, dtype, arch), roles=("default",), **common))
                if subset == "all" and dtype_name in ADALN_TUNED_DTYPES and block_d <= ADALN_TUNED_BLOCK_D:
                    out.append(Spec(config=am.default_config(kind, block_d, dtype), roles=("heuristic",),
                                    **common))
                    out += [Spec(config=cfg, roles=("candidate",), **common)
                            for cfg in am.tune_candidates(kind, block_d, dtype)]
        return out

    def build(spec: Spec):
        from fastdiff_kernels import adaln_modulate as am

        b, k, s, d = (spec.shape[x] for x in ("B", "K", "S", "D"))
        dtype = _torch_dtype(spec.dtype)
        stats = am.stats_dtype(dtype)
        x = _meta(b, k, s, d, dtype=dtype)
        shift, scale = _meta(b, k, 1, 2 * d, dtype=dtype).chunk(2, dim=-1)  # chunks of the ada projection
        if kind == "fwd":
            return am.fwd_launch(x, shift, scale, _meta(b, k, s, d, dtype=dtype), _meta(b * k * s, dtype=stats),
                                 _meta(b * k * s, dtype=stats), am.DEFAULT_EPS, spec.config)
        programs = 2 * SM_COUNT[spec.arch]
        splits = am.backward_splits(spec.config, b * k, s, programs)
        return am.bwd_launch(_meta(b, k, s, d, dtype=dtype), x, scale, _meta(b * k * s, dtype=stats),
                             _meta(b * k * s, dtype=stats), _meta(b, k, s, d, dtype=dtype),
                             _meta(b, k, splits, d, dtype=stats), _meta(b, k, splits, d, dtype=stats), spec.config,
                             programs)

    return Family(f"adaln_modulate.{kind}", enumerate_, build)


# ---- noise schedule ----------------------------------------------------------------------------------

# C*H*W of one frame: every BLOCK the launchers can pick (16 .. 2048; 4096 = a 4x32x32 latent).
NOISE_FRAME_SIZES = (16, 32, 64, 128, 256, 512, 1024, 4096)
NOISE_SMALL = (4096,)
NOISE_FRAMES = (4, 16)  # (B, K)
# The finalize stage depends on the chunk count only: 2 chunks (a 4x32x32 latent), 64 (BLOCK_C's cap).
FINALIZE_FRAME_SIZES = (4096, 2048 * 64)


def _noise_specs(name: str):
    def enumerate_(subset: str, archs, small: bool) -> list[Spec]:
        from fastdiff_kernels import autotune
        from fastdiff_kernels import noise_schedule as ns

        sizes = FINALIZE_FRAME_SIZES if name == "frame_loss_finalize" else (NOISE_SMALL if small else NOISE_FRAME_SIZES)
        dtypes = ("float32",) if name == "frame_loss_finalize" else ("float32", "bfloat16", "float16")
        if small:
            sizes, dtypes = sizes[:1], dtypes[-1:]
        out = []
        for arch in archs:
            for n in sizes:
                for dtype in dtypes:
                    block = ns.block_for(n)
                    if name == "frame_loss_finalize":  # one program, fixed tile: its only config
                        out.append(Spec(kernel=f"noise_schedule.{name}", op="", key="", shape={"CHW": n},
                                        config={"BLOCK_F": 64, "num_warps": 4}, dtype=dtype, arch=arch,
                                        roles=("default",)))
                        continue
                    # BLOCK follows the frame size; the warps are the config (heuristic, or the table's).
                    key = ns.config_key(name, block, _torch_dtype(dtype))
                    common = dict(kernel=f"noise_schedule.{name}", op=ns.OP_NAME, key=key, shape={"CHW": n},
                                  dtype=dtype, arch=arch)
                    heuristic = {"num_warps": ns.default_warps(block)}
                    default = autotune.aot_default(ns.OP_NAME, key, arch) or heuristic
                    out.append(Spec(config=default, roles=("default",), **common))
                    if subset == "all":
                        out.append(Spec(config=heuristic, roles=("heuristic",), **common))
                        out += [Spec(config=c, roles=("candidate",), **common) for c in ns.warp_candidates(block)]
        return out

    def build(spec: Spec):
        from fastdiff_kernels import autotune
        from fastdiff_kernels import noise_schedule as ns

        if not spec.key:
            return _noise_launch(spec)
        with autotune.forced(ns.OP_NAME, spec.key, spec.config):
            return _noise_launch(spec)

    def _noise_launch(spec: Spec):
        import torch

        from fastdiff_kernels import noise_schedule as ns

        b, k = NOISE_FRAMES
        n = spec.shape["CHW"]
        dtype = _torch_dtype(spec.dtype)
        clip = lambda: _meta(b, k, n, dtype=dtype)  # noqa: E731
        frames_i64 = _meta(b, k, dtype=torch.int64)
        table = _meta(1000, dtype=torch.float32)
        observed = _meta(b, k, dtype=torch.bool)
        one_i64 = _meta(1, dtype=torch.int64)
        per_frame = _meta(b, k, dtype=torch.float32)
        # The variant with the most code: in-kernel Philox noise and every optional output.
        if name == "add_noise":
            return ns.add_noise_launch(clip(), frames_i64, observed, table, table, None, one_i64, one_i64, 1,
                                       True, _meta(b * k, n, dtype=dtype), _meta(b * k, n, dtype=dtype))
        if name == "frame_sqerr" or name == "frame_loss_finalize":
            partial = _meta(b * k, math.ceil(n / ns.block_for(n)), dtype=torch.float32)
            launches = ns.frame_mse_loss_launches(clip(), clip(), per_frame, observed, partial,
                                                  _meta(b * k, dtype=torch.float32), _meta((), dtype=torch.float32),
                                                  _meta((), dtype=torch.float32))
            return launches[0 if name == "frame_sqerr" else 1]
        if name == "frame_loss_backward":
            return ns.frame_mse_loss_backward_launch(_meta((), dtype=torch.float32), clip(), clip(), per_frame,
                                                     observed, _meta((), dtype=torch.float32), True, clip(), clip())
        if name == "ddim_step":
            return ns.ddim_step_launch(clip(), clip(), frames_i64, frames_i64, table, table, None, one_i64, one_i64,
                                       0.5, 1, _meta(b * k, n, dtype=dtype))
        if name == "edm_step":
            return ns.edm_step_launch(clip(), clip(), clip(), per_frame, per_frame, None, one_i64, one_i64, 0.1, 0.05,
                                      50.0, 1.003, _meta(b * k, n, dtype=dtype), _meta(b * k, dtype=torch.float32))
        raise KeyError(name)

    return Family(f"noise_schedule.{name}", enumerate_, build)


# ---- 8-bit AdamW --------------------------------------------------------------------------------------

# (parameter dtype, 8-bit state, stochastic rounding): every bucket kind the optimizer launches.
ADAMW_VARIANTS = (("float32", True, False), ("float32", False, False), ("bfloat16", True, False),
                  ("bfloat16", True, True), ("bfloat16", False, False), ("bfloat16", False, True))
ADAMW_BLOCKS = (1, 4096)  # one block (ROWS 1) or many (ROWS = GPU_ROWS)


def _adamw_enumerate(subset: str, archs, small: bool) -> list[Spec]:
    from fastdiff_kernels import adamw8bit as aw

    out = []
    for arch in archs:
        for dtype, eight_bit, stochastic in ADAMW_VARIANTS:
            for n_blocks in ADAMW_BLOCKS[-1:] if small else ADAMW_BLOCKS:
                out.append(Spec(kernel="adamw8bit.step", op="", key="",
                                shape={"blocks": n_blocks, "eight_bit": eight_bit, "stochastic": stochastic},
                                config={"ROWS": min(aw.GPU_ROWS, n_blocks), "num_warps": aw.GPU_NUM_WARPS},
                                dtype=dtype, arch=arch, roles=("default",)))
    return out


def _adamw_build(spec: Spec):
    import torch

    from fastdiff_kernels import adamw8bit as aw

    nb = spec.shape["blocks"]
    eight_bit = spec.shape["eight_bit"]
    state = torch.uint8 if eight_bit else torch.float32
    f32 = lambda *s: _meta(*s, dtype=torch.float32)  # noqa: E731
    m, v = _meta(nb * aw.BLOCKSIZE, dtype=state), _meta(nb * aw.BLOCKSIZE, dtype=state)
    absmax = (f32(nb), f32(nb)) if eight_bit else (m, v)
    return aw.step_launch(_meta(nb, dtype=torch.int32), _meta(4, aw.TABLE_COLUMNS, dtype=torch.int64), f32(4), f32(1, 5), m, v,
                          *absmax, (f32(256), f32(256)), _meta(1, dtype=torch.int64), f32(1), nb, 0,
                          _torch_dtype(spec.dtype), eight_bit, spec.shape["stochastic"])


FAMILIES = {f.name: f for f in (
    _attention_specs("fwd"), _attention_specs("bwd"), _adaln_specs("fwd"), _adaln_specs("bwd"),
    *(_noise_specs(n) for n in ("add_noise", "frame_sqerr", "frame_loss_finalize", "frame_loss_backward",
                                "ddim_step", "edm_step")),
    Family("adamw8bit.step", _adamw_enumerate, _adamw_build),
)}


def _tile_size(spec: Spec) -> float:
    """Rough bytes of a program's tile per warp: the sweep's order of risk."""
    import torch

    tile = math.prod(v for k, v in spec.config.items() if k.startswith("BLOCK"))
    dims = math.prod(v for v in spec.shape.values() if isinstance(v, int) and not isinstance(v, bool))
    itemsize = torch.empty((), dtype=_torch_dtype(spec.dtype)).element_size()
    return tile * dims * itemsize / spec.config.get("num_warps", 4)


def _family(spec: Spec) -> tuple:
    """Specs that differ only in their tile (BLOCK_*): compile time grows with the tile."""
    rest = sorted((k, v) for k, v in spec.config.items() if not k.startswith("BLOCK"))
    return (spec.kernel, spec.key, json.dumps(spec.shape, sort_keys=True), spec.dtype, spec.arch, tuple(rest))


def _tile(spec: Spec) -> int:
    return math.prod(v for k, v in spec.config.items() if k.startswith("BLOCK"))


def all_specs(subset: str = "all", archs: Iterable[int] = tuple(SHARED_LIMIT), small: bool = False,
              kernels: Iterable[str] | None = None) -> list[Spec]:
    """Specs of the sweep: ``subset`` 'defaults' (what an untuned GPU runs) or 'all' (also every tuning
    candidate and the heuristic defaults); ``small``: a few representative shapes (the CI test)."""
    archs = tuple(archs)
    specs = []
    for name, family in FAMILIES.items():
        if kernels is None or name in kernels:
            specs += family.enumerate(subset, archs, small)
    # Defaults first, then the candidates round-robin over (kernel, arch), smaller tiles first (so that a
    # timeout can stand for the larger tiles of its family, see run_specs): a sweep cut short by its
    # deadline has every default and an even share of every kernel's candidates.
    rank: dict[tuple, int] = {}
    order = []
    for s in sorted(_merge(specs), key=_tile_size):
        group = (s.kernel, s.arch, "candidate" not in s.roles or len(s.roles) > 1)
        rank[group] = rank.get(group, -1) + 1
        order.append((not group[2], rank[group], s))
    return [s for *_, s in sorted(order, key=lambda x: x[:2])]


# --------------------------------------------------------------------------------------------------
# Compiling one spec (in a worker process, with the interpreter off)
# --------------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compiler_missing() -> str | None:
    """Why this machine cannot compile for NVIDIA GPUs (no CUDA backend in triton, no bundled ptxas), or None."""
    try:
        from triton import knobs
        from triton.backends import backends

        if "nvidia" not in backends:
            return "this triton has no NVIDIA backend"
        path = knobs.nvidia.ptxas.path
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot compile"
        return f"triton's NVIDIA toolchain is not usable here ({type(err).__name__}: {err})"
    if not path or not Path(path).exists():
        return f"ptxas not found (looked for {path!r})"
    return None


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas -v output (the largest entry if several)."""
    regs = [int(x) for x in _PTXAS_REGS.findall(log)]
    spills = [tuple(map(int, m)) for m in _PTXAS_SPILLS.findall(log)]
    return {
        "registers": max(regs) if regs else None,
        "stack_frame": max((s[0] for s in spills), default=None),
        "spill_stores": max((s[1] for s in spills), default=None),
        "spill_loads": max((s[2] for s in spills), default=None),
    }


def _bind(launch, target):
    """(signature, constexprs, attrs, options) exactly as Triton's JIT would compile this launch on ``target``."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.constexprs, **launch.options()}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def compile_key(spec: Spec, launch, bound) -> str:
    import triton

    signature, constexprs, attrs, options = bound
    ident = [triton.__version__, spec.arch, launch.kernel.cache_key, sorted(signature.items()),
             sorted((repr(k), repr(v)) for k, v in constexprs.items()), sorted((repr(k), repr(v)) for k, v in attrs.items()),
             sorted((k, repr(v)) for k, v in vars(options).items())]
    return hashlib.sha256(json.dumps(ident, default=repr).encode()).hexdigest()[:32]


def _result(spec: Spec, **fields) -> dict:
    return {**spec.to_json(), "shared_limit": SHARED_LIMIT[spec.arch], **fields}


def judge(record: dict) -> dict:
    """Add the verdicts: fits (shared memory within the arch's limit) and spills (any local-memory spill)."""
    ok = record.get("status") == "ok"
    record["fits"] = bool(ok and record["shared"] <= record["shared_limit"])
    spill = max(record.get("spill_stores") or 0, record.get("spill_loads") or 0)
    record["spill_bytes"] = spill if ok else None
    record["spills"] = bool(ok and spill > 0)
    return record


def compile_spec(spec: Spec, cache_dir: Path | None = None, on_key: Callable[[str], None] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Compile one spec for its arch and return its record (see the module docstring)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", spec.arch, 32)
    try:
        launch = FAMILIES[spec.kernel].build(spec)
        bound = _bind(launch, target)
    except Exception as err:  # the launcher itself refuses this spec (e.g. a grid over CUDA's limits)
        return judge(_result(spec, status="error", error=f"launch: {type(err).__name__}: {err}"[:ERROR_CHARS]))
    key = compile_key(spec, launch, bound)
    cached = cache_dir / f"{key}.json" if cache_dir else None
    if cached is not None and cached.exists():
        fields = json.loads(cached.read_text())
        # A recorded timeout stands only for a timeout at least as long as this sweep's.
        if fields["status"] != "timeout" or fields.get("timeout_s", 0) >= timeout:
            return judge(_result(spec, **fields, cached=True))
    if on_key is not None:
        on_key(key)
    signature, constexprs, attrs, options = bound
    log = io.StringIO()
    start = time.perf_counter()
    try:
        real_stdout = sys.stdout
        sys.stdout = log  # TRITON_DUMP_PTXAS_LOG prints the ptxas -v report here
        try:
            compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                      options=vars(options))
        finally:
            sys.stdout = real_stdout
        fields = {"status": "ok", "shared": int(compiled.metadata.shared), **parse_ptxas(log.getvalue()),
                  "cubin_sha": hashlib.sha256(compiled.asm["cubin"]).hexdigest()[:16]}
        if fields["registers"] is None:
            fields = {"status": "error", "error": "compiled, but ptxas printed no resource report"}
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        fields = {"status": "error", "error": text[:ERROR_CHARS]}
    fields |= {"compile_s": round(time.perf_counter() - start, 3), "compile_key": key,
               "num_warps": launch.num_warps, "num_stages": options.num_stages}
    if cached is not None:
        cached.write_text(json.dumps(fields))
    return judge(_result(spec, **fields, cached=False))


def _worker(cache_dir: str | None, timeout: float) -> int:
    """Read specs (JSON lines) on stdin, answer records on the original stdout; all else goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of the compiler (e.g. a PTX dump on failure) must not corrupt the protocol
    sys.stdout = sys.stderr
    from triton import knobs

    knobs.compilation.always_compile = True  # so that ptxas runs, and reports, for every spec
    knobs.nvidia.dump_ptxas_log = True
    cache = Path(cache_dir) if cache_dir else None
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        spec = Spec(**{**json.loads(line), "roles": tuple(json.loads(line)["roles"])})
        record = compile_spec(spec, cache, on_key=lambda k: proto.write(json.dumps({"key": k}) + "\n"),
                              timeout=timeout)
        proto.write(json.dumps({"record": record}) + "\n")
    return 0


# --------------------------------------------------------------------------------------------------
# The sweep: worker processes with a per-spec timeout
# --------------------------------------------------------------------------------------------------


def _worker_env(cache_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, not interpret
    env["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    # The worker imports fastdiff_kernels the way this process did: installed, or from a folder on PYTHONPATH
    # holding a fastdiff_kernels directory or link (e.g. a second venv with another Triton).
    import fastdiff_kernels

    folder = Path(fastdiff_kernels.__path__[0])
    if folder.name == "fastdiff_kernels":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder.parent), env.get("PYTHONPATH")]))
    return env


class _Worker:
    def __init__(self, index: int, cache_dir: Path, log_dir: Path, timeout: float):
        self.log = open(log_dir / f"aot-worker-{index}.log", "ab")  # noqa: SIM115 (lives as long as the worker)
        # Own session: on a timeout the whole group (the worker and its ptxas) is killed, nothing else.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastdiff_kernels.aot", "--worker", "--cache", str(cache_dir), "--timeout",
             str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=_worker_env(cache_dir),
            start_new_session=True, bufsize=0,
        )
        self.buffer = b""
        self.spec: Spec | None = None
        self.started = 0.0
        self.key: str | None = None
        self.ready = False

    def send(self, spec: Spec) -> None:
        self.spec, self.key, self.started = spec, None, time.monotonic()
        self.proc.stdin.write((json.dumps(spec.to_json()) + "\n").encode())

    def read_messages(self) -> list[dict] | None:
        """Every complete message the worker has sent so far (raw reads: a buffered reader could hold
        a second line the selector never reports again); None once it has exited."""
        data = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self.log.close()


def default_cache_dir() -> Path:
    env = os.environ.get("FASTDIFF_AOT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastdiff" / "aot"


def run_specs(specs: list[Spec], jobs: int = 2, timeout: float = DEFAULT_TIMEOUT, cache_dir: Path | None = None,
              log: Callable[[str], None] | None = None, deadline_s: float | None = None) -> list[dict]:
    """Compile ``specs`` in ``jobs`` worker processes; a spec running past ``timeout`` s is recorded as
    'timeout' (its worker is killed and replaced). Specs not started ``deadline_s`` seconds after the start
    are recorded as 'not_run'. Records come back in the order of ``specs``."""
    begin = time.monotonic()
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    pending = list(enumerate(specs))[::-1]
    results: dict[int, dict] = {}
    index_of = {id(s): i for i, s in enumerate(specs)}
    sel = selectors.DefaultSelector()
    workers: list[_Worker] = []
    spawned = 0

    def spawn():
        nonlocal spawned
        w = _Worker(spawned, cache_dir, cache_dir, timeout)
        spawned += 1
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        workers.append(w)
        return w

    slow: dict[tuple, int] = {}  # family -> smallest tile that timed out

    def inferred_timeout(spec: Spec) -> bool:
        """A larger tile of a family whose smaller tile already timed out is recorded as a timeout
        without compiling it (minutes each otherwise); the record says so."""
        limit = slow.get(_family(spec))
        if limit is None or _tile(spec) < limit:
            return False
        results[index_of[id(spec)]] = judge(_result(
            spec, status="timeout", inferred=True, compile_s=None, cached=False, timeout_s=timeout,
            error=f"not compiled: a smaller tile of this config family (tile {limit}) did not compile in {timeout:g} s"))
        return True

    def feed(w: _Worker):
        nonlocal done
        while pending and inferred_timeout(pending[-1][1]):
            pending.pop()
            done += 1
        if pending and deadline_s is not None and time.monotonic() - begin > deadline_s:
            for i, spec in pending:
                results[i] = judge(_result(spec, status="not_run", error=f"sweep deadline ({deadline_s:g} s) passed",
                                           cached=False))
            done += len(pending)
            pending.clear()
        if pending:
            w.send(pending.pop()[1])
        else:
            w.spec = None

    def timeout_record(spec: Spec, key: str | None) -> dict:
        family = _family(spec)
        slow[family] = min(slow.get(family, _tile(spec)), _tile(spec))
        fields = {"status": "timeout", "error": f"compile did not finish in {timeout:g} s", "compile_s": timeout,
                  "compile_key": key, "timeout_s": timeout}
        if key is not None:  # later specs with the same compile key time out without another attempt
            (cache_dir / f"{key}.json").write_text(json.dumps(fields))
        return judge(_result(spec, **fields, cached=False))

    for _ in range(max(1, min(jobs, len(specs)))):
        spawn()
    done = 0
    last_report = time.monotonic()
    try:
        while done < len(specs):
            now = time.monotonic()
            waits = [timeout - (now - w.started) for w in workers if w.ready and w.spec is not None]
            events = sel.select(timeout=max(0.05, min(waits, default=5.0)))
            for sel_key, _ in events:
                w = sel_key.data
                if w not in workers:
                    continue
                messages = w.read_messages()
                if messages is None:  # the worker died (out of memory, a crash in the compiler)
                    sel.unregister(w.proc.stdout)
                    workers.remove(w)
                    w.kill()
                    if w.spec is not None:
                        results[index_of[id(w.spec)]] = judge(_result(
                            w.spec, status="error", error="the compiler process died (see aot-worker-*.log)",
                            compile_s=round(time.monotonic() - w.started, 3), cached=False))
                        done += 1
                    if pending:
                        spawn()
                    continue
                for msg in messages:
                    if msg.get("ready"):
                        w.ready = True
                        feed(w)
                    elif "key" in msg:
                        w.key = msg["key"]
                    elif "record" in msg:
                        if msg["record"]["status"] == "timeout":  # from the cache: an earlier run's timeout
                            family = _family(w.spec)
                            slow[family] = min(slow.get(family, _tile(w.spec)), _tile(w.spec))
                        results[index_of[id(w.spec)]] = msg["record"]
                        done += 1
                        feed(w)
            now = time.monotonic()
            for w in list(workers):
                if w.ready and w.spec is not None and now - w.started > timeout:
                    results[index_of[id(w.spec)]] = timeout_record(w.spec, w.key)
                    done += 1
                    sel.unregister(w.proc.stdout)
                    workers.remove(w)
                    w.kill()
                    if pending:
                        spawn()
            if log is not None and now - last_report > 30:
                last_report = now
                log(f"  {done}/{len(specs)} specs done")
    finally:
        for w in workers:
            sel.unregister(w.proc.stdout)
            w.close()
    return [results[i] for i in range(len(specs))]


# --------------------------------------------------------------------------------------------------
# Verdicts -> the AOT table (pruned candidates, replaced defaults)
# --------------------------------------------------------------------------------------------------


def config_fields(op: str, key: str) -> tuple[str, ...]:
    """The launch fields of a tunable op's config (what a config id is made of)."""
    if op == "temporal_attention":
        from fastdiff_kernels import temporal_attention as ta

        return ta.CONFIG_FIELDS
    if op == "adaln_modulate":
        from fastdiff_kernels import adaln_modulate as am

        return am.config_fields(key.split("|")[0])
    if op == "noise_schedule":
        from fastdiff_kernels import noise_schedule as ns

        return ns.CONFIG_FIELDS
    raise KeyError(op)


def usable(record: dict) -> bool:
    """Compiled and fits the arch's shared memory: a launch of it would start."""
    return record["status"] == "ok" and record["fits"]


def _why_bad(record: dict) -> str:
    if record["status"] != "ok":
        return record["status"] if record["status"] == "timeout" else "compile error"
    if not record["fits"]:
        return f"needs {record['shared']:,} B shared memory, over the {record['shared_limit']:,} B limit"
    return f"spills {record['spill_bytes']:,} B ({record['registers']} registers)"


def _closeness(cfg: dict, ref: dict, fields) -> tuple:
    """Order for replacement defaults: same tile (BLOCK_*) first, more warps before fewer, then the
    nearest tile, smaller before larger; a backward's TILES as close as possible."""
    def lg(x):
        return math.log2(max(1, int(x)) + (1 if int(x) == 0 else 0))

    tile = next((f for f in fields if f.startswith("BLOCK")), None)
    out = [abs(lg(cfg[tile]) - lg(ref[tile])), cfg[tile] > ref[tile]] if tile else []
    out += [abs(lg(cfg["num_warps"]) - lg(ref["num_warps"])), cfg["num_warps"] < ref["num_warps"]]
    out += [abs(lg(cfg[f]) - lg(ref[f])) for f in fields if f not in (tile, "num_warps", "num_stages")]
    return tuple(out)


def table_entries(records: list[dict]) -> dict:
    """{arch: {op: {key: entry}}} for one Triton version's full sweep: ``rejected`` config ids (candidates
    that fail, time out or do not fit) and, where the heuristic default spills or does not fit, a
    ``default`` replacement (the closest candidate that compiles, fits and does not spill; if every one
    spills, the one that spills least, noted as ``unavoidable_spill_bytes``)."""
    from fastdiff_kernels.autotune import config_id

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["op"]:
            groups.setdefault((r["arch"], r["op"], r["key"]), []).append(r)
    table: dict = {}
    for (arch, op, key), recs in sorted(groups.items()):
        fields = config_fields(op, key)
        entry: dict = {}
        rejected = sorted({config_id(r["config"], fields) for r in recs
                           if "candidate" in r["roles"] and r["status"] != "not_run" and not usable(r)})
        if rejected:
            entry["rejected"] = rejected
        heuristic = next((r for r in recs if "heuristic" in r["roles"]), None)
        if heuristic is not None and (not usable(heuristic) or heuristic["spills"]):
            pool = [r for r in recs if "candidate" in r["roles"] and usable(r)]
            clean = [r for r in pool if not r["spills"]]
            pick = min(clean or pool, key=lambda r: (r["spill_bytes"], _closeness(r["config"], heuristic["config"],
                                                                                  fields)), default=None)
            if clean:
                pick = min(clean, key=lambda r: _closeness(r["config"], heuristic["config"], fields))
            if pick is None:  # no compiled candidate of this shape launches here: say so, keep the heuristic
                entry["no_default"] = f"heuristic {config_id(heuristic['config'], fields)}: {_why_bad(heuristic)}; " \
                                      "no compiled candidate compiles and fits"
            else:
                entry["default"] = {f: int(pick["config"][f]) for f in fields if f in pick["config"]}
                entry["replaces"] = config_id(heuristic["config"], fields)
                entry["reason"] = _why_bad(heuristic)
                if pick["spills"]:
                    entry["unavoidable_spill_bytes"] = pick["spill_bytes"]
                    entry["spill_reason"] = _spill_reason(op, key, pool)
        if entry:
            table.setdefault(arch, {}).setdefault(op, {})[key] = entry
    return table


def _spill_reason(op: str, key: str, pool: list[dict]) -> str:
    least = min(pool, key=lambda r: r["spill_bytes"])
    return (f"every compiled candidate that fits spills, the least {config_id_text(least)} with "
            f"{least['spill_bytes']:,} B at {least['registers']} registers: one program's smallest tile of this shape "
            "already holds more live values than a thread's registers")


def config_id_text(record: dict) -> str:
    from fastdiff_kernels.autotune import config_id

    return config_id(record["config"], record["config"].keys())


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def build_table(out_dir: Path) -> dict:
    """TABLE for aot_table.py from every full sweep (<version>.json) in ``out_dir``."""
    table = {}
    for path in sorted(out_dir.glob("*.json")):
        if path.stem.endswith("-defaults"):
            continue
        data = json.loads(path.read_text())
        table[minor(data["triton"])] = table_entries(data["records"])
    return table


TABLE_HEADER = '''"""Generated by `python -m fastdiff_kernels.aot` from profiles/aot/*.json; do not edit by hand.

TABLE[triton minor version][arch][op][config key] = {"rejected": [config ids], "default": config, ...}; read
by fastdiff_kernels.autotune (aot_allowed, aot_default). See profiles/README.md, "AOT compile table".
"""

'''


def write_table_module(table: dict, path: Path | None = None) -> Path:
    import pprint

    path = path or Path(__file__).resolve().parent / "aot_table.py"
    text = TABLE_HEADER + "TABLE: dict = " + pprint.pformat(table, width=118, sort_dicts=True) + "\n"
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def summarize(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    return {
        "specs": len(records),
        "compiled": len(ok),
        "failed": sum(r["status"] == "error" for r in records),
        "timeouts": sum(r["status"] == "timeout" for r in records),
        "not_run": sum(r["status"] == "not_run" for r in records),
        "over_smem": sum(not r["fits"] for r in ok),
        "spilling": sum(r["spills"] for r in ok),
        "max_spill": max((r["spill_bytes"] for r in ok), default=0),
    }


def pickable(records: list[dict], entries: dict) -> list[dict]:
    """The records a launcher can still pick under a table's entries for this version: candidates not
    rejected for their arch, plus each (arch, key)'s default (the replacement, else the heuristic)."""
    from fastdiff_kernels.autotune import config_id

    out = []
    for r in records:
        if not r["op"]:
            out.append(r)  # nothing to choose: the launcher's one config
            continue
        entry = entries.get(r["arch"], {}).get(r["op"], {}).get(r["key"], {})
        fields = config_fields(r["op"], r["key"])
        cid = config_id(r["config"], fields)
        default = entry.get("default")
        is_default = cid == config_id(default, fields) if default else "heuristic" in r["roles"]
        if is_default or ("candidate" in r["roles"] and cid not in entry.get("rejected", ())):
            out.append(r)
    return out


_HEADER = ("| kernel | arch | specs | compiled | failed | timeouts | not run | over smem limit | spilling | "
           "max spill (B) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")


def markdown_table(records: list[dict]) -> str:
    rows = {}
    for r in records:
        rows.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines = [_HEADER]
    for (kernel, arch), recs in sorted(rows.items()):
        s = summarize(recs)
        lines.append(f"| {kernel} | sm_{arch} | {s['specs']} | {s['compiled']} | {s['failed']} | {s['timeouts']} | "
                     f"{s['not_run']} | "
                     f"{s['over_smem']} | {s['spilling']} | {s['max_spill']:,} |\n")
    return "".join(lines)


def markdown_report(data: dict, entries: dict) -> str:
    records = data["records"]
    full = data["subset"] == "all"
    out = [f"# AOT compile sweep: Triton {data['triton']}, subset `{data['subset']}`\n\n",
           f"Generated by `python -m fastdiff_kernels.aot` on {data['date']} (torch {data['torch']}; "
           f"{data['jobs']} worker(s), per-spec timeout {data['timeout_s']:g} s, {data['host']}). Every spec is "
           "compiled with Triton's compiler and bundled ptxas for the arch; shared memory is checked against "
           "the per-block opt-in limit (sm_80 166,912 B; sm_86/sm_89 101,376 B; sm_90 232,448 B); spilling means "
           "ptxas reported spill stores or loads. Timeouts count as defects. Full records: the JSON beside this "
           "file.\n\n"]
    unique = {r.get("compile_key") for r in records if r.get("compile_key")}
    total_s = sum(r.get("compile_s") or 0 for r in records if not r.get("cached"))
    out.append(f"{len(records)} specs, {len(unique)} distinct binaries; {total_s:,.0f} s of compiling in this run "
               f"({sum(bool(r.get('cached')) for r in records)} records from the cache). "
               f"{sum(bool(r.get('inferred')) for r in records)} of the timeouts are inferred, not compiled: a larger "
               "tile of a config family (same kernel, shape, dtype, arch, warps) whose smaller tile already timed "
               "out.\n\n")
    if full:
        out.append("## Before pruning: every spec (heuristic defaults and all tuning candidates)\n\n")
        out.append(markdown_table(records))
        out.append("\n## After pruning: what a launcher can pick now (remaining candidates and the arch's default)\n\n")
        out.append(markdown_table(pickable(records, entries)))
    else:
        out.append("## Defaults: the config an untuned GPU runs, per arch (after the table's replacements)\n\n")
        out.append(markdown_table(records))
    if not full and not entries:
        # No full sweep of this version: nothing below was chosen for it, so say so rather than "None".
        spilling = summarize(records)["spilling"]
        out.append("\n## No table for this Triton version\n\n"
                   "The AOT table has no full sweep of this Triton version, so none of the defaults above was chosen "
                   "for it: its launchers take the known versions' table entries, newest first "
                   f"(`autotune.aot_default`). Here {spilling} of {len(records)} defaults spill; a full sweep "
                   "(`--subset all`) would replace those that can avoid it.\n")
        return _compile_sections(out, records)
    changed = [(arch, op, key, e) for arch, ops in sorted(entries.items()) for op, keys in sorted(ops.items())
               for key, e in sorted(keys.items()) if "default" in e]
    out.append("\n## Defaults changed for this Triton version\n\n")
    if not changed:
        out.append("None.\n")
    for arch, op, key, e in changed:
        from fastdiff_kernels.autotune import config_id

        new = config_id(e["default"], e["default"].keys())
        out.append(f"- {op} `{key}` on sm_{arch}: `{e['replaces']}` ({e['reason']}) -> `{new}`"
                   + (f" (still spills {e['unavoidable_spill_bytes']:,} B)" if "unavoidable_spill_bytes" in e else "")
                   + "\n")
    stuck = [(arch, op, key, e) for arch, ops in sorted(entries.items()) for op, keys in sorted(ops.items())
             for key, e in sorted(keys.items()) if "no_default" in e]
    if stuck:
        out.append("\n## Shapes with no config that launches on an arch\n\n")
        for arch, op, key, e in stuck:
            out.append(f"- {op} `{key}` on sm_{arch}: {e['no_default']}\n")
    spills = [(arch, op, key, e) for arch, op, key, e in changed if "unavoidable_spill_bytes" in e]
    out.append("\n## Shapes that cannot avoid spilling\n\n")
    out.append("None: every shape has a default that compiles, fits and does not spill.\n" if not spills else "")
    for arch, op, key, e in spills:
        out.append(f"- {op} `{key}` on sm_{arch}: {e['spill_reason']}\n")
    return _compile_sections(out, records)


def _compile_sections(out: list[str], records: list[dict]) -> str:
    """The report's closing sections (compile errors and timeouts, the slowest compiles), appended to `out`."""
    bad = [r for r in records if r["status"] in ("error", "timeout")]
    if bad:
        out.append("\n## Compile errors and timeouts\n\n| kernel | arch | key | config | status | detail |\n"
                   "|---|---|---|---|---|---|\n")
        for r in sorted(bad, key=lambda r: (r["kernel"], r["arch"], r["key"], json.dumps(r["config"]))):
            detail = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:160]
            out.append(f"| {r['kernel']} | sm_{r['arch']} | `{r['key'] or json.dumps(r['shape'])}` | "
                       f"`{config_id_text(r)}` | {r['status']} | {detail} |\n")
    slow = sorted((r for r in records if r["status"] == "ok"), key=lambda r: -(r.get("compile_s") or 0))[:10]
    if slow:
        out.append("\n## Slowest compiles that finished\n\n| kernel | arch | key | config | seconds |\n"
                   "|---|---|---|---|---:|\n")
        for r in slow:
            out.append(f"| {r['kernel']} | sm_{r['arch']} | `{r['key']}` | `{config_id_text(r)}` | "
                       f"{r['compile_s']:.1f} |\n")
    return "".join(out)


def write_reports(data: dict, out_dir: Path, entries: dict) -> tuple[Path, Path]:
    stem = data["triton"] + ("" if data["subset"] == "all" else f"-{data['subset']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=None, separators=(",", ":")).replace('},{"kernel"', '},\n{"kernel"')
                         + "\n")
    md_path.write_text(markdown_report(data, entries))
    return json_path, md_path


def sweep(subset: str = "all", jobs: int = 2, timeout: float = DEFAULT_TIMEOUT, cache_dir: Path | None = None,
          small: bool = False, kernels: Iterable[str] | None = None, log=print, deadline_s: float | None = None) -> dict:
    import platform

    import torch
    import triton

    specs = all_specs(subset, small=small, kernels=kernels)
    log(f"compiling {len(specs)} specs (triton {triton.__version__}, {jobs} job(s), timeout {timeout:g} s)")
    start = time.monotonic()
    records = run_specs(specs, jobs=jobs, timeout=timeout, cache_dir=cache_dir, log=log, deadline_s=deadline_s)
    return {
        "format": 1, "triton": triton.__version__, "torch": torch.__version__, "subset": subset,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jobs": jobs, "timeout_s": timeout, "deadline_s": deadline_s, "wall_s": round(time.monotonic() - start, 1),
        "host": f"{os.cpu_count()} CPUs, {platform.machine()}", "shared_limits": SHARED_LIMIT,
        "records": records,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("profiles/aot"), help="folder for the JSON and Markdown")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per spec (default %(default)s)")
    parser.add_argument("--subset", choices=("defaults", "all"), default="all")
    parser.add_argument("--small", action="store_true", help="a few representative shapes only")
    parser.add_argument("--kernels", nargs="*", choices=sorted(FAMILIES), help="only these kernels")
    parser.add_argument("--deadline", type=float, default=None, metavar="MIN",
                        help="stop starting specs after MIN minutes (the rest are recorded as not_run)")
    parser.add_argument("--cache", type=Path, default=None, help="compile-record cache (default ~/.cache/fastdiff/aot)")
    parser.add_argument("--table", action="store_true",
                        help="only rebuild fastdiff_kernels/aot_table.py and the reports from the JSONs in --out")
    parser.add_argument("--no-table", action="store_true", help="after a full sweep, leave aot_table.py as it is")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(str(args.cache) if args.cache else None, args.timeout)
    if not args.table:
        data = sweep(args.subset, args.jobs, args.timeout, args.cache, args.small, args.kernels,
                     deadline_s=None if args.deadline is None else 60 * args.deadline)
        if args.subset == "all" and not args.small and not args.kernels:
            (args.out).mkdir(parents=True, exist_ok=True)
            (args.out / f"{data['triton']}.json").write_text(json.dumps(data))  # so that build_table sees it
        entries = table_entries(data["records"]) if args.subset == "all" else {}
        if args.subset == "defaults":
            import importlib

            from fastdiff_kernels import aot_table

            entries = importlib.reload(aot_table).TABLE.get(minor(data["triton"]), {})
        paths = write_reports(data, args.out, entries)
        print("wrote " + ", ".join(map(str, paths)))
        bad = summarize(data["records"])
        print(json.dumps(bad))
        if args.no_table or args.subset != "all" or args.small or args.kernels:
            return 0
    table = build_table(args.out)
    print(f"wrote {write_table_module(table)}")
    for path in sorted(args.out.glob("*.json")):  # refresh every full report against the new table
        data = json.loads(path.read_text())
        if data["subset"] == "all":
            write_reports(data, args.out, table.get(minor(data["triton"]), {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
