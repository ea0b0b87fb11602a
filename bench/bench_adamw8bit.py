"""Benchmark: optimizer step time and state memory on the DiT presets' parameter sets, side by side:
our fused 8-bit AdamW (kernels/adamw8bit.py), bitsandbytes' AdamW8bit and torch AdamW (fused on CUDA).

Reported per (preset, optimizer): ms per step, parameters, state bytes per parameter, achieved GB/s over
the minimum traffic of one step (8-bit: read p, g and both uint8 moments, write p and the moments, plus
absmax; fp32: read p, g, m, v and write p, m, v), its share of the device-copy bandwidth measured in the
same run, and ours' speedup over bitsandbytes and over torch AdamW.

    python bench/bench_adamw8bit.py [--presets tiny small base] [--device cuda] [--out FILE.json] [--smoke]
                                    [--repeats N]

On a GPU, rows go to $FASTDIFF_BENCH_OUT or profiles/<gpu>/bench_adamw8bit.json (+ .csv). On a CPU it is
a smoke run ("cpu-smoke" rows): our optimizer takes its PyTorch reference path there, so the CPU times
say nothing about the Triton kernel. --smoke: the tiny preset's parameters only. Timing, ceilings, rows
files and the flags are bench/utils.py's.
"""

from __future__ import annotations

import pytest
import torch
import utils

from fastdiff.config import build_config
from fastdiff.models.dit import VideoDiT
from fastdiff.optim import build_optimizer

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


def run_benchmark(device=None, presets=("tiny", "small", "base"), out_path=None, *, repeats=5,
                  log=print) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    gpu = utils.device_name(device)
    rows = []
    for preset in presets:
        by_impl, steps, optimizers = {}, {}, {}
        for impl in IMPLS:
            params = preset_parameters(preset, device)
            row = {"gpu": gpu if on_gpu else "cpu-smoke", "date": utils.today(),
                   "preset": preset, "impl": impl, "parameters": sum(p.numel() for p in params)}
            try:
                opt = build_optimizer(impl, params, lr=1e-4, weight_decay=1e-5)
                opt.step()  # allocates state (and compiles/launch-caches) outside the timing
            except Exception as err:  # e.g. bitsandbytes without a CUDA build on this GPU
                row.update(status=f"not run because {err}")
                rows.append(row)
                continue
            by_impl[impl], steps[impl], optimizers[impl] = row, opt.step, (opt, params)
            rows.append(row)
        # the ceiling at the fp32 step's traffic (on a CPU the tiny preset's state partly fits in cache)
        copy_gbs = utils.copy_bandwidth_gbs(
            device, None if on_gpu else step_traffic_bytes(preset_parameters(preset, "cpu"), "adamw"), repeats)
        timed = utils.side_by_side(steps, device, repeats, warmup=0)  # the step above was the warm-up
        for impl, row in by_impl.items():
            opt, params = optimizers[impl]
            gbs = step_traffic_bytes(params, impl) / (timed[impl].median * 1e-3) / 1e9
            per_param = state_bytes(opt) / row["parameters"]
            row.update(status="ok", **timed[impl].fields(), state_bytes_per_param=round(per_param, 3),
                       **{"GB/s": utils.significant(gbs), "copy_GB/s": utils.significant(copy_gbs),
                          "share_of_copy_bw": round(gbs / copy_gbs, 3)})
        ours = by_impl.get("adamw8bit-fused")
        if ours:
            for peer, key in (("adamw8bit-bnb", "speedup_vs_bnb"), ("adamw", "speedup_vs_torch_adamw")):
                if peer in by_impl:
                    ours[key] = round(by_impl[peer]["ms"] / ours["ms"], 3)
        for row in rows[-len(IMPLS):]:
            log("  ".join(f"{k}={v}" for k, v in row.items() if k not in ("date",)))
    if out_path is not None:
        utils.write_rows(rows, out_path)
    return rows


# ---- pytest (smoke on CPU, the real run on a GPU) ----------------------------------------------

# smoke sizes: one intra-op thread (conftest.py's fixture; a second thread only spin-waits on tiny ops)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_adamw8bit_benchmark_rows(benchmark, tmp_path):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = benchmark.pedantic(run_benchmark, args=(device, ("tiny",), tmp_path / "rows.json"),
                              kwargs={"repeats": 5 if device == "cuda" else 1, "log": lambda *_: None},
                              rounds=1, iterations=1)
    assert {r["impl"] for r in rows} == set(IMPLS)
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    assert "adamw8bit-fused" in ok and "adamw" in ok
    # 8-bit state is a quarter of fp32 AdamW's on the tensors big enough for it
    assert ok["adamw8bit-fused"]["state_bytes_per_param"] < 0.6 * ok["adamw"]["state_bytes_per_param"]
    assert not utils.share_violations(rows)
    assert (tmp_path / "rows.csv").exists()


def main(argv=None) -> int:
    parser = utils.parser(__doc__)
    parser.add_argument("--presets", nargs="+", default=None, choices=list(PRESET_LATENT),
                        help="default: tiny small base (--smoke: tiny)")
    args = parser.parse_args(argv)
    run = utils.resolve(args, "bench_adamw8bit")
    presets = args.presets or (["tiny"] if run.smoke else ["tiny", "small", "base"])
    run_benchmark(run.device, tuple(presets), run.out, repeats=run.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
