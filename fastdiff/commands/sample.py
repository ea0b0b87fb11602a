"""Sample a video from a trained run's EMA model.

Modes: `autoregressive` (the paper's sliding rollout: observe K/2 frames, generate K/2, slide).
Context frames come from the run's held-out test stream (or its training stream for video files).

examples:
  fastdiff sample runs/balls-o-tiny-... --frames 60 --out rollout.mp4
"""

from __future__ import annotations

import sys

HELP = "generate a video from a trained run"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--frames", type=int, default=60, help="frames to generate, context included")
    p.add_argument("--out", help="output file (.mp4, .gif or .png strip); default RUN/samples/sample.mp4")
    p.add_argument("--mode", default="autoregressive", choices=("autoregressive",), help="sampling scheme")
    p.add_argument("--sampler", choices=("ddim", "heun"), help="override diffusion.sampler")
    p.add_argument("--steps", type=int, help="override diffusion.sample_steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def run(args) -> int:
    from pathlib import Path

    from fastdiff.sampling import load_run, sample_video, save_video

    try:
        run = load_run(Path(args.run), device=args.device)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"fastdiff sample: {err}", file=sys.stderr)
        return 2
    if args.sampler:
        run.cfg.diffusion.sampler = args.sampler
    if args.steps:
        run.cfg.diffusion.sample_steps = args.steps
    frames = sample_video(run, args.frames, mode=args.mode, seed=args.seed)
    out = Path(args.out) if args.out else Path(args.run) / "samples" / "sample.mp4"
    save_video(frames, out, fps=run.fps)
    print(f"wrote {out} ({len(frames)} frames)")
    return 0
