"""Benchmark: fused LayerNorm + adaLN modulate (ours, Triton) vs eager PyTorch (F.layer_norm, then
x * (1 + scale) + shift) and torch.compile of that eager reference, side by side in one run.

Reported per (size, dtype, pass in fwd | fwd+bwd, impl): ms, achieved GB/s over the minimum traffic
(forward: read x, write y, plus the per-frame shift/scale and the fp32 mean/rstd; backward: read x, dy
and the statistics, write dx and dshift/dscale), its share of the device copy bandwidth measured in the
same run, and the speed-ups vs eager and vs the compiled reference.

On a GPU: DiT sizes (B*K = 20..64 frames, S = 64..256 tokens, D = 256..512) in bf16 and fp32; rows go
to $FASTDIFF_BENCH_OUT or profiles/<gpu>/bench_adaln_modulate.json (+ .csv). On a CPU: one tiny smoke
size, eager and compile only (the Triton interpreter is not a benchmark), rows labelled ``smoke`` and
written only where --out or $FASTDIFF_BENCH_OUT says. Timing, ceilings, rows files and the flags are
bench/utils.py's:

    python bench/bench_adaln_modulate.py [--device cuda] [--out FILE.json] [--smoke] [--repeats N]
    pytest bench/bench_adaln_modulate.py            (CI: --benchmark-disable, each function once)
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import utils

from fastdiff_kernels import adaln_modulate as am
from fastdiff_kernels import dispatch

PASSES = ("fwd", "fwd+bwd")
IMPLS = ("eager", "compile", "ours")
CPU_IMPLS = ("eager", "compile")
GPU_SIZES = [
    {"frames": 20, "S": 64, "D": 256},  # balls preset: B*K = 2*10, 8x8 latent
    {"frames": 80, "S": 256, "D": 384},  # maze preset: B*K = 4*20, 16x16 latent
    {"frames": 64, "S": 256, "D": 512},
    {"frames": 64, "S": 64, "D": 512},
]
GPU_DTYPES = (torch.bfloat16, torch.float32)
CPU_SIZES = [{"frames": 4, "S": 16, "D": 64}]


def eager(x, shift, scale):
    """The unfused path the model used to run: LayerNorm (no affine, eps 1e-6), then modulate."""
    return F.layer_norm(x, (x.shape[-1],), eps=am.DEFAULT_EPS) * (1 + scale) + shift


def ours(x, shift, scale):
    return am.adaln_modulate(x, shift, scale)


def make_inputs(size, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    f, s, d = size["frames"], size["S"], size["D"]
    x = torch.randn(f, 1, s, d, generator=g).to(device, dtype)  # (B*K, 1, S, D): B and K fold freely
    mods = (torch.randn(f, 1, 1, 3 * d, generator=g) * 0.5).to(device, dtype)
    shift, scale, _gate = mods.chunk(3, dim=-1)  # strided views of one ada projection, as in the model
    dy = torch.randn(f, 1, s, d, generator=g).to(device, dtype)
    return x, shift, scale, dy


def traffic_bytes(size, dtype, pass_name) -> int:
    """Minimum bytes one pass moves: each tensor read or written once."""
    f, s, d = size["frames"], size["S"], size["D"]
    elt = torch.tensor([], dtype=dtype).element_size()
    tokens, per_frame, stats = f * s * d * elt, f * d * elt, f * s * 4
    fwd = 2 * tokens + 2 * per_frame + 2 * stats  # x in, y out; shift, scale in; mean, rstd out
    bwd = 3 * tokens + 3 * per_frame + 2 * stats  # x, dy in, dx out; scale in, dshift, dscale out; stats in
    return fwd if pass_name == "fwd" else fwd + bwd


def pass_callable(fn, x, shift, scale, dy, pass_name):
    if pass_name == "fwd":
        return lambda: fn(x, shift, scale)
    xs, sh, sc = (t.detach().requires_grad_() for t in (x, shift, scale))
    return lambda: torch.autograd.grad(fn(xs, sh, sc), (xs, sh, sc), dy)


def run_benchmark(device=None, sizes=None, out_path=None, *, dtypes=None, impls=None, repeats=5,
                  log=print) -> list[dict]:
    """Time every (size, dtype, pass, impl); return the rows and write them (JSON + CSV) to out_path."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    sizes = sizes or (GPU_SIZES if on_gpu else CPU_SIZES)
    dtypes = dtypes or (GPU_DTYPES if on_gpu else (torch.float32,))
    impls = impls or (IMPLS if on_gpu else CPU_IMPLS)
    name = utils.device_name(device)
    date = utils.today()
    threads = torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(1)  # tiny smoke sizes: OpenMP fan-out only adds spin/wake-up noise
    rows = []
    try:
        compiled = torch.compile(eager, dynamic=False)
        fns = {"eager": eager, "compile": compiled, "ours": ours}
        for size in sizes:
            for dtype in dtypes:
                x, shift, scale, dy = make_inputs(size, device, dtype)
                # the ceiling at the smaller pass's traffic (on a CPU a tiny size copies from cache, the faster
                # the smaller its working set: the higher ceiling of the two passes)
                copy_gbs = utils.copy_bandwidth_gbs(device, None if on_gpu else traffic_bytes(size, dtype, "fwd"),
                                                    repeats)
                for pass_name in PASSES:
                    with dispatch.backend_override("auto"):
                        timed = utils.side_by_side(
                            {impl: pass_callable(fns[impl], x, shift, scale, dy, pass_name) for impl in impls},
                            device, repeats)
                    timings = {impl: t.median for impl, t in timed.items()}
                    nbytes = traffic_bytes(size, dtype, pass_name)
                    for impl, ms in timings.items():
                        gbs = nbytes / (ms * 1e-3) / 1e9
                        row = dict(op="adaln_modulate", impl=impl, size=f"F{size['frames']}-S{size['S']}-D{size['D']}",
                                   frames=size["frames"], S=size["S"], D=size["D"],
                                   dtype=str(dtype).removeprefix("torch."), **{"pass": pass_name},
                                   **timed[impl].fields(), **{"GB/s": utils.significant(gbs),
                                                                   "copy_GB/s": utils.significant(copy_gbs)},
                                   share_of_copy_bw=round(gbs / copy_gbs, 3),
                                   speedup_vs_eager=round(timings["eager"] / ms, 3),
                                   device=name, date=date, smoke=not on_gpu)
                        if "compile" in timings:
                            row["speedup_vs_compile"] = round(timings["compile"] / ms, 3)
                        rows.append(row)
                        log(_format_row(row))
    finally:
        torch.set_num_threads(threads)
    if out_path:
        utils.write_rows(rows, out_path)
    return rows


def _format_row(r) -> str:
    return (f"{r['size']:16} {r['dtype']:8} {r['pass']:7} {r['impl']:7} {r['ms']:9.4f} ms {r['GB/s']:8.1f} GB/s "
            f"{100 * r['share_of_copy_bw']:5.1f}% of copy  x{r['speedup_vs_eager']:.2f} vs eager  "
            f"x{r.get('speedup_vs_compile', float('nan')):.2f} vs compile")


# ---------------------------------------------------------------------------------------------- pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("impl", ["eager", "ours"])
def test_bench_adaln_modulate(benchmark, impl, pass_name):
    if impl == "ours" and DEVICE != "cuda":
        pytest.skip("the Triton kernel is benchmarked on CUDA only (interpreter timings mean nothing)")
    size, dtype = (GPU_SIZES[1], torch.bfloat16) if DEVICE == "cuda" else (CPU_SIZES[0], torch.float32)
    fn = pass_callable(ours if impl == "ours" else eager, *make_inputs(size, DEVICE, dtype), pass_name)
    benchmark.group = f"adaln_modulate {pass_name} ({DEVICE})"
    with dispatch.backend_override("auto"):
        out = benchmark(fn)
    assert out is not None


def test_run_benchmark_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    sizes = None if DEVICE == "cuda" else CPU_SIZES
    rows = run_benchmark(DEVICE, sizes, out, repeats=1 if DEVICE == "cpu" else 5, log=lambda *_: None)
    assert json.loads(out.read_text()) == rows and out.with_suffix(".csv").exists()
    assert not utils.share_violations(rows)
    assert {"eager", "compile"} <= {r["impl"] for r in rows}
    assert {r["pass"] for r in rows} == set(PASSES)
    assert all(r["ms"] > 0 and r["GB/s"] > 0 and r["device"] and r["date"] for r in rows)
    if DEVICE == "cpu":
        assert all(r["smoke"] for r in rows)
    else:
        assert any(r["impl"] == "ours" for r in rows)


def main(argv=None) -> int:
    run = utils.resolve(utils.parser(__doc__).parse_args(argv), "bench_adaln_modulate")
    sizes = (GPU_SIZES[:2] if run.device.type == "cuda" else CPU_SIZES) if run.smoke else None
    with utils.smoke_compile(run):
        run_benchmark(run.device, sizes, run.out, repeats=run.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
