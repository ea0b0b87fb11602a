"""Run every component benchmark and the end-to-end online step, and print the step's table.

Each benchmark in bench/ runs in its own process (ours vs eager, torch.compile, SDPA / xformers /
bitsandbytes as fits; ratios, GB/s or TFLOP/s and the share of the device's measured ceiling) and writes
its rows as JSON + CSV. Every benchmark takes the same flags (bench/utils.py): --device, --out FILE.json,
--smoke and --repeats, passed alike to all. On a GPU the rows go to profiles/<gpu>/; without one every
benchmark runs with --smoke (tiny sizes: it checks every code path runs, in about a minute, and times
nothing worth keeping) and the rows go to runs/bench-cpu-smoke/.

examples:
  fastdiff bench
  fastdiff bench --only train_step attention --repeats 500
  fastdiff bench --smoke                                  # on a GPU too: seconds per benchmark
"""

from __future__ import annotations

import sys

HELP = "run every component benchmark plus the end-to-end step; table + JSON under profiles/<gpu>/"

BENCHES = ("streams", "temporal_attention", "noise_schedule", "adaln_modulate", "local_mix", "adamw8bit", "sampling",
           "train_step")


def add_arguments(p) -> None:
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"a subset of {', '.join(BENCHES)} (substrings match)")
    p.add_argument("--repeats", type=int, help="timed repetitions per measurement, passed to every benchmark (the "
                                               "end-to-end benchmark's timed steps); default: each benchmark's own")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on a GPU too (always so without one)")
    p.add_argument("--out", help="folder for the rows (default: profiles/<gpu>/ or runs/bench-cpu-smoke/)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark")


def bench_dir():
    from pathlib import Path

    import fastdiff

    folder = Path(fastdiff.__file__).resolve().parent.parent / "bench"
    return folder if folder.is_dir() else None


def run(args) -> int:
    import json
    import os
    import subprocess
    import time
    from pathlib import Path

    import torch

    from fastdiff_kernels import autotune

    folder = bench_dir()
    if folder is None:
        print("fastdiff bench: bench/ not found next to the installed package; run it from a source checkout "
              "(pip install -e .)", file=sys.stderr)
        return 2
    names = [b for b in BENCHES if not args.only or any(o in b for o in args.only)]
    if not names:
        print(f"fastdiff bench: --only {args.only} matches none of {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    smoke = args.smoke or not on_gpu
    if on_gpu:
        out = Path(args.out or autotune.profiles_root() / autotune.slug(autotune.device_name(torch.device("cuda"))))
    else:
        out = Path(args.out or "runs/bench-cpu-smoke")
        print("no GPU: every benchmark runs at smoke sizes (it checks every code path runs; its timings mean nothing)")
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        cmd = [sys.executable, str(folder / f"bench_{name}.py"), "--device", device,
               "--out", str(out / f"bench_{name}.json"), *["--smoke"] * smoke,
               *(["--repeats", str(args.repeats)] if args.repeats else [])]
        started = time.perf_counter()
        print(f"--- bench_{name} ...", flush=True)
        try:
            done = subprocess.run(cmd, timeout=args.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                  capture_output=True, text=True)
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired:
            code, text = 124, f"timed out after {args.timeout} s"
        status = "ok" if code == 0 else f"failed (exit {code})"
        print(f"    {status} in {time.perf_counter() - started:.0f} s")
        if code:
            failed.append(name)
            print("\n".join("    " + line for line in text.strip().splitlines()[-15:]))
    step_rows = out / "bench_train_step.json"
    if "train_step" in names and step_rows.exists():
        print_step_table(json.loads(step_rows.read_text()))
    print(f"rows: {out}")
    return 1 if failed else 0


def print_step_table(rows: list[dict]) -> None:
    cols = (("config", "{}"), ("frames/s", "{:.1f}"), ("ms_per_step", "{:.2f}"), ("peak_memory_MiB", "{:.0f}"),
            ("speedup_vs_eager_fp32", "{:.2f}x"), ("memory_vs_eager_fp32", "{:.2f}x"),
            ("model_TFLOP/s", "{:.4f}"), ("share_of_matmul_ceiling", "{:.2%}"))
    if rows:
        first = rows[0]
        print(f"\nend-to-end online step on {first.get('gpu')} (model {first.get('model', first.get('preset'))}, "
              f"batch {first.get('batch')}; frames/s = steps/s, one step per frame; model FLOPs counted over one "
              f"step, {first.get('model_GFLOP_per_step', '?')} GFLOP; matmul ceiling "
              f"{first.get('matmul_ceiling_TFLOP/s', '?')} TFLOP/s at {first.get('matmul_ceiling_at', '?')})")
    print("| " + " | ".join(c for c, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        if row.get("status") != "ok":
            print(f"| {row['config']} | {row['status']} |")
            continue
        cells = [fmt.format(row[c]) if row.get(c) is not None else "–" for c, fmt in cols]
        print("| " + " | ".join(cells) + " |")
