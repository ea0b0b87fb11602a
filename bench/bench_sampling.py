"""Benchmark and comparison of the sampling modes: autoregressive rollout vs FIFO diagonal denoising
(with / without latent partitioning and lookahead), each with and without fast learning (temporal LoRA).

Frames/s of every mode are timed in the same run. With a trained run (`--run DIR`) the script also
compares the modes on quality: held-out loss under each mode's noise pattern, and over `--frames`
generated frames the balls metric (ball-count stability, colour-rule accuracy, including the
long-range second-order check), plus peak tensor memory and the time/memory cost of fast learning.
Results go to profiles/sampling/ (JSON + Markdown).

    python bench/bench_sampling.py --run runs/balls-o-tiny-... [--frames 1000] [--device cpu] [--out FILE.json]
    python bench/bench_sampling.py [--smoke] [--repeats N] [--out FILE.json]   (no run: frames/s of a random model)
    pytest bench/bench_sampling.py            (CI: --benchmark-disable, a few frames per mode, random model)
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import utils
from torch import nn

from fastdiff.config import Config
from fastdiff.diffusion import Schedule
from fastdiff.evaluate import autoregressive_pattern, heldout_windows, pattern_loss
from fastdiff.lora import FastLearner, remove_temporal_lora
from fastdiff.memory import TensorMemoryTracker
from fastdiff.metrics import balls_metrics
from fastdiff.models.autoencoder import FrameAutoencoder
from fastdiff.models.dit import VideoDiT
from fastdiff.sampling import (
    LoadedRun,
    SampleOptions,
    context_frames,
    fifo_plan,
    generate_latents,
    load_run,
    sample_video,
)


def variants(run: LoadedRun) -> dict[str, SampleOptions]:
    n = fifo_plan(run, SampleOptions(mode="fifo")).partitions
    return {
        "autoregressive": SampleOptions(mode="autoregressive"),
        "fifo (n=1, no lookahead)": SampleOptions(mode="fifo", partitions=1, lookahead=False),
        "fifo (n=1, lookahead)": SampleOptions(mode="fifo", partitions=1, lookahead=True),
        f"fifo (n={n}, no lookahead)": SampleOptions(mode="fifo", partitions=n, lookahead=False),
        f"fifo (n={n}, lookahead)": SampleOptions(mode="fifo", partitions=n, lookahead=True),
        "autoregressive + fast learning": SampleOptions(mode="autoregressive", fast_learning=True),
        f"fifo (n={n}, lookahead) + fast learning": SampleOptions(mode="fifo", partitions=n, fast_learning=True),
    }


def _learner(run: LoadedRun, opts: SampleOptions, gen: torch.Generator) -> FastLearner | None:
    if not opts.fast_learning:
        return None
    return FastLearner(run.model, run.schedule, run.cfg.diffusion, window=run.window, rank=opts.lora_rank,
                       lr=opts.fast_lr, steps=opts.fast_steps, generator=gen)


def frames_per_second(run: LoadedRun, context: torch.Tensor, opts: SampleOptions, frames: int) -> float:
    """Latent frames/s of one mode, after its warm-up (FIFO's queue fill) and one chunk are done."""
    gen = torch.Generator(device=run.device).manual_seed(0)
    learner = _learner(run, opts, gen)
    try:
        stream = generate_latents(run, context, opts, learner, gen)
        for _ in range(run.window):  # past the first chunks: steady state
            next(stream)
        _sync(run.device)
        start = time.perf_counter()
        for _ in range(frames):
            next(stream)
        _sync(run.device)
        return frames / (time.perf_counter() - start)
    finally:
        if learner is not None:
            remove_temporal_lora(run.model)


def peak_memory(run: LoadedRun, context: torch.Tensor, opts: SampleOptions, frames: int) -> int:
    """Peak bytes allocated while generating (CUDA allocator, or live tensor storages on CPU)."""
    gen = torch.Generator(device=run.device).manual_seed(0)
    learner = _learner(run, opts, gen)
    try:
        if run.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            stream = generate_latents(run, context, opts, learner, gen)
            for _ in range(frames):
                next(stream)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with TensorMemoryTracker() as tracker:
            stream = generate_latents(run, context, opts, learner, gen)
            for _ in range(frames):
                next(stream)
        return tracker.peak
    finally:
        if learner is not None:
            remove_temporal_lora(run.model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pattern_of(run: LoadedRun, opts: SampleOptions):
    return autoregressive_pattern(run) if opts.mode == "autoregressive" else fifo_plan(run, opts).call_pattern()


# ---- the comparison on a trained run -----------------------------------------------------------------
def compare(run_dir: str, frames: int, device: str, seed: int = 0, only: str | None = None,
            steps: int | None = None) -> dict:
    run = load_run(Path(run_dir), device=device)
    if steps:
        run.cfg.diffusion.sample_steps = steps
    n_obs = run.window // 2
    context = context_frames(run, n_obs)
    with torch.no_grad():
        context_latents = run.autoencoder.encode(torch.from_numpy(context).to(run.device))[None]
        clips = heldout_windows(run, 32, start=5000)
    truth = context_frames(run, frames)
    rows = {"held-out stream (ground truth)": {"balls": balls_metrics(truth, run.window)}}
    balls = rows["held-out stream (ground truth)"]["balls"]["balls"]
    for name, opts in variants(run).items():
        if only and only not in name:
            continue
        opts.seed = seed
        started = time.perf_counter()
        video = sample_video(run, frames, context=context, options=opts)
        seconds = time.perf_counter() - started
        row = {
            "options": {k: v for k, v in vars(opts).items() if k != "seed"},
            "heldout_pattern_loss": pattern_loss(run.model, clips, run.schedule, run.cfg.diffusion,
                                                 pattern_of(run, opts)),
            "balls": balls_metrics(video[n_obs:], run.window, balls=balls),
            "frames_per_second": (frames - n_obs) / seconds,
            "peak_memory_bytes": peak_memory(run, context_latents, opts, 3 * run.window),
        }
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    for name, row in rows.items():  # fast learning's cost relative to the same mode without it
        if name.endswith(" + fast learning") and name.removesuffix(" + fast learning") in rows:
            base = rows[name.removesuffix(" + fast learning")]
            row["time_overhead"] = base["frames_per_second"] / row["frames_per_second"] - 1
            row["memory_overhead"] = row["peak_memory_bytes"] / base["peak_memory_bytes"] - 1
    return {"run": str(run_dir), "checkpoint_frame": run.frame, "frames": frames, "device": str(run.device),
            "host": platform.node(), "sample_steps": run.cfg.diffusion.sample_steps, "window": run.window,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "modes": rows}


def markdown(result: dict) -> str:
    lines = [f"# Sampling modes on `{result['run']}` (checkpoint at frame {result['checkpoint_frame']})", "",
             f"{result['frames']} frames per mode on {result['device']}, DDIM {result['sample_steps']} steps, "
             f"K = {result['window']}. Written by bench/bench_sampling.py on {result['date']}.", "",
             "| mode | held-out loss (mode's pattern) | count ok | count changes /100 | colour rule 1st | "
             "2nd order (all) | 2nd order (beyond K) | frames/s | peak MiB | fast-learning cost (time, memory) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in result["modes"].items():
        b = row["balls"]
        loss = f"{row['heldout_pattern_loss']:.4f}" if "heldout_pattern_loss" in row else "-"
        fps = f"{row['frames_per_second']:.1f}" if "frames_per_second" in row else "-"
        mem = f"{row['peak_memory_bytes'] / 2**20:.2f}" if "peak_memory_bytes" in row else "-"
        cost = (f"+{row['time_overhead']:.0%}, {row['memory_overhead']:+.0%}" if "time_overhead" in row else "-")
        lines.append(f"| {name} | {loss} | {b['count_ok']:.3f} | {b['count_changes_per_100']:.1f} | "
                     f"{b['first_order_acc']:.2f} ({b['colour_changes']}) | {b['second_order_acc']:.2f} "
                     f"({b['second_order_checks']}) | {b['second_order_acc_long']:.2f} "
                     f"({b['second_order_long_checks']}) | {fps} | {mem} | {cost} |")
    return "\n".join(lines) + "\n"


# ---- pytest-benchmark entry point (smoke size on CPU, random model) -----------------------------------
def _random_run(window: int = 10, steps: int = 20) -> LoadedRun:
    torch.manual_seed(0)
    cfg = Config()
    cfg.diffusion.sample_steps = steps
    model = VideoDiT(4, 8, 8, window, width=32, depth=1, heads=1).eval()
    for p in model.parameters():  # past adaLN-zero, so that the model computes something
        nn.init.normal_(p, std=0.02)
    model.requires_grad_(False)
    return LoadedRun(cfg, Path("."), torch.device("cpu"), FrameAutoencoder(4, 4, 8).eval(), model,
                     Schedule.make("linear", 1000), window, (32, 32, 3), 10.0, 0)


# --smoke and pytest: a 4-frame window and 8 DDIM steps (every mode's code path: FIFO's queue, 8 levels, is two blocks)
SMOKE = {"window": 4, "steps": 8}


def bench_modes(frames: int, window: int = 10, steps: int = 20) -> dict[str, float]:
    run = _random_run(window, steps)
    context = torch.randn(1, run.window // 2, 4, 8, 8)
    return {name: frames_per_second(run, context, opts, frames) for name, opts in variants(run).items()}


def test_bench_sampling_modes(benchmark):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # smoke size: a second intra-op thread only spins on a shared 2-core machine
    try:
        fps = benchmark(bench_modes, 2, **SMOKE)
    finally:
        torch.set_num_threads(threads)
    assert len(fps) == 7 and all(np.isfinite(v) and v > 0 for v in fps.values())


def main(argv=None) -> int:
    parser = utils.parser(__doc__)
    parser.add_argument("--run", help="trained run directory (without it: frames/s of a random tiny model only)")
    parser.add_argument("--frames", type=int, default=None, help="frames per mode (default 1000 with --run, else 50; "
                                                                 "--smoke: 2)")
    parser.add_argument("--only", help="only the modes whose name contains this")
    parser.add_argument("--steps", type=int, help="override diffusion.sample_steps (FIFO's queue follows it)")
    args = parser.parse_args(argv)
    run = utils.resolve(args, "bench_sampling")
    if not args.run:  # the random tiny model runs on the host whatever --device says
        fps = bench_modes(args.frames or 2, **SMOKE) if run.smoke else bench_modes(args.frames or 50)
        rows = [{"mode": name, "frames/s": round(v, 3), "device": "cpu", "date": utils.today()}
                for name, v in fps.items()]
        print(json.dumps(rows, indent=2))
        if run.out:
            utils.write_rows(rows, run.out)
        return 0
    result = compare(args.run, args.frames or 1000, str(run.device), only=args.only, steps=args.steps)
    stem = "compare" + (f"-{args.only.replace(' ', '_')}" if args.only else "")
    out = Path(args.out or Path("profiles/sampling") / f"{stem}.json").with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
