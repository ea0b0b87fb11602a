"""Profile the online step with torch.profiler: a Chrome trace and a top-kernels table.

Builds a trainer (preset and --set as for `fastdiff train`), fills the live window, runs --warmup steps
(compilation, graph capture), then records --steps steps. Writes, under --out (default
runs/profile-<gpu or cpu>-<preset>-<step>/: a run's output, not the source tree): trace.json (open in
chrome://tracing or Perfetto),
top_kernels.md / .json (each op or kernel's share of the device time, its time per step and launches per
step), and summary.json.

examples:
  fastdiff profile --preset small --steps 20
  fastdiff profile --preset h100 --set run.step=device --steps 10
"""

from __future__ import annotations

import sys

HELP = "profile N online steps: Chrome trace + top-kernels table under runs/ (or --out)"


def add_arguments(p) -> None:
    p.add_argument("--preset", help="model preset (default: fits the machine)")
    p.add_argument("--stream", default="balls-o")
    p.add_argument("--steps", type=int, default=10, help="steps recorded")
    p.add_argument("--warmup", type=int, default=5, help="steps before recording (compile, capture)")
    p.add_argument("--top", type=int, default=25, help="rows of the top-kernels table")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--out", help="output folder")


def run(args) -> int:
    import json
    import tempfile
    import time
    from pathlib import Path

    import torch
    from torch.profiler import ProfilerActivity, profile

    from fastdiff.config import ConfigError, build_config, parse_overrides
    from fastdiff.train import OnlineTrainer
    from fastdiff_kernels import autotune

    if args.steps < 1 or args.warmup < 0:
        print("fastdiff profile: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    try:
        settings = {"run.stream": args.stream, "run.progress": "false", "run.sample_every": "0",
                    "run.frames": "1000000", "autoencoder.warmup_frames": "256", "autoencoder.fit_steps": "20",
                    **parse_overrides(args.set)}
        cfg = build_config(args.preset, None, settings)
    except ConfigError as err:
        print(f"fastdiff profile: invalid config: {err}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and cfg.run.device != "cpu"
    where = autotune.slug(autotune.device_name(torch.device("cuda"))) if cuda else "cpu"
    out = Path(args.out or Path("runs") / f"profile-{where}-{cfg.preset}-{cfg.run.step}")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainer = OnlineTrainer(cfg, Path(tmp) / "run", log=lambda *_: None)
        except (ValueError, MemoryError) as err:
            print(f"fastdiff profile: {err}", file=sys.stderr)
            return 2

        while not trainer.step.ready:  # fill the live window (its last frame takes the first step)
            trainer.advance()
        for _ in range(args.warmup):
            trainer.advance()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(args.steps):
                trainer.advance()
            if cuda:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    prof.export_chrome_trace(str(out / "trace.json"))
    rows = top_kernels(prof, args.steps, cuda, args.top)
    (out / "top_kernels.json").write_text(json.dumps(rows, indent=2))
    device = torch.cuda.get_device_name() if cuda else "cpu"
    lines = [f"# Top {'kernels' if cuda else 'ops'}: {cfg.preset}, run.step={cfg.run.step}, compile={cfg.run.compile}, "
             f"{device}, {args.steps} steps ({1e3 * seconds / args.steps:.2f} ms/step under the profiler)", "",
             "| op / kernel | share of time | ms per step | launches per step |", "|---|---|---|---|"]
    lines += [f"| `{r['name'][:90]}` | {r['share']:.1%} | {r['ms_per_step']:.3f} | {r['calls_per_step']:.1f} |"
              for r in rows]
    (out / "top_kernels.md").write_text("\n".join(lines) + "\n")
    summary = {"device": device, "preset": cfg.preset, "step": cfg.run.step, "compile": cfg.run.compile,
               "steps": args.steps, "ms_per_step": 1e3 * seconds / args.steps, "date": time.strftime("%Y-%m-%d"),
               "launches_per_step": sum(r["calls_per_step"] for r in rows) if cuda else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    print(f"wrote {out}/trace.json, top_kernels.md, top_kernels.json")
    return 0


def top_kernels(prof, steps: int, cuda: bool, top: int) -> list[dict]:
    """Ops (CPU) or device kernels (CUDA) by self time: share, ms per step, launches per step."""
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda and not hasattr(events[0] if len(events) else None, key):
        key = "self_cuda_time_total"
    timed = [(e, getattr(e, key, 0.0)) for e in events]
    timed = [(e, t) for e, t in timed if t > 0]
    total = sum(t for _, t in timed) or 1.0
    timed.sort(key=lambda et: -et[1])
    return [{"name": e.key, "share": t / total, "ms_per_step": t / 1e3 / steps, "calls_per_step": e.count / steps}
            for e, t in timed[:top]]
