"""Reproduce the paper's experiment: strategies at equal steps, batch and seeds, then a report.

`paper` trains each --strategies run on the stream (one gradient step per frame, 1 live + 1 other
window per batch), keeps EMA milestones along the stream, evaluates every run on the held-out test
stream (`fastdiff eval`), and writes OUT/report.md with the table in the paper's form, the loss by
quarter of the test stream (who forgot), and plots along the stream. Finished runs are kept, so an
interrupted experiment continues where it stopped when run again with the same arguments. --jobs N
trains and evaluates N runs at once, each in its own process pinned to its own share of the cores.

examples:
  fastdiff experiment paper --stream balls-c --frames 20000
  fastdiff experiment paper --stream balls-c --frames 6000 --seeds 0 1 --jobs 2
  fastdiff experiment paper --stream balls-c --frames 1000000 --seeds 0 1 --preset small --clips 1000 --i3d i3d.pt
"""

from __future__ import annotations

import sys

HELP = "run the paper's experiment (offline vs ER vs no replay, ...) and write a report"


def add_arguments(p) -> None:
    p.add_argument("name", choices=("paper",), help="the experiment (paper: Yoo et al. 2024)")
    p.add_argument("--stream", default="balls-c", help="stream (default balls-c, the drifting one)")
    p.add_argument("--frames", type=int, default=20_000, help="frames (= gradient steps) per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--strategies", default="offline,er,none",
                   help="comma-separated: offline, er, none, full, gen-distill (default offline,er,none)")
    p.add_argument("--preset", help="model preset (default: fits the machine; on a CPU tiny, in pixels)")
    p.add_argument("--out", help="experiment directory (default runs/experiment-STREAM-FRAMES)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--curve-points", type=int, default=8, help="milestones along the stream per run")
    p.add_argument("--clips", type=int, default=64, help="held-out clips for the final numbers (paper: 1000)")
    p.add_argument("--curve-clips", type=int, default=16, help="held-out clips per milestone")
    p.add_argument("--samples", type=int, default=3, help="continuations per clip")
    p.add_argument("--steps", type=int, default=0, help="sampler steps (default: the run's)")
    p.add_argument("--i3d", default="", help="TorchScript I3D file: adds FVD and KVD")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained and evaluated at once, each in its own process on its own share of the "
                        "cores (default 1: one after the other, on all of them)")


def run(args) -> int:
    from pathlib import Path

    from fastdiff.config import ConfigError, parse_overrides
    from fastdiff.evaluate import EvalOptions
    from fastdiff.experiment import run_experiment
    from fastdiff.streams.base import StreamError

    out = Path(args.out or f"runs/experiment-{args.stream.replace(':', '_')}-{args.frames}")
    opts = EvalOptions(clips=args.clips, curve_clips=args.curve_clips, samples=args.samples,
                       sample_steps=args.steps, i3d=args.i3d)
    try:
        if args.curve_points < 1:
            raise ValueError(f"--curve-points must be >= 1, got {args.curve_points}")
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        report = run_experiment(out, stream=args.stream, frames=args.frames, seeds=args.seeds,
                                strategies=strategies, preset=args.preset, overrides=parse_overrides(args.set),
                                opts=opts, curve_points=args.curve_points, jobs=args.jobs)
    except (ConfigError, StreamError, ValueError, FileNotFoundError, MemoryError) as err:
        print(f"fastdiff experiment: {err}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'} ({report['minutes']:.1f} min)")
    return 0
