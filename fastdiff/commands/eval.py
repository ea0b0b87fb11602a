"""Evaluate a run on its held-out test stream, as the paper did (Yoo et al. 2024, section 5).

Loss at 10 fixed noise levels; for the balls streams minADE (best of --samples continuations of
--observed real frames, ball centres by template matching), ColorKL and colour accuracy; FVD and KVD
when --i3d names a TorchScript I3D file (nothing is downloaded). With milestones in the run
(run.milestone_every) the same numbers along the stream, as RUN/eval/curve.png. Results: RUN/eval/eval.json.

examples:
  fastdiff eval runs/balls-c-tiny-...
  fastdiff eval runs/balls-c-tiny-... --clips 1000 --samples 3 --steps 50 --i3d i3d_torchscript.pt
"""

from __future__ import annotations

import sys

HELP = "evaluate a run: held-out loss, minADE, ColorKL, FVD/KVD, curves along the stream"


def add_arguments(p) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--clips", type=int, default=64, help="test clips, evenly spaced over the stream (paper: 1000)")
    p.add_argument("--curve-clips", type=int, default=16, help="test clips per milestone along the stream")
    p.add_argument("--samples", type=int, default=3, help="continuations per clip (minADE: the best)")
    p.add_argument("--observed", type=int, default=5, help="real frames each continuation starts from")
    p.add_argument("--length", type=int, default=50, help="frames per clip, observed included")
    p.add_argument("--steps", type=int, default=0, help="sampler steps (default: the run's diffusion.sample_steps)")
    p.add_argument("--batch", type=int, default=96, help="videos sampled at once")
    p.add_argument("--i3d", default="", help="TorchScript I3D file for FVD / KVD")
    p.add_argument("--no-curve", action="store_true", help="skip the milestones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def run(args) -> int:
    from pathlib import Path

    from fastdiff.checkpoint import CheckpointError
    from fastdiff.evaluate import EvalOptions, evaluate_run

    opts = EvalOptions(clips=args.clips, curve_clips=args.curve_clips, samples=args.samples,
                       observed=args.observed, length=args.length, sample_steps=args.steps, batch=args.batch,
                       i3d=args.i3d, seed=args.seed)
    try:
        report = evaluate_run(Path(args.run), opts, curve=not args.no_curve, device=args.device)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"fastdiff eval: {err}", file=sys.stderr)
        return 2
    final = report["final"]
    keys = ("loss", "minADE", "ColorKL", "colour_accuracy", "ball_count_ok", "ball_speed", "forecast_error", "FVD",
            "KVD")
    print("  ".join(f"{k} {final[k]:.5g}" for k in keys if k in final))
    print(f"wrote {Path(args.run) / 'eval' / 'eval.json'}")
    return 0
