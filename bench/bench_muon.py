"""Benchmark: one Muon step over a model's hidden matrices, ours (fastdiff.optim.BatchedMuon: the Newton-Schulz
iteration batched over matrices of one shape) vs torch.optim.Muon (one matrix at a time), side by side in one run,
with fused AdamW over the same matrices for scale.

Sizes are the hidden matrices of the presets' DiTs (``VideoDiT.hidden_matrices``): `tiny` (width 96, depth 4: 28
matrices in 4 shapes) and a width-384, depth-12 model (the size of the GPU presets' blocks). Reported per (size,
impl): ms (median and IQR, interleaved), achieved GFLOP/s of the Newton-Schulz matmuls (5 iterations of 4 r^2 c
+ 2 r^3 flops for an r x c matrix, r <= c), that rate's share of the best bf16 matmul rate measured in the same
run on the same shapes, and the speed-up vs torch's Muon. CPU rows at one thread (as the study trains);
--smoke runs one small size once.

    python bench/bench_muon.py [--device cpu] [--out FILE.json] [--smoke] [--repeats N]
    pytest bench/bench_muon.py            (CI: --benchmark-disable, each function once)
"""

from __future__ import annotations

import json

import pytest
import torch
import utils

from fastdiff.models.dit import VideoDiT
from fastdiff.optim import BatchedMuon

IMPLS = ("torch-muon", "ours", "adamw-fused")
SIZES = [{"width": 96, "depth": 4, "heads": 3}, {"width": 384, "depth": 12, "heads": 6}]
SMOKE_SIZES = [{"width": 32, "depth": 1, "heads": 2}]
NS_STEPS = 5  # torch's default, which both Muons run


def hidden_matrices(size, device) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = VideoDiT(3, 32, 32, 10, width=size["width"], depth=size["depth"], heads=size["heads"], patch=4,
                     local_mix=True).to(device)
    matrices = model.hidden_matrices()
    for p in matrices:
        p.grad = torch.randn_like(p)
    return matrices


def newton_schulz_flops(matrices) -> float:
    total = 0.0
    for p in matrices:
        r, c = sorted(p.shape)
        total += NS_STEPS * (4.0 * r * r * c + 2.0 * r**3)
    return total


def optimizers(matrices) -> dict:
    # tiny lr: the weights barely move over the repeats, so every call sees the same matrices
    return {"torch-muon": torch.optim.Muon(matrices, lr=1e-8, adjust_lr_fn="match_rms_adamw"),
            "ours": BatchedMuon(matrices, lr=1e-8, adjust_lr_fn="match_rms_adamw"),
            "adamw-fused": torch.optim.AdamW(matrices, lr=1e-8, fused=True)}


def run_benchmark(device=None, sizes=None, out_path=None, *, repeats=20, log=print) -> list[dict]:
    """Time every (size, impl) at one thread on a CPU; return the rows and write them (JSON + CSV) to out_path."""
    device = torch.device(device or "cpu")
    name, date = utils.device_name(device), utils.today()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = []
    try:
        for size in sizes or SIZES:
            matrices = hidden_matrices(size, device)
            shapes = sorted({tuple(sorted(p.shape)) for p in matrices})
            matmuls = [s for r, c in shapes for s in ((r, c, r), (r, r, c))]  # x x^T and (b G + c G G) x
            ceiling, ceiling_label = utils.matmul_ceiling_tflops(device, matmuls, [torch.bfloat16], repeats=3)
            opts = optimizers(matrices)
            timed = utils.side_by_side({impl: opt.step for impl, opt in opts.items()}, device, repeats, warmup=2)
            flops = newton_schulz_flops(matrices)
            label = f"w{size['width']}-d{size['depth']}"
            for impl, t in timed.items():
                row = dict(op="muon_step", impl=impl, size=label, **size, matrices=len(matrices),
                           shapes=len(shapes), **t.fields(), speedup_vs_torch_muon=round(
                               timed["torch-muon"].median / t.median, 3), device=name, date=date,
                           threads=torch.get_num_threads())
                if impl != "adamw-fused":
                    rate = flops / t.median / 1e6  # GFLOP/s: flops per ms / 1e6
                    row.update({"GFLOP/s": utils.significant(rate), "ceiling_bf16_matmul_GFLOP/s":
                                utils.significant(ceiling * 1e3), "ceiling_shape": ceiling_label,
                                f"{utils.SHARE_PREFIX}bf16_matmul": round(rate / (ceiling * 1e3), 3)})
                rows.append(row)
                log(f"{label:10} {impl:12} {t.median:8.3f} ms (IQR {t.iqr:.3f})  x{row['speedup_vs_torch_muon']:.2f} "
                    f"vs torch's Muon" + (f"  {row['GFLOP/s']:7.1f} GFLOP/s" if "GFLOP/s" in row else ""))
    finally:
        torch.set_num_threads(threads)
    if out_path:
        utils.write_rows(rows, out_path)
    return rows


# ---------------------------------------------------------------------------------------------- pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_muon(benchmark, impl):
    matrices = hidden_matrices(SMOKE_SIZES[0], DEVICE)
    before = [p.detach().clone() for p in matrices]
    benchmark.group = f"muon step ({DEVICE})"
    benchmark(optimizers(matrices)[impl].step)
    assert any(not torch.equal(p, q) for p, q in zip(matrices, before))


def test_run_benchmark_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    rows = run_benchmark(DEVICE, SMOKE_SIZES, out, repeats=1, log=lambda *_: None)
    assert json.loads(out.read_text()) == rows and out.with_suffix(".csv").exists()
    assert {r["impl"] for r in rows} == set(IMPLS)
    assert all(r["ms"] > 0 and r["device"] and r["date"] for r in rows)
    assert not utils.share_violations(rows, limit=1.5)  # a GFLOP/s above the measured ceiling is a miscount


def main(argv=None) -> int:
    run = utils.resolve(utils.parser(__doc__).parse_args(argv), "bench_muon", repeats=20)
    run_benchmark(run.device, SMOKE_SIZES if run.smoke else None, run.out, repeats=run.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
