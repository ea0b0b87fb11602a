"""Benchmark: fused per-frame noise-schedule ops vs eager PyTorch and torch.compile of the reference.

Ops timed side by side in one run: add_noise (v target, given noise; eps target, in-kernel Philox),
frame_mse_loss forward+backward, ddim_step (eta > 0, given noise). Reported per row: time, achieved
GB/s (minimum traffic: each input read once, each output written once), share of the device copy
bandwidth measured in the same run, and speed-ups vs eager and vs compiled reference.

On a GPU: preset sizes (balls, maze latents) and large ones (--smoke: the preset sizes); rows go to
profiles/<gpu>/bench_noise_schedule.json (+ .csv). On a CPU: tiny smoke sizes, reference and compile only,
rows labelled ``smoke`` (the numbers mean nothing about the kernels). Timing, ceilings, rows files and the
flags are bench/utils.py's:

    python bench/bench_noise_schedule.py [--device cuda] [--out FILE.json] [--smoke] [--repeats N]
    pytest bench/bench_noise_schedule.py            (CI: --benchmark-disable, each function once)
"""

from __future__ import annotations

import json

import pytest
import torch
import utils

from fastdiff_kernels import dispatch
from fastdiff_kernels import noise_schedule as ns

GPU_SIZES = {
    "balls": (2, 10, 4, 8, 8),
    "maze": (4, 20, 4, 16, 16),
    "large": (32, 16, 4, 64, 64),
    "large_c16": (8, 16, 16, 64, 64),
}
CPU_SIZES = {"smoke": (2, 4, 4, 8, 8)}
STEPS = 1000


def _inputs(shape, device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    alpha_bar = torch.cos(torch.linspace(0.02, 1.5, STEPS, dtype=torch.float64)) ** 2
    b, k = shape[:2]
    return dict(
        x0=torch.randn(shape, generator=g).to(device, dtype),
        noise=torch.randn(shape, generator=g).to(device, dtype),
        pred=torch.randn(shape, generator=g).to(device, dtype),
        t=torch.randint(1, STEPS, (b, k), generator=g).to(device),
        observed=(torch.rand(b, k, generator=g) < 0.25).to(device),
        weight=torch.rand(b, k, generator=g).to(device) + 0.5,
        alpha=alpha_bar.sqrt().float().to(device),
        sigma=(1 - alpha_bar).sqrt().float().to(device),
    )


def _cases(v, compile_fn=lambda f: f):
    """[(op, traffic, {impl: callable})]: traffic in units of numel * itemsize (each input read once,
    each output written once); ``compile_fn`` wraps the reference's forward for the compile row."""
    x0, t, obs, alpha, sigma, noise, w = (
        v[k] for k in ("x0", "t", "observed", "alpha", "sigma", "noise", "weight")
    )
    t_prev = (t - 50).clamp_min(-1)
    pred = v["pred"].clone().requires_grad_()

    def add_noise_v_ref(x0, noise):
        return ns.add_noise_reference(x0, t, obs, alpha, sigma, noise, "v")

    def add_noise_eps_ref(x0):
        return ns.add_noise_reference(x0, t, obs, alpha, sigma, torch.randn_like(x0), "eps")

    def loss_ref(p):
        return ns.frame_mse_loss_reference(p, noise, w, obs)

    def ddim_ref(x, m, z):
        return ns.ddim_step_reference(x, m, t, t_prev, alpha, sigma, z, eta=0.5, prediction="eps")

    c_add_v, c_add_eps, c_loss, c_ddim = (
        compile_fn(f) for f in (add_noise_v_ref, add_noise_eps_ref, loss_ref, ddim_ref)
    )
    return [
        (
            "add_noise_v",
            4,
            {  # reads x0, noise; writes x_t, target
                "eager": lambda: add_noise_v_ref(x0, noise),
                "compile": lambda: c_add_v(x0, noise),
                "ours": lambda: ns.add_noise(x0, t, obs, alpha, sigma, noise=noise, prediction="v"),
            },
        ),
        (
            "add_noise_philox_eps",
            3,
            {  # reads x0; writes x_t, target (noise drawn, not read)
                "eager": lambda: add_noise_eps_ref(x0),
                "compile": lambda: c_add_eps(x0),
                "ours": lambda: ns.add_noise(x0, t, obs, alpha, sigma, seed=1, offset=0),
            },
        ),
        (
            "frame_mse_loss_fwd_bwd",
            5,
            {  # forward reads 2; backward reads 2, writes 1
                "eager": lambda: torch.autograd.grad(loss_ref(pred), pred),
                "compile": lambda: torch.autograd.grad(c_loss(pred), pred),
                "ours": lambda: torch.autograd.grad(ns.frame_mse_loss(pred, noise, w, obs), pred),
            },
        ),
        (
            "ddim_step_eta",
            4,
            {  # reads x, model_out, noise; writes x_prev
                "eager": lambda: ddim_ref(x0, v["pred"], noise),
                "compile": lambda: c_ddim(x0, v["pred"], noise),
                "ours": lambda: ns.ddim_step(x0, v["pred"], t, t_prev, alpha, sigma, eta=0.5, noise=noise),
            },
        ),
    ]


def _run(device, sizes, on_gpu, name, date, repeats) -> list[dict]:
    rows = []
    for label, shape in sizes.items():
        v = _inputs(shape, device)
        numel, itemsize = v["x0"].numel(), v["x0"].element_size()
        # the ceiling at the smallest op's traffic (the ops move 3-5 tensors of this size; on a CPU a tiny working
        # set is in cache and copies the faster the smaller it is: the highest ceiling of the ops)
        copy_gbs = utils.copy_bandwidth_gbs(device, None if on_gpu else 3 * numel * itemsize, repeats)
        for op, traffic, impls in _cases(v, lambda f: torch.compile(f, dynamic=False)):
            if not on_gpu:
                if op not in ("add_noise_v", "frame_mse_loss_fwd_bwd"):
                    continue  # CPU smoke: keep compile time small
                impls = {k: f for k, f in impls.items() if k != "ours"}  # no Triton timing off-GPU
            with dispatch.backend_override("auto"):
                timed = utils.side_by_side(impls, device, repeats)
            timings = {impl: t.median for impl, t in timed.items()}
            for impl, ms in timings.items():
                gbs = traffic * numel * itemsize / (ms * 1e-3) / 1e9
                rows.append(
                    dict(
                        op=op,
                        impl=impl,
                        size=label,
                        shape=list(shape),
                        dtype="float32",
                        **timed[impl].fields(),
                        gb_per_s=utils.significant(gbs),
                        copy_gb_per_s=utils.significant(copy_gbs),
                        share_of_copy_bw=round(gbs / copy_gbs, 3),
                        speedup_vs_eager=round(timings["eager"] / ms, 3),
                        speedup_vs_compile=round(timings["compile"] / ms, 3),
                        device=name,
                        date=date,
                        smoke=not on_gpu,
                    )
                )
    return rows


def run_benchmark(device=None, out_path=None, *, sizes=None, repeats=5) -> list[dict]:
    """Time every case at every size for ours / eager / compiled reference; return (and write) rows."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    sizes = sizes or (GPU_SIZES if on_gpu else CPU_SIZES)
    threads = torch.get_num_threads()
    if not on_gpu:
        torch.set_num_threads(1)  # tiny smoke sizes: OpenMP fan-out only adds spin/wake-up noise
    try:
        rows = _run(device, sizes, on_gpu, utils.device_name(device), utils.today(), repeats)
    finally:
        torch.set_num_threads(threads)
    if out_path:
        utils.write_rows(rows, out_path)
    return rows


def _print(rows):
    print(f"{'op':24} {'size':10} {'impl':8} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'x eager':>8} {'x comp':>7}")
    for r in rows:
        print(
            f"{r['op']:24} {r['size']:10} {r['impl']:8} {r['ms']:9.4f} {r['gb_per_s']:8.1f} "
            f"{100 * r['share_of_copy_bw']:5.1f}% {r['speedup_vs_eager']:8.2f} {r['speedup_vs_compile']:7.2f}"
        )
    if rows:
        print(f"device: {rows[0]['device']}  date: {rows[0]['date']}  smoke: {rows[0]['smoke']}")


# ---------------------------------------------------------------------------------------------- pytest


_SMOKE = (2, 4, 4, 8, 8)


@pytest.fixture(scope="module")
def smoke_inputs():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _inputs(_SMOKE if device.type == "cpu" else GPU_SIZES["maze"], device)


@pytest.mark.parametrize("impl", ["eager", "ours"])
@pytest.mark.parametrize("case", ["add_noise_v", "frame_mse_loss_fwd_bwd", "ddim_step_eta"])
def test_bench_noise_schedule(benchmark, smoke_inputs, case, impl):
    if impl == "ours" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels are benchmarked on CUDA only (interpreter timings mean nothing)")
    fn = {op: impls for op, _, impls in _cases(smoke_inputs)}[case][impl]
    with dispatch.backend_override("auto"):
        out = benchmark(fn)
    assert out is not None


def test_run_benchmark_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    rows = run_benchmark(out_path=str(out), repeats=1 if not torch.cuda.is_available() else 5)
    assert rows and json.loads(out.read_text()) == rows and out.with_suffix(".csv").exists()
    assert not utils.share_violations(rows)
    assert {"eager", "compile"} <= {r["impl"] for r in rows}
    assert all(r["ms"] > 0 and r["device"] and r["date"] for r in rows)
    if not torch.cuda.is_available():
        assert all(r["smoke"] for r in rows)


def main(argv=None) -> int:
    run = utils.resolve(utils.parser(__doc__).parse_args(argv), "bench_noise_schedule")
    sizes = ({k: GPU_SIZES[k] for k in ("balls", "maze")} if run.device.type == "cuda" else CPU_SIZES) if run.smoke \
        else None
    with utils.smoke_compile(run):
        _print(run_benchmark(run.device, run.out, sizes=sizes, repeats=run.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
