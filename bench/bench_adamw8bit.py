"""Benchmark: optimizer step time and state memory on the DiT presets' parameter sets, side by side:
our fused 8-bit AdamW (kernels/adamw8bit.py), bitsandbytes' AdamW8bit and torch AdamW (fused on CUDA).

Reported per (preset, optimizer): ms per step, parameters, state bytes per parameter, achieved GB/s over
the minimum traffic of one step (8-bit: read p, g and both uint8 moments, write p and the moments, plus
absmax; fp32: read p, g, m, v and write p, m, v), its share of the device-copy bandwidth measured in the
same run, and ours' speedup over bitsandbytes and over torch AdamW.

    python bench/bench_adamw8bit.py [--presets tiny small base] [--out FILE.json]

On a GPU, rows go to $FASTDIFF_BENCH_OUT or profiles/<gpu>/bench_adamw8bit.json (+ .csv). On a CPU it is
a smoke run ("cpu-smoke" rows): our optimizer takes its PyTorch reference path there, so the CPU times
say nothing about the Triton kernel.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_temporal_attention import copy_bandwidth_gbs, time_ms, write_rows
from bench_temporal_attention import default_out_path as shared_out_path  # noqa: E402

from fastdiff.config import build_config  # noqa: E402
from fastdiff.models.dit import VideoDiT  # noqa: E402
from fastdiff.optim import build_optimizer  # noqa: E402
from fastdiff_kernels import autotune  # noqa: E402

IMPLS = ("adamw8bit-fused", "adamw8bit-bnb", "adamw")
# The latent each preset trains on: balls 32x32 -> 4x8x8, K=10; the maze 64x64 -> 4x16x16, K=20.
PRESET_LATENT = {"tiny": (4, 8, 8, 10), "small": (4, 8, 8, 10), "base": (4, 16, 16, 20)}


def preset_parameters(preset: str, device) -> list[torch.nn.Parameter]:
    m = build_config(preset).model
    c, h, w, k = PRESET_LATENT[preset]
    torch.manual_seed(0)
    model = VideoDiT(c, h, w, k, width=m.width, depth=m.depth, heads=m.heads, patch=m.patch,
                     mlp_ratio=m.mlp_ratio).to(device)
    params = list(model.parameters())
    for p in params:  # random gradients, fixed across steps: the step's cost does not depend on them
        p.grad = torch.randn_like(p) * 1e-2
    return params


def state_bytes(optimizer) -> int:
    if hasattr(optimizer, "state_nbytes"):
        return sum(optimizer.state_nbytes().values())
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):  # bitsandbytes nests its quantisation state
                total += sum(v.numel() * v.element_size() for v in value.values() if isinstance(v, torch.Tensor))
    return total


def step_traffic_bytes(params, impl: str) -> int:
    numel = sum(p.numel() for p in params)
    param_bytes = params[0].element_size()
    if impl == "adamw":
        return numel * (2 * param_bytes + 2 * 4 + param_bytes + 2 * 4)  # read p, g, m, v; write p, m, v
    return numel * (2 * param_bytes + 2 + param_bytes + 2)  # uint8 moments (absmax is 1/256 of that)


def run_benchmark(device=None, presets=("tiny", "small", "base"), out_path=None, log=print) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    gpu = autotune.device_name(device)
    copy_gbs = copy_bandwidth_gbs(device)
    rows = []
    for preset in presets:
        by_impl = {}
        for impl in IMPLS:
            params = preset_parameters(preset, device)
            row = {"gpu": gpu if on_gpu else "cpu-smoke", "date": datetime.date.today().isoformat(),
                   "preset": preset, "impl": impl, "parameters": sum(p.numel() for p in params),
                   "copy_GB/s": round(copy_gbs, 1)}
            try:
                opt = build_optimizer(impl, params, lr=1e-4, weight_decay=1e-5)
                opt.step()  # allocates state (and compiles/launch-caches) outside the timing
                ms = time_ms(opt.step, device)
            except Exception as err:  # e.g. bitsandbytes without a CUDA build on this GPU
                row.update(status=f"not run because {err}")
                rows.append(row)
                continue
            gbs = step_traffic_bytes(params, impl) / (ms * 1e-3) / 1e9
            per_param = state_bytes(opt) / row["parameters"]
            row.update(status="ok", ms=round(ms, 4), state_bytes_per_param=round(per_param, 3),
                       **{"GB/s": round(gbs, 1), "share_of_copy_bw": round(gbs / copy_gbs, 3)})
            by_impl[impl] = row
            rows.append(row)
        ours = by_impl.get("adamw8bit-fused")
        if ours:
            for peer, key in (("adamw8bit-bnb", "speedup_vs_bnb"), ("adamw", "speedup_vs_torch_adamw")):
                if peer in by_impl:
                    ours[key] = round(by_impl[peer]["ms"] / ours["ms"], 3)
        for row in rows[-len(IMPLS):]:
            log("  ".join(f"{k}={v}" for k, v in row.items() if k not in ("date",)))
    if out_path is not None:
        write_rows(rows, out_path)
    return rows


def default_out_path(device) -> Path | None:
    return shared_out_path(device, "bench_adamw8bit")


# ---- pytest (smoke on CPU, the real run on a GPU) ----------------------------------------------


def test_adamw8bit_benchmark_rows(benchmark, tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = benchmark.pedantic(run_benchmark, args=(device, ("tiny",), tmp_path / "rows.json"),
                              kwargs={"log": lambda *_: None}, rounds=1, iterations=1)
    assert {r["impl"] for r in rows} == set(IMPLS)
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    assert "adamw8bit-fused" in ok and "adamw" in ok
    # 8-bit state is a quarter of fp32 AdamW's on the tensors big enough for it
    assert ok["adamw8bit-fused"]["state_bytes_per_param"] < 0.6 * ok["adamw"]["state_bytes_per_param"]
    assert (tmp_path / "rows.csv").exists()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"], choices=list(PRESET_LATENT))
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="rows .json (+ .csv beside it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_benchmark(device, tuple(args.presets), args.out or default_out_path(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
