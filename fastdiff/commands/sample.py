"""Sample a video from a trained run's EMA model.

Modes:
  autoregressive  the paper's sliding rollout: observe K/2 frames, generate K/2 with the full sampler, slide.
  fifo            FIFO-Diffusion's diagonal denoising: a queue of frames at rising noise levels, one
                  denoising step per output frame, device memory constant in --frames. Latent
                  partitioning (--partitions n blocks of K frames) and lookahead denoising (K/2 cleaner
                  frames in front of every block; --no-lookahead turns it off).
Context frames come from the run's held-out test stream (or its training stream for video files).
--fast-learning adapts a temporal LoRA to the video while it is generated (SlowFast-VGen).

examples:
  fastdiff sample runs/balls-o-tiny-... --frames 60 --out rollout.mp4
  fastdiff sample runs/balls-o-tiny-... --mode fifo --frames 2000 --out long.mp4
  fastdiff sample runs/balls-o-tiny-... --mode autoregressive --frames 500 --fast-learning --lora-rank 32
"""

from __future__ import annotations

import sys

from fastdiff.config import CHOICES, SAMPLE_MODES

HELP = "generate a video from a trained run"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--frames", type=int, default=60, help="frames to write, context included")
    p.add_argument("--out", help="output file (.mp4, .gif or .png strip); default RUN/samples/sample.mp4")
    p.add_argument("--mode", default="autoregressive", choices=SAMPLE_MODES, help="sampling scheme")
    p.add_argument("--sampler", choices=CHOICES["diffusion.sampler"],
                   help="override diffusion.sampler (autoregressive)")
    p.add_argument("--steps", type=int, help="override diffusion.sample_steps")
    p.add_argument("--partitions", type=int, default=0,
                   help="fifo: blocks of K frames in the queue (default: about --steps rungs)")
    p.add_argument("--no-lookahead", action="store_true", help="fifo: turn lookahead denoising off")
    p.add_argument("--warmup", type=int, help="fifo: first outputs to drop (default: queue length - K)")
    p.add_argument("--fast-learning", action="store_true",
                   help="train a temporal LoRA on each new chunk while generating (base weights frozen)")
    p.add_argument("--lora-rank", type=int, default=32, help="fast learning: LoRA rank")
    p.add_argument("--fast-steps", type=int, default=1, help="fast learning: gradient steps per chunk")
    p.add_argument("--fast-lr", type=float, default=1e-4, help="fast learning: Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def run(args) -> int:
    from pathlib import Path

    from fastdiff.sampling import SampleOptions, load_run, sample_video, save_video

    opts = SampleOptions(mode=args.mode, seed=args.seed, partitions=args.partitions, lookahead=not args.no_lookahead,
                         warmup=args.warmup, fast_learning=args.fast_learning, lora_rank=args.lora_rank,
                         fast_steps=args.fast_steps, fast_lr=args.fast_lr)
    out = Path(args.out) if args.out else Path(args.run) / "samples" / "sample.mp4"
    try:
        opts.check()
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if out.suffix.lower() not in (".mp4", ".gif", ".png"):
            raise ValueError(f"--out {out}: use .mp4, .gif or .png")
        run = load_run(Path(args.run), device=args.device)
        if args.sampler:
            run.cfg.diffusion.sampler = args.sampler
        if args.steps:
            run.cfg.diffusion.sample_steps = args.steps
        frames = sample_video(run, args.frames, context=None, options=opts)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"fastdiff sample: {err}", file=sys.stderr)
        return 2
    save_video(frames, out, fps=run.fps)
    print(f"wrote {out} ({len(frames)} frames, mode {args.mode})")
    return 0
