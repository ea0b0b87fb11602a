#!/usr/bin/env python
"""Soak run: train online for a long stream with a very small model and watch memory for leaks.

Runs ``OnlineTrainer`` in-process on the balls stream (100k frames on a CPU, 1M on a GPU by default)
and samples, every ``--every`` frames, the host RSS (VmRSS from /proc/self/status, or psutil) and,
on CUDA, ``torch.cuda.memory_allocated`` / ``max_memory_allocated``. The trainer is not edited: a
subclass samples after each ingested frame (``_ingest`` runs on every frame, on the eager and on the
fast path alike).

Writes under ``--out`` (default profiles/soak/):
  soak.csv   frame, seconds, rss_MiB, cuda_alloc_MiB, cuda_max_alloc_MiB
  soak.png   RSS (and CUDA allocated) against frames, warm-up marked
  soak.json  date, machine, command line, config, RSS at the end of warm-up and at the end, the slope
             after warm-up (least squares, MiB per 10k frames) and the verdict: "flat" when the slope is
             within --tolerance MiB per 10k frames (and so is CUDA allocated memory), else "growing"

examples:
  OMP_NUM_THREADS=1 python scripts/soak.py                       # 100k frames on CPU
  python scripts/soak.py --frames 2000 --out /tmp/soak           # a quick frames/s measurement
  python scripts/soak.py --set model.width=64 model.heads=2      # another model
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# A model small enough that 100k frames take minutes, not hours, on 2 CPU cores.
SMALL = {
    "model.width": "32", "model.heads": "1", "model.depth": "1", "model.mlp_ratio": "2.0",
    "replay.replayed": "1", "autoencoder.latent": "ae", "model.patch": "1",
    "autoencoder.warmup_frames": "256", "autoencoder.fit_steps": "20",
    "autoencoder.fit_batch": "16", "autoencoder.hidden": "16", "diffusion.sample_steps": "10",
    "run.sample_every": "0", "run.final_clips": "0", "run.sample_frames": "12", "run.checkpoint_every": "5000",
    "run.log_every": "500", "run.progress": "false",
}


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # peak, the best left


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name()} ({os.cpu_count()}-core {platform.machine()} host)"
    return f"CPU {os.cpu_count()}-core {platform.machine()}"


def slope_per_10k(frames: list[float], values: list[float]) -> float:
    """Least-squares slope of values against frames, in units per 10,000 frames (0 for < 2 points)."""
    n = len(frames)
    if n < 2:
        return 0.0
    mx, my = sum(frames) / n, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in frames)
    if sxx == 0:
        return 0.0
    sxy = sum((x - mx) * (y - my) for x, y in zip(frames, values))
    return sxy / sxx * 10_000


def make_trainer_class():
    import torch

    from fastdiff.train import OnlineTrainer

    class SoakTrainer(OnlineTrainer):
        """OnlineTrainer that records memory every `sample_every_frames` ingested frames."""

        sample_every_frames = 1000
        rows: list
        t0: float

        def advance(self) -> bool:
            more = super().advance()
            if more and self.frames_seen % self.sample_every_frames == 0:
                self.record()
            return more

        def record(self) -> None:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(self.device)
            self.rows.append({
                "frame": self.frames_seen,
                "seconds": round(time.perf_counter() - self.t0, 3),
                "rss_MiB": round(rss_mib(), 3),
                "cuda_alloc_MiB": round(torch.cuda.memory_allocated(self.device) / 2**20, 3) if cuda else "",
                "cuda_max_alloc_MiB": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 3) if cuda else "",
            })

    return SoakTrainer


def summarize(rows: list[dict], warmup: int, tolerance: float) -> dict:
    after = [r for r in rows if r["frame"] >= warmup]
    if not after:
        after = rows[-1:]
    start, end = after[0], rows[-1]
    xs = [r["frame"] for r in after]
    rss_slope = slope_per_10k(xs, [r["rss_MiB"] for r in after])
    # RSS moves by a few MiB for a sample now and then (malloc returning and taking back a block): medians of
    # the first and last 5% of the samples after warm-up say what a single sample at either end may not
    k = max(3, len(after) // 20)
    first_median = statistics.median(r["rss_MiB"] for r in after[:k])
    last_median = statistics.median(r["rss_MiB"] for r in after[-k:])
    out = {
        "warmup_frames": warmup,
        "rss_warmup_end_MiB": start["rss_MiB"], "rss_warmup_end_frame": start["frame"],
        "rss_end_MiB": end["rss_MiB"], "rss_end_frame": end["frame"],
        "rss_max_MiB": max(r["rss_MiB"] for r in rows),
        "rss_growth_after_warmup_MiB": round(end["rss_MiB"] - start["rss_MiB"], 3),
        "rss_median_after_warmup_MiB": round(first_median, 3), "rss_median_at_end_MiB": round(last_median, 3),
        "rss_median_growth_after_warmup_MiB": round(last_median - first_median, 3),
        "median_over_samples": k,
        "rss_slope_MiB_per_10k_frames": round(rss_slope, 4),
        "tolerance_MiB_per_10k_frames": tolerance,
    }
    flat = abs(rss_slope) <= tolerance
    if rows[0]["cuda_alloc_MiB"] != "":
        cuda_slope = slope_per_10k(xs, [r["cuda_alloc_MiB"] for r in after])
        out.update({"cuda_alloc_warmup_end_MiB": start["cuda_alloc_MiB"], "cuda_alloc_end_MiB": end["cuda_alloc_MiB"],
                    "cuda_max_alloc_MiB": end["cuda_max_alloc_MiB"],
                    "cuda_alloc_slope_MiB_per_10k_frames": round(cuda_slope, 4)})
        flat = flat and abs(cuda_slope) <= tolerance
    out["verdict"] = "flat" if flat else "growing"
    return out


def plot(rows: list[dict], warmup: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    xs = [r["frame"] for r in rows]
    ax.plot(xs, [r["rss_MiB"] for r in rows], color="tab:blue", label="host RSS")
    ax.set_xlabel("frames")
    ax.set_ylabel("host RSS (MiB)", color="tab:blue")
    ax.axvline(warmup, color="grey", linestyle="--", linewidth=1, label="end of warm-up")
    if rows and rows[0]["cuda_alloc_MiB"] != "":
        ax2 = ax.twinx()
        ax2.plot(xs, [r["cuda_alloc_MiB"] for r in rows], color="tab:red", label="CUDA allocated")
        ax2.set_ylabel("CUDA allocated (MiB)", color="tab:red")
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def resummarize(out: Path, warmup: float, tolerance: float) -> int:
    with open(out / "soak.csv", newline="") as f:
        rows = [{k: (float(v) if v != "" else "") if k != "frame" else int(v) for k, v in r.items()}
                for r in csv.DictReader(f)]
    report = json.loads((out / "soak.json").read_text()) if (out / "soak.json").exists() else {}
    frames = rows[-1]["frame"]
    warm = int(warmup * frames) if warmup < 1 else int(warmup)
    verdict = summarize(rows, warm, tolerance)
    report.update(verdict)
    report["resummarized"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds") + \
        " (scripts/soak.py --from-csv: summary and plot rewritten from soak.csv)"
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, warm, out / "soak.png",
         f"soak: {frames:,} frames of {report.get('stream', '?')}, {report.get('machine', '?')}; "
         f"slope {verdict['rss_slope_MiB_per_10k_frames']:+.2f} MiB/10k frames ({verdict['verdict']})")
    print(json.dumps(verdict))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, help="frames to train on (default: 100000 on CPU, 1000000 on CUDA)")
    p.add_argument("--every", type=int, help="sample memory every this many frames (default: frames/200, >= 50)")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="warm-up: a share of the frames (< 1) or a frame count (default 0.1); memory is judged "
                        "after it")
    p.add_argument("--tolerance", type=float, default=2.0,
                   help="largest |slope| after warm-up, MiB per 10k frames, still called flat (default 2)")
    p.add_argument("--stream", default="balls-o")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="profiles/soak", help="directory for soak.csv, soak.png, soak.json")
    p.add_argument("--run-dir", help="the trainer's run directory (default: a temporary one, removed at the end)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides on top of the small soak model, e.g. model.width=64 model.heads=2")
    p.add_argument("--quiet", action="store_true", help="no trainer log lines")
    p.add_argument("--from-csv", action="store_true",
                   help="train nothing: summarize and plot the soak.csv already in --out again (keeps the "
                        "run's fields in soak.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_csv:
        return resummarize(Path(args.out), args.warmup, args.tolerance)
    import torch

    from fastdiff.config import ConfigError, build_config, parse_overrides

    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda") or args.device.startswith("cuda")
    frames = args.frames or (1_000_000 if cuda else 100_000)
    every = args.every or max(50, frames // 200)
    warmup = int(args.warmup * frames) if args.warmup < 1 else int(args.warmup)
    overrides = {**SMALL, "run.frames": str(frames), "run.stream": args.stream, "run.device": args.device,
                 "run.minutes": "0"}  # a soak runs its frames, however long they take
    try:
        overrides.update(parse_overrides(args.set))
        cfg = build_config("tiny", None, overrides)
    except ConfigError as err:
        print(f"soak: invalid config: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    temp_run = args.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="fastdiff-soak-")) if temp_run else Path(args.run_dir)
    log = (lambda *_, **__: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))

    SoakTrainer = make_trainer_class()
    SoakTrainer.sample_every_frames = every
    SoakTrainer.rows = []
    t0 = time.perf_counter()
    SoakTrainer.t0 = t0
    rows = SoakTrainer.rows
    try:
        trainer = SoakTrainer(cfg, run_dir, log=log)
        trainer.record()  # frame 0 (after set-up: stream, autoencoder fit, model, buffer)
        summary = trainer.train()
        if rows[-1]["frame"] != trainer.frames_seen:
            trainer.record()
    finally:
        if temp_run:
            shutil.rmtree(run_dir, ignore_errors=True)
    wall = time.perf_counter() - t0

    with open(out / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    verdict = summarize(rows, warmup, args.tolerance)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
        else "scripts/soak.py " + " ".join(shlex.quote(a) for a in argv),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "device": str(trainer.device), "stream": args.stream,
        "frames": trainer.frames_seen, "steps": summary["steps"], "skipped_steps": summary["skipped_steps"],
        "wall_seconds": round(wall, 1), "train_seconds": round(summary["seconds"], 1),
        "frames_per_second": round(summary["frames_per_second"], 2), "sample_every_frames": every,
        "parameters": round(trainer.memory_estimate()["parameters_M"] * 1e6),
        "overrides": {k: v for k, v in overrides.items()},
        **verdict,
    }
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, warmup, out / "soak.png",
         f"soak: {trainer.frames_seen:,} frames of {args.stream}, {report['machine']}; "
         f"slope {verdict['rss_slope_MiB_per_10k_frames']:+.2f} MiB/10k frames ({verdict['verdict']})")
    print(json.dumps({k: report[k] for k in ("frames", "wall_seconds", "frames_per_second", "rss_warmup_end_MiB",
                                             "rss_end_MiB", "rss_slope_MiB_per_10k_frames", "verdict")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
