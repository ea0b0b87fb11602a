"""Benchmark: the local mix's depthwise 3-D convolution, forward + backward, ours (fastdiff.models.dit.
depthwise_conv3d: on a CPU its backward is two more convolutions) vs eager F.conv3d with PyTorch's own backward,
side by side in one run, on the tensors `tiny` trains and samples with (channels-last views of its tokens).

Reported per (size, pass, impl): ms (median and IQR, interleaved), achieved GFLOP/s (2 flops per
multiply-add: the forward's, plus the backward's two of the same size), and the speed-up vs eager. On CUDA ours
is F.conv3d (cuDNN's own backward), so its rows there only confirm that nothing changed. CPU rows are a real
measurement (the op exists for the CPU), at one thread; --smoke runs one small size once.

    python bench/bench_local_mix.py [--device cpu] [--out FILE.json] [--smoke] [--repeats N]
    pytest bench/bench_local_mix.py            (CI: --benchmark-disable, each function once)
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import utils

from fastdiff.models.dit import depthwise_conv3d

PASSES = ("fwd", "fwd+bwd")
IMPLS = ("eager", "ours")
# tiny: width 96, 10 frames of 8 x 8 tokens; 2 windows a training step, 24 a sampling call (8 clips x 3 samples)
SIZES = [{"batch": 2, "D": 96, "K": 10, "grid": 8, "kernel": 3},
         {"batch": 2, "D": 96, "K": 10, "grid": 8, "kernel": 5},
         {"batch": 24, "D": 96, "K": 10, "grid": 8, "kernel": 3}]
SMOKE_SIZES = [{"batch": 2, "D": 16, "K": 4, "grid": 4, "kernel": 3}]


def eager(volume, weight, bias, padding):
    return F.conv3d(volume, weight, bias, padding=padding, groups=weight.shape[0])


def make_inputs(size, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, d, k, n, kernel = size["batch"], size["D"], size["K"], size["grid"], size["kernel"]
    tokens = torch.randn(b, k, n, n, d, generator=g).to(device)
    weight = torch.randn(d, 1, 3, kernel, kernel, generator=g).to(device)
    bias = torch.randn(d, generator=g).to(device)
    grad = torch.randn(b, d, k, n, n, generator=g).to(device)
    return tokens, weight, bias, (1, kernel // 2, kernel // 2), grad


def flops(size, pass_name) -> float:
    b, d, k, n, kernel = size["batch"], size["D"], size["K"], size["grid"], size["kernel"]
    forward = 2.0 * b * d * k * n * n * 3 * kernel * kernel
    return forward if pass_name == "fwd" else 3 * forward


def pass_callable(fn, tokens, weight, bias, padding, grad, pass_name):
    if pass_name == "fwd":
        volume = tokens.permute(0, 4, 1, 2, 3)
        return lambda: fn(volume, weight, bias, padding)
    leaves = [t.detach().requires_grad_() for t in (tokens, weight, bias)]

    def fwd_bwd():
        return torch.autograd.grad(fn(leaves[0].permute(0, 4, 1, 2, 3), leaves[1], leaves[2], padding), leaves, grad)

    return fwd_bwd


def run_benchmark(device=None, sizes=None, out_path=None, *, repeats=20, log=print) -> list[dict]:
    """Time every (size, pass, impl) at one thread; return the rows and write them (JSON + CSV) to out_path."""
    device = torch.device(device or "cpu")
    name, date = utils.device_name(device), utils.today()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the study trains: one row per core
    rows = []
    try:
        for size in sizes or SIZES:
            inputs = make_inputs(size, device)
            for pass_name in PASSES:
                fns = {"eager": eager, "ours": depthwise_conv3d}
                timed = utils.side_by_side({impl: pass_callable(fns[impl], *inputs, pass_name) for impl in IMPLS},
                                           device, repeats, warmup=2)
                for impl, t in timed.items():
                    row = dict(op="local_mix_conv", impl=impl, size=_label(size), **size, **{"pass": pass_name},
                               **t.fields(), **{"GFLOP/s": utils.significant(flops(size, pass_name) / t.median / 1e6)},
                               speedup_vs_eager=round(timed["eager"].median / t.median, 3), device=name, date=date,
                               threads=torch.get_num_threads())
                    rows.append(row)
                    log(f"{row['size']:22} {pass_name:7} {impl:5} {t.median:8.3f} ms (IQR {t.iqr:.3f}) "
                        f"{row['GFLOP/s']:7.2f} GFLOP/s  x{row['speedup_vs_eager']:.2f} vs eager")
    finally:
        torch.set_num_threads(threads)
    if out_path:
        utils.write_rows(rows, out_path)
    return rows


def _label(size) -> str:
    return f"B{size['batch']}-D{size['D']}-K{size['K']}-{size['grid']}x{size['grid']}-k{size['kernel']}"


# ---------------------------------------------------------------------------------------------- pytest

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_local_mix(benchmark, impl):
    fn = pass_callable(depthwise_conv3d if impl == "ours" else eager, *make_inputs(SMOKE_SIZES[0], DEVICE), "fwd+bwd")
    benchmark.group = f"local_mix_conv fwd+bwd ({DEVICE})"
    grads = benchmark(fn)
    assert len(grads) == 3


def test_run_benchmark_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    rows = run_benchmark(DEVICE, SMOKE_SIZES, out, repeats=1, log=lambda *_: None)
    assert json.loads(out.read_text()) == rows and out.with_suffix(".csv").exists()
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in IMPLS for p in PASSES}
    assert all(r["ms"] > 0 and r["GFLOP/s"] > 0 and r["device"] and r["date"] for r in rows)


def main(argv=None) -> int:
    run = utils.resolve(utils.parser(__doc__).parse_args(argv), "bench_local_mix", repeats=20)
    run_benchmark(run.device, SMOKE_SIZES if run.smoke else None, run.out, repeats=run.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
