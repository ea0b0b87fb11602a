"""Benchmark: fused temporal attention (ours, Triton) against SDPA (math / efficient / flash), xformers,
the eager PyTorch reference and torch.compile of the reference, in one run, side by side.

Reported per (case, pass in fwd | bwd | fwd+bwd): ms, achieved GB/s over the minimum traffic
(q, k, v, out once; plus dout, dq, dk, dv in the backward), TFLOP/s (4 S T^2 D forward, 10 S T^2 D
backward, S = sequences = N*H), share of the device-copy bandwidth measured in the same run, and for
ours the speedup over the best peer that accepted the case. Peers that refuse a case (e.g. > 65,535
sequences) get a row saying why.

On a GPU: the sweep T in {10, 16, 20, 32, 64} x D in {64, 128} x 16k..1M sequences (--smoke: the
representative cases). On a CPU: tiny sizes, the reference and its compiled version only (the Triton
interpreter is not a benchmark). Timing, ceilings, rows files and the flags are bench/utils.py's:

    python bench/bench_temporal_attention.py [--device cuda] [--out FILE.json] [--smoke] [--repeats N]
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import utils

from fastdiff_kernels import temporal_attention as ta

PASSES = ("fwd", "bwd", "fwd+bwd")
HEADS = 8
GPU_SWEEP = [
    {"sequences": s, "T": t, "D": d}
    for d in (64, 128)
    for t in (10, 16, 20, 32, 64)
    for s in (1 << 14, 1 << 17, 1 << 20)
]
GPU_REPRESENTATIVE = [{"sequences": 1 << 16, "T": 16, "D": 64}, {"sequences": 1 << 16, "T": 32, "D": 64},
                      {"sequences": 1 << 16, "T": 20, "D": 64, "bias": True, "causal": True}]
CPU_SMOKE = [{"sequences": 64, "T": 10, "D": 64}]


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------


def _sdpa_with(backend_name):
    def run(q, k, v, bias, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return ta.temporal_attention_sdpa(q, k, v, bias=bias, causal=causal)

    return run


@functools.cache
def _compiled_reference():
    return torch.compile(ta.temporal_attention_reference, dynamic=False)


def _plain(fn):
    return lambda q, k, v, bias, causal: fn(q, k, v, bias=bias, causal=causal)


IMPLS = {
    "ours": _plain(ta.temporal_attention_triton),
    "sdpa-math": _sdpa_with("MATH"),
    "sdpa-efficient": _sdpa_with("EFFICIENT_ATTENTION"),
    "sdpa-flash": _sdpa_with("FLASH_ATTENTION"),
    "xformers": _plain(ta.temporal_attention_xformers),
    "reference": _plain(ta.temporal_attention_reference),
    "compiled-reference": lambda *args: _plain(_compiled_reference())(*args),
}
CPU_IMPLS = ("reference", "compiled-reference")


def default_impls(device) -> tuple[str, ...]:
    return tuple(IMPLS) if torch.device(device).type == "cuda" else CPU_IMPLS


# --------------------------------------------------------------------------------------------------
# Timing and accounting
# --------------------------------------------------------------------------------------------------


def traffic_and_flops(case, dtype, pass_name) -> tuple[float, float]:
    """Minimum bytes moved and FLOPs of one pass, for S sequences of T frames, head dim D."""
    s, t, d = case["sequences"], case["T"], case["D"]
    elt = torch.tensor([], dtype=dtype).element_size()
    tile = s * t * d * elt
    fwd = (4 * tile + 4 * s * t, 4.0 * s * t * t * d)  # q, k, v in, out (+ fp32 lse) out
    bwd = (8 * tile + 4 * s * t, 10.0 * s * t * t * d)  # q, k, v, out, dout in, dq, dk, dv out
    if pass_name == "fwd":
        return fwd
    if pass_name == "bwd":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


def make_inputs(case, device, dtype):
    """q, k, v as views of one fused (N, T, 3, H, D) projection, as a DiT block produces them."""
    n = max(1, case["sequences"] // HEADS)
    t, d = case["T"], case["D"]
    qkv = torch.randn(n, t, 3, HEADS, d, device=device, dtype=dtype, requires_grad=True)
    bias = None
    if case.get("bias"):
        bias = torch.randn(HEADS, t, t, device=device, dtype=dtype, requires_grad=True)
    return qkv, bias


def pass_callable(impl, case, device, dtype, pass_name):
    """A no-argument function running one pass of ``impl`` on fresh inputs for ``case``."""
    fn = IMPLS[impl]
    qkv, bias = make_inputs(case, device, dtype)
    q, k, v = qkv.unbind(2)
    causal = bool(case.get("causal"))
    leaves = [qkv] + ([bias] if bias is not None else [])
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, bias, causal)
        return run
    grad = torch.randn(qkv.shape[0], case["T"], HEADS, case["D"], device=device, dtype=dtype)
    if pass_name == "bwd":
        out = fn(q, k, v, bias, causal)
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v, bias, causal), leaves, grad)


def _memory_fits(case, device, dtype) -> bool:
    if torch.device(device).type != "cuda":
        return True
    s, t, d = case["sequences"], case["T"], case["D"]
    elt = torch.tensor([], dtype=dtype).element_size()
    need = 12 * s * t * d * elt + 4 * s * t * t * 4  # inputs, grads, outputs + a score matrix for peers
    return need < 0.6 * torch.cuda.mem_get_info(device)[0]


# --------------------------------------------------------------------------------------------------
# Plain entry point
# --------------------------------------------------------------------------------------------------


def run_benchmark(device, sizes=None, out_path=None, *, impls=None, dtype=None, repeats=5, log=print) -> list[dict]:
    """Time every implementation on every case and pass, side by side; write rows to out_path (.json and .csv)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    sizes = sizes if sizes is not None else (GPU_SWEEP if on_gpu else CPU_SMOKE)
    impls = tuple(impls or default_impls(device))
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    label = utils.device_name(device) if on_gpu else "cpu-smoke (tiny sizes; not a performance number)"
    date = utils.today()
    rows = []
    for case in sizes:
        # the ceiling at this case's smallest pass's traffic (on a CPU a tiny case copies from cache, and a smaller
        # working set copies faster: the highest ceiling of the passes); a GPU run flushes L2 between calls
        traffic = traffic_and_flops(case, dtype, "fwd")[0]
        copy_gbs = utils.copy_bandwidth_gbs(device, None if on_gpu else traffic, repeats)
        case_rows = []
        for pass_name in PASSES:
            base = {"gpu": label, "date": date, "pass": pass_name, "sequences": case["sequences"], "T": case["T"],
                    "D": case["D"], "H": HEADS, "bias": bool(case.get("bias")), "causal": bool(case.get("causal")),
                    "dtype": str(dtype).removeprefix("torch."), "copy_GB/s": utils.significant(copy_gbs)}
            if not _memory_fits(case, device, dtype):
                case_rows += [{**base, "impl": impl, "status": "skipped: does not fit in free device memory"}
                              for impl in impls]
                continue
            accepted = {}
            for impl in impls:
                try:
                    fn = pass_callable(impl, case, device, dtype, pass_name)
                    fn()  # the first call is the warm-up (and compilation); a peer may refuse the case here
                    accepted[impl] = fn
                except Exception as err:  # a peer refusing the case is a result, not a failure
                    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                    case_rows.append({**base, "impl": impl, "status": f"refused: {reason}"})
            timings = utils.side_by_side(accepted, device, repeats, warmup=0)
            nbytes, flops = traffic_and_flops(case, dtype, pass_name)
            for impl, timing in timings.items():
                gbs = nbytes / (timing.median * 1e-3) / 1e9
                case_rows.append({**base, "impl": impl, "status": "ok", **timing.fields(),
                                  "GB/s": utils.significant(gbs),
                                  "TFLOP/s": round(flops / (timing.median * 1e-3) / 1e12, 4),
                                  "share_of_copy_bw": round(gbs / copy_gbs, 4)})
            if on_gpu:
                torch.cuda.empty_cache()
        _add_peer_ratios(case_rows)
        for row in case_rows:
            log(_format_row(row))
        rows += case_rows
    if out_path is not None:
        utils.write_rows(rows, out_path)
        log(f"wrote {len(rows)} rows to {Path(out_path).with_suffix('.json')} and .csv")
    return rows


def _add_peer_ratios(case_rows):
    for pass_name in PASSES:
        timed = [r for r in case_rows if r["pass"] == pass_name and r["status"] == "ok"]
        peers = [r for r in timed if r["impl"] != "ours"]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["ms"])
        for r in timed:
            r["best_peer"] = best["impl"]
            r["speedup_vs_best_peer"] = round(best["ms"] / r["ms"], 3)


def _format_row(row):
    head = f"{row['impl']:>19} {row['pass']:>7} S={row['sequences']:>8} T={row['T']:>2} D={row['D']:>3}"
    if row["status"] != "ok":
        return f"{head}  {row['status']}"
    return (f"{head} {row['ms']:9.4f} ms {row['GB/s']:8.1f} GB/s {row['TFLOP/s']:7.3f} TFLOP/s "
            f"{100 * row['share_of_copy_bw']:5.1f}% of copy  "
            f"x{row.get('speedup_vs_best_peer', float('nan')):.2f} vs {row.get('best_peer', '-')}")


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# smoke sizes: one intra-op thread (conftest.py's fixture; a second thread only spin-waits on tiny ops)
pytestmark = pytest.mark.usefixtures("one_thread")
BENCH_SIZES = GPU_REPRESENTATIVE if DEVICE == "cuda" else CPU_SMOKE
BENCH_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _case_id(case):
    extra = "".join(f"-{k}" for k in ("bias", "causal") if case.get(k))
    return f"S{case['sequences']}-T{case['T']}-D{case['D']}{extra}"


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("impl", default_impls(DEVICE))
@pytest.mark.parametrize("case", BENCH_SIZES, ids=_case_id)
def test_temporal_attention(benchmark, case, impl, pass_name):
    where = "cpu-smoke" if DEVICE == "cpu" else DEVICE
    benchmark.group = f"temporal_attention {_case_id(case)} {pass_name} ({where})"
    try:
        fn = pass_callable(impl, case, DEVICE, BENCH_DTYPE, pass_name)
        fn()
    except Exception as err:
        pytest.skip(f"{impl} refused this case: {err}")
    if DEVICE == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(timed, rounds=20, warmup_rounds=3)
    else:
        benchmark(fn)


def test_run_benchmark_writes_rows(tmp_path):
    """The plain entry point: rows with the accounting fields, written as JSON and CSV, no share above 1."""
    out = tmp_path / "bench_temporal_attention.json"
    sizes = CPU_SMOKE if DEVICE == "cpu" else GPU_REPRESENTATIVE
    rows = run_benchmark(DEVICE, sizes, out, repeats=1 if DEVICE == "cpu" else 5, log=lambda *_: None)
    assert rows and all(r["status"] == "ok" for r in rows if r["impl"] in ("ours", "reference"))
    assert {"ms", "iqr_ms", "GB/s", "TFLOP/s", "share_of_copy_bw"} <= set(rows[0])
    assert not utils.share_violations(rows)
    assert json.loads(out.read_text()) == rows
    assert out.with_suffix(".csv").read_text().count("\n") == len(rows) + 1


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_sweep():
    """The full GPU sweep (minutes): rows under profiles/<gpu>/ unless FASTDIFF_BENCH_OUT says otherwise."""
    rows = run_benchmark("cuda", GPU_SWEEP, utils.default_out_path("cuda", "bench_temporal_attention"))
    assert any(r["impl"] == "ours" and r["status"] == "ok" for r in rows)
    assert not utils.share_violations(rows)


def main(argv=None) -> int:
    parser = utils.parser(__doc__)
    parser.add_argument("--impls", default=None, help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--sequences", type=int, nargs="+", help="time these sequence counts only (with --frames, "
                                                                 "--head-dim), e.g. 70000 300000")
    parser.add_argument("--frames", type=int, default=16, help="T of the --sequences cases")
    parser.add_argument("--head-dim", type=int, default=64, help="D of the --sequences cases")
    args = parser.parse_args(argv)
    run = utils.resolve(args, "bench_temporal_attention")
    on_gpu = run.device.type == "cuda"
    sizes = (GPU_REPRESENTATIVE if on_gpu else CPU_SMOKE) if run.smoke else None
    if args.sequences:
        sizes = [{"sequences": n, "T": args.frames, "D": args.head_dim} for n in args.sequences]
    with utils.smoke_compile(run):
        run_benchmark(run.device, sizes, run.out, impls=args.impls.split(",") if args.impls else None,
                      repeats=run.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
