"""Benchmark: the whole online step (ingest + encode a frame, assemble live + replayed windows, noise,
forward, loss, backward, optimizer, EMA, reservoir insert), one step per arriving frame, side by side:

  eager-fp32-adamw      fp32, torch AdamW (the plain reference)
  eager-bf16-bnb8bit    bf16 autocast, bitsandbytes AdamW8bit (the trainer's default on CUDA)
  compiled-bf16-bnb8bit as above with torch.compile of the model
  device-bf16-fused8bit the sync-free step (run.step=device) with fastdiff's fused 8-bit AdamW, not compiled
  compiled+graph        the fast path: compiled model, the whole step in one CUDA graph (run.step=graph)

Reported: frames/s (= steps/s), ms per step, peak memory (CUDA: max_memory_allocated; CPU: peak of live
tensor bytes created during the timed steps, eager configs only), the ratio to eager fp32, and the model's
achieved TFLOP/s as a share of the device's matmul ceiling. The FLOPs are the step's real ones: counted
once, outside the timing, by torch's FlopCounterMode over one eager step (the DiT's forward and backward:
every matmul and attention product, the per-frame adaLN and timestep MLP at their per-frame size). The
ceiling is the best rate, measured in the same run, over the matmul shapes that step runs (recorded from
the same step) and a large square one, in the dtypes the configs use.

    python bench/bench_train_step.py [--preset small] [--device cuda] [--out FILE.json] [--smoke] [--repeats N]

--repeats is the number of timed steps (default 200 on a GPU, 4 on a CPU). --smoke: a one-block model of
width 64 and two timed steps (on a CPU, torch.compile traces the model with dynamo, fullgraph, but runs the
traced graph without generating code: inductor's code generation alone is minutes on two cores). On a GPU
rows go to $FASTDIFF_BENCH_OUT or profiles/<gpu>/bench_train_step.json; on a CPU this is a smoke run at the
tiny preset ("cpu-smoke" rows).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import pytest
import torch
import utils
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fastdiff.config import build_config
from fastdiff.models.dit import VideoDiT
from fastdiff.train import OnlineTrainer

CONFIGS = {
    "eager-fp32-adamw": {"run.precision": "fp32", "optim.name": "adamw"},
    "eager-bf16-bnb8bit": {"run.precision": "bf16", "optim.name": "adamw8bit-bnb"},
    "compiled-bf16-bnb8bit": {"run.precision": "bf16", "optim.name": "adamw8bit-bnb", "run.compile": "true"},
    "device-bf16-fused8bit": {"run.precision": "bf16", "optim.name": "adamw8bit-fused", "run.step": "device"},
    "compiled+graph": {"run.precision": "bf16", "optim.name": "adamw8bit-fused", "run.compile": "true",
                       "run.step": "graph"},
}
# The paper's Balls protocol: batch 2 = 1 live + 1 replayed window.
PAPER_BATCH = {"replay.live": "1", "replay.replayed": "1"}
# --smoke: every config's code path at a size that steps in milliseconds (head dim 32, the kernels' smallest)
SMOKE_MODEL = {"model.width": "64", "model.depth": "1", "model.heads": "2", "autoencoder.fit_steps": "2"}


def make_trainer(preset: str, device: torch.device, overrides: dict, run_dir: Path) -> OnlineTrainer:
    settings = {
        "run.device": str(device), "run.progress": "false", "run.sample_every": "0", "run.final_clips": "0",
        "autoencoder.warmup_frames": "64", "autoencoder.fit_steps": "10", "run.frames": "100000",
        **PAPER_BATCH, **overrides,
    }
    cfg = build_config(preset, None, settings)
    return OnlineTrainer(cfg, run_dir, log=lambda *_: None)


def one_frame(trainer: OnlineTrainer) -> None:
    trainer.advance()


class _MatmulShapes(TorchDispatchMode):
    """Records the (m, k, n) of every matmul dispatched: the shapes the step's ceiling is measured on."""

    def __init__(self):
        super().__init__()
        self.flops: dict[tuple[int, int, int], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = getattr(func, "overloadpacket", None)
        a, b = None, None
        if packet in (torch.ops.aten.mm, torch.ops.aten.bmm):
            a, b = args[0], args[1]
        elif packet in (torch.ops.aten.addmm, torch.ops.aten.baddbmm):
            a, b = args[1], args[2]
        if a is not None:
            m, k, n = a.shape[-2] * (a.shape[0] if a.dim() == 3 else 1), a.shape[-1], b.shape[-1]
            self.flops[(m, k, n)] = self.flops.get((m, k, n), 0) + 2 * m * k * n
        return func(*args, **(kwargs or {}))


def count_step_flops(trainer: OnlineTrainer) -> tuple[float, list[tuple[int, int, int]]]:
    """The model's FLOPs in one training step (forward + backward, as dispatched), and its three costliest
    matmul shapes: one eager step under FlopCounterMode, outside any timing. Only the DiT's own count is
    taken (frames encoded by the autoencoder while ingesting are not the model's work)."""
    shapes = _MatmulShapes()
    with FlopCounterMode(display=False) as counter, shapes:
        one_frame(trainer)
    flops = sum(counter.get_flop_counts().get(VideoDiT.__name__, {}).values())
    top = sorted(shapes.flops, key=shapes.flops.get, reverse=True)[:3]
    return float(flops), top


def matmul_ceiling(device: torch.device, shapes: list[tuple[int, int, int]], repeats: int) -> tuple[float, str]:
    """The best matmul rate on the step's own shapes and a large square one, in the configs' dtypes. On a CPU the
    large square is timed in fp32 only: a CPU without bf16 matrix units takes 80 s for one bf16 1024^3 product
    (2-core CI machine), and one with them still has the step's own shapes timed in bf16, which bound the rate
    the bf16 configs can reach."""
    dtypes = [torch.float32, torch.bfloat16]
    if device.type == "cuda":
        return utils.matmul_ceiling_tflops(device, [*shapes, (4096, 4096, 4096)], dtypes, repeats)
    own = utils.matmul_ceiling_tflops(device, shapes, dtypes, repeats)
    big = utils.matmul_ceiling_tflops(device, [(1024, 1024, 1024)], [torch.float32], repeats)
    return max(own, big)


def model_parameters(trainer: OnlineTrainer) -> int:
    return sum(p.numel() for p in trainer.step.model.parameters())


def prime(trainer: OnlineTrainer, warmup: int) -> None:
    """Fill the live window, then take ``warmup`` steps (compile; the graph is captured after its own warm-up)."""
    while not trainer.step.ready:  # fill the live window (its last frame takes the first step)
        trainer.advance()
    for _ in range(warmup):
        one_frame(trainer)


def measure(trainer: OnlineTrainer, steps: int, warmup: int) -> dict:
    """frames/s and ms per step over ``steps`` steps timed as one block (the sync-free modes are measured as
    they run: no host sync between steps), and the CPU peak of tensor bytes over two more steps."""
    device = trainer.device
    prime(trainer, warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_frame(trainer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif not trainer.cfg.run.compile:  # CPU: count tensor bytes over two more steps, outside the timing
        from fastdiff.memory import TensorMemoryTracker

        with TensorMemoryTracker() as tracker:
            for _ in range(2):
                one_frame(trainer)
        peak = tracker.peak
    return {"frames/s": round(steps / seconds, 2), "ms_per_step": round(1e3 * seconds / steps, 3),
            "peak_memory_MiB": None if peak is None else round(peak / 2**20, 2)}


def run_benchmark(device=None, preset=None, steps=None, out_path=None, *, smoke=False, log=print) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    preset = preset or ("small" if on_gpu else "tiny")
    steps = steps or (2 if smoke else 200 if on_gpu else 4)
    size = SMOKE_MODEL if smoke else {}
    rows, flops, shapes = [], None, []
    base = {"gpu": utils.device_name(device) if on_gpu else "cpu-smoke", "date": utils.today(), "preset": preset,
            "model": "smoke (width 64, depth 1)" if smoke else preset, "batch": 2, "steps": steps}
    compile_mode = utils.trace_only_compile() if smoke and not on_gpu else contextlib.nullcontext()
    with compile_mode:
        for name, overrides in CONFIGS.items():
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    trainer = make_trainer(preset, device, {**size, **overrides}, Path(tmp) / "run")
                    row = {**base, "config": name, "status": "ok",
                           **measure(trainer, steps, warmup=6 if on_gpu and not smoke else 1)}
                    if flops is None and trainer.cfg.run.step == "eager" and not trainer.cfg.run.compile:
                        flops, shapes = count_step_flops(trainer)  # the same model and batch in every config
                except Exception as err:  # a backend that cannot serve this machine says so in its row
                    row = {**base, "config": name, "status": f"not run because {type(err).__name__}: {err}"}
            rows.append(row)
    ceiling, ceiling_at = matmul_ceiling(device, shapes, repeats=3 if smoke else 10)
    eager = next((r for r in rows if r["config"] == "eager-fp32-adamw" and r["status"] == "ok"), None)
    for row in rows:
        row.update({"matmul_ceiling_TFLOP/s": round(ceiling, 4), "matmul_ceiling_at": ceiling_at})
        if flops and row["status"] == "ok":
            row["model_GFLOP_per_step"] = round(flops / 1e9, 4)
            rate = flops * row["frames/s"] / 1e12
            row["model_TFLOP/s"] = round(rate, 5)
            row["share_of_matmul_ceiling"] = round(rate / ceiling, 6)
        if eager and row["status"] == "ok":
            row["speedup_vs_eager_fp32"] = round(row["frames/s"] / eager["frames/s"], 3)
            if row["peak_memory_MiB"] and eager["peak_memory_MiB"]:
                row["memory_vs_eager_fp32"] = round(row["peak_memory_MiB"] / eager["peak_memory_MiB"], 3)
        log("  ".join(f"{k}={v}" for k, v in row.items() if k != "date"))
    if out_path is not None:
        utils.write_rows(rows, out_path)
    return rows


# ---- pytest (a CPU smoke run of every config; the full run on a GPU) ------------------------------

# smoke sizes: one intra-op thread (conftest.py's fixture; a second thread only spin-waits on tiny ops)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    on_gpu = torch.cuda.is_available()
    out = tmp_path_factory.mktemp("train_step") / "r.json"
    return run_benchmark(smoke=not on_gpu, out_path=out, log=lambda *_: None), out


def test_train_step_benchmark_rows(benchmark, smoke_rows):
    rows, out = benchmark.pedantic(lambda: smoke_rows, rounds=1, iterations=1)
    by_config = {r["config"]: r for r in rows}
    for name in ("eager-fp32-adamw", "eager-bf16-bnb8bit", "compiled-bf16-bnb8bit", "device-bf16-fused8bit"):
        assert by_config[name]["status"] == "ok", by_config[name]
    assert by_config["eager-fp32-adamw"]["frames/s"] > 0
    assert by_config["eager-fp32-adamw"]["peak_memory_MiB"] > 0
    if torch.cuda.is_available():
        assert by_config["compiled+graph"]["status"] == "ok", by_config["compiled+graph"]
    else:  # said why, not skipped silently
        assert "CUDA graphs need a CUDA device" in by_config["compiled+graph"]["status"]
    assert out.with_suffix(".csv").exists()


def test_no_share_exceeds_its_ceiling(smoke_rows):
    """Every timed config's model FLOP rate is a share of the ceiling in (0, 1]: the FLOPs are the step's own
    and the ceiling is measured on the step's own matmul shapes (the count used to be 6 x parameters x tokens,
    multiplying the per-frame adaLN and timestep MLP by every token, against one 512^3 fp32 matmul: 166%)."""
    rows, _ = smoke_rows
    timed = [r for r in rows if r["status"] == "ok"]
    assert timed and all(0 < r["share_of_matmul_ceiling"] <= 1.0 for r in timed), timed
    assert not utils.share_violations(rows)


def test_share_check_catches_an_inflated_flop_count(smoke_rows, monkeypatch):
    """Mutation check: the same run claiming more FLOPs than it does (x10, or more where the smoke model's
    share is tiny, enough for its true share to read above 1) must fail the share check."""
    rows, _ = smoke_rows
    share = next(r for r in rows if r["config"] == "eager-fp32-adamw")["share_of_matmul_ceiling"]
    factor, real = max(10.0, 2.0 / share), count_step_flops

    def inflated_count(trainer):
        flops, shapes = real(trainer)
        return factor * flops, shapes

    monkeypatch.setitem(globals(), "count_step_flops", inflated_count)
    for name in [n for n in CONFIGS if n != "eager-fp32-adamw"]:
        monkeypatch.delitem(CONFIGS, name)
    inflated = run_benchmark(smoke=not torch.cuda.is_available(), log=lambda *_: None)
    assert utils.share_violations(inflated), inflated


def main(argv=None) -> int:
    parser = utils.parser(__doc__)
    parser.add_argument("--preset", default=None, help="default: small on a GPU, tiny on a CPU")
    args = parser.parse_args(argv)
    run = utils.resolve(args, "bench_train_step", repeats=0, smoke_repeats=0)
    run_benchmark(run.device, args.preset, run.repeats or None, run.out, smoke=run.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
