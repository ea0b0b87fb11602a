"""Benchmark: the whole online step (ingest + encode a frame, assemble live + replayed windows, noise,
forward, loss, backward, optimizer, EMA, reservoir insert), one step per arriving frame, side by side:

  eager-fp32-adamw      fp32, torch AdamW (the plain reference)
  eager-bf16-bnb8bit    bf16 autocast, bitsandbytes AdamW8bit (the trainer's default on CUDA)
  compiled-bf16-bnb8bit as above with torch.compile of the model
  device-bf16-fused8bit the sync-free step (run.step=device) with fastdiff's fused 8-bit AdamW, not compiled
  compiled+graph        the fast path: compiled model, the whole step in one CUDA graph (run.step=graph)

Reported: frames/s (= steps/s), ms per step, peak memory (CUDA: max_memory_allocated; CPU: peak of live
tensor bytes created during the timed steps, eager configs only), the ratio to eager fp32, and the model's
achieved TFLOP/s (6 x parameters x tokens per step) as a share of the device's measured matmul ceiling.

    python bench/bench_train_step.py [--preset small] [--steps 200] [--out FILE.json]

On a GPU rows go to $FASTDIFF_BENCH_OUT or profiles/<gpu>/bench_train_step.json; on a CPU this is a
smoke run at the tiny preset ("cpu-smoke" rows).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_temporal_attention import default_out_path as shared_out_path  # noqa: E402
from bench_temporal_attention import write_rows

from fastdiff.config import build_config  # noqa: E402
from fastdiff.train import OnlineTrainer  # noqa: E402
from fastdiff_kernels import autotune  # noqa: E402

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


def make_trainer(preset: str, device: torch.device, overrides: dict, run_dir: Path) -> OnlineTrainer:
    settings = {
        "run.device": str(device), "run.progress": "false", "run.sample_every": "0",
        "autoencoder.warmup_frames": "64", "autoencoder.fit_steps": "10", "run.frames": "100000",
        **PAPER_BATCH, **overrides,
    }
    cfg = build_config(preset, None, settings)
    return OnlineTrainer(cfg, run_dir, log=lambda *_: None)


def one_frame(trainer: OnlineTrainer) -> None:
    frame = trainer._next_frame()
    trainer._ingest(frame)
    if trainer.fast is not None:
        trainer.fast.step()
    else:
        trainer.train_step(trainer._live_windows())
        trainer._insert_live()


def matmul_ceiling_tflops(device: torch.device) -> float:
    """The device's measured dense matmul rate: bf16 4096^3 on CUDA, fp32 512^3 on a CPU."""
    n, dtype = (4096, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def step_flops(trainer: OnlineTrainer) -> float:
    """Model FLOPs of one training step: 6 x parameters x tokens (forward 2, backward 4)."""
    r, m = trainer.cfg.replay, trainer.model
    tokens = (r.live + r.replayed) * trainer.window * m.grid[0] * m.grid[1]
    return 6.0 * sum(p.numel() for p in m.parameters()) * tokens


def measure(trainer: OnlineTrainer, steps: int, warmup: int) -> dict:
    device = trainer.device
    for _ in range(trainer.window - 1):  # fill the live window
        trainer._ingest(trainer._next_frame())
    for _ in range(warmup):  # warm up (compile; the graph is captured after its own warm-up steps)
        one_frame(trainer)
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
        from fastdiff.sampling import TensorMemoryTracker

        with TensorMemoryTracker() as tracker:
            for _ in range(2):
                one_frame(trainer)
        peak = tracker.peak
    return {"frames/s": round(steps / seconds, 2), "ms_per_step": round(1e3 * seconds / steps, 3),
            "peak_memory_MiB": None if peak is None else round(peak / 2**20, 2),
            "model_TFLOP/s": round(step_flops(trainer) * steps / seconds / 1e12, 4)}


def run_benchmark(device=None, preset=None, steps=None, out_path=None, log=print) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    preset = preset or ("small" if on_gpu else "tiny")
    steps = steps or (200 if on_gpu else 4)
    rows = []
    ceiling = matmul_ceiling_tflops(device)
    base = {"gpu": autotune.device_name(device) if on_gpu else "cpu-smoke", "matmul_ceiling_TFLOP/s": round(ceiling, 3),
            "date": datetime.date.today().isoformat(), "preset": preset, "batch": 2, "steps": steps}
    for name, overrides in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                trainer = make_trainer(preset, device, overrides, Path(tmp) / "run")
                row = {**base, "config": name, "status": "ok", **measure(trainer, steps, warmup=6 if on_gpu else 1)}
                row["share_of_matmul_ceiling"] = round(row["model_TFLOP/s"] / ceiling, 4)
            except Exception as err:  # a backend that cannot serve this machine says so in its row
                row = {**base, "config": name, "status": f"not run because {type(err).__name__}: {err}"}
        rows.append(row)
    eager = next((r for r in rows if r["config"] == "eager-fp32-adamw" and r["status"] == "ok"), None)
    for row in rows:
        if eager and row["status"] == "ok":
            row["speedup_vs_eager_fp32"] = round(row["frames/s"] / eager["frames/s"], 3)
            if row["peak_memory_MiB"] and eager["peak_memory_MiB"]:
                row["memory_vs_eager_fp32"] = round(row["peak_memory_MiB"] / eager["peak_memory_MiB"], 3)
        log("  ".join(f"{k}={v}" for k, v in row.items() if k != "date"))
    if out_path is not None:
        write_rows(rows, out_path)
    return rows


def default_out_path(device) -> Path | None:
    return shared_out_path(device, "bench_train_step")


# ---- pytest (a CPU smoke run of the eager configs; the full run on a GPU) ------------------------


def test_train_step_benchmark_rows(benchmark, tmp_path, monkeypatch):
    on_gpu = torch.cuda.is_available()
    if not on_gpu:  # compiling the model is minutes on 2 cores: the smoke run covers the eager configs
        monkeypatch.delitem(CONFIGS, "compiled-bf16-bnb8bit")
        monkeypatch.setitem(CONFIGS, "compiled+graph", {**CONFIGS["compiled+graph"], "run.compile": "false"})
    rows = benchmark.pedantic(run_benchmark, kwargs={"steps": None if on_gpu else 2, "out_path": tmp_path / "r.json",
                                                     "log": lambda *_: None}, rounds=1, iterations=1)
    by_config = {r["config"]: r for r in rows}
    assert by_config["eager-fp32-adamw"]["status"] == "ok", by_config["eager-fp32-adamw"]
    assert by_config["eager-bf16-bnb8bit"]["status"] == "ok", by_config["eager-bf16-bnb8bit"]
    assert by_config["eager-fp32-adamw"]["frames/s"] > 0
    assert by_config["eager-fp32-adamw"]["peak_memory_MiB"] > 0
    assert by_config["device-bf16-fused8bit"]["status"] == "ok", by_config["device-bf16-fused8bit"]
    if on_gpu:
        assert by_config["compiled+graph"]["status"] == "ok", by_config["compiled+graph"]
    else:  # said why, not skipped silently
        assert "CUDA graphs need a CUDA device" in by_config["compiled+graph"]["status"]
    assert (tmp_path / "r.csv").exists()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="default: small on a GPU, tiny on a CPU")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="rows .json (+ .csv beside it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_benchmark(device, args.preset, args.steps, args.out or default_out_path(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
