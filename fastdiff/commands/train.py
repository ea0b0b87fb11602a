"""Train a video diffusion model online from a stream: one gradient step per arriving frame.

With no arguments, trains on the generated Lifelong Bouncing Balls stream (balls-o) with the preset
that fits this machine (`tiny-latent` on a CPU). Every setting can come from a preset, a TOML file
(--config) and --set section.field=value, later ones winning; `--set` names are the fields of
fastdiff/config.py, e.g. optim.lr=3e-4, replay.strategy=none, autoencoder.latent=none.

examples:
  fastdiff train
  fastdiff train --stream balls-c --frames 20000 --preset small --set replay.strategy=er
  fastdiff train --stream video:clips/ --set run.window=16
  fastdiff train --resume runs/balls-o-tiny-20261121-120000 --frames 6000
  fastdiff train --stream video:clips/ --stream-option on_error=skip --stream-option size=64x64

Extending a run (--resume DIR --frames N, N larger or smaller) keeps what the run was created with: the
stream's nominal length and the replay buffer's capacity; --resize-buffer N changes the capacity explicitly
(a shrink keeps a uniform subset of the reservoir). Where the learning rate cools down to 0 at the run's last
frame (optim.cooldown; 1.0 in tiny), an extended run plans the cool-down over its new length, so the rate rises
again at once. Ctrl-C (or SIGTERM) finishes the current step, writes a
checkpoint and prints how to resume; a second one stops at once.
"""

from __future__ import annotations

import sys

from fastdiff.config import CHOICES

HELP = "train online on a stream (default: generated bouncing balls)"


def add_arguments(p) -> None:
    p.add_argument("--stream", help="balls-o (default), balls-c, maze, video:PATH (file, folder or a,b,c), npy:DIR")
    p.add_argument("--streams", nargs="+", metavar="SPEC",
                   help="under torchrun: one stream per rank (as many as --nproc-per-node), e.g. balls-o balls-c")
    p.add_argument("--frames", type=int, help="frames to train on (one gradient step each); default: the preset's")
    p.add_argument("--minutes", type=float,
                   help="run.minutes: a wall-clock limit on the whole job (set-up, training, final sample), which "
                        "ends the run before --frames where the rest would not fit; 0: none. Default: the "
                        "preset's (tiny, tiny-latent: 9.5, for the default job's 10 minutes), or none where "
                        "--frames is given")
    p.add_argument("--preset", help="tiny-latent (CPU default), tiny (pixels), tiny-long, small (~8M params), base "
                                    "(~75M), gpu-8gb, gpu-12gb, gpu-24gb, h100; default: fits the machine")
    p.add_argument("--strategy", choices=CHOICES["replay.strategy"],
                   help="replay strategy (replay.strategy); default er")
    p.add_argument("--step", choices=CHOICES["run.step"],
                   help="run.step: eager (reference), device (no host sync), graph (one CUDA graph per step)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (run.compile)")
    p.add_argument("--out", help="directory that holds runs (default runs/)")
    p.add_argument("--name", help="run name (default: stream-preset-timestamp)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest readable checkpoint")
    p.add_argument("--config", metavar="FILE", help="TOML file with [run], [model], [replay], ... sections")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--seed", type=int, help="run.seed")
    p.add_argument("--device", help="run.device: auto, cpu, cuda, cuda:1")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--stream-option", metavar="KEY=VALUE", action="append", default=[],
                   help="an option of the stream (run.stream_options), e.g. on_error=skip|stop|raise, size=64x64, "
                        "crop=X,Y,W,H, fps=10 for video:PATH (repeatable)")
    p.add_argument("--resize-buffer", type=int, metavar="N",
                   help="with --resume: change the replay buffer's capacity to N windows (replay.windows)")
    p.add_argument("--threads", type=int, help="intra-op CPU threads (run.threads; default: the cores this process "
                                               "may use)")


def run(args) -> int:
    import json
    from pathlib import Path

    from fastdiff.config import ConfigError, build_config, parse_overrides

    try:
        overrides = parse_overrides(args.set)
        flag_map = {"stream": "run.stream", "frames": "run.frames", "out": "run.out", "name": "run.name",
                    "seed": "run.seed", "device": "run.device", "strategy": "replay.strategy", "step": "run.step"}
        for flag, key in flag_map.items():
            if getattr(args, flag) is not None:
                overrides[key] = getattr(args, flag)
        if args.minutes is not None:
            overrides["run.minutes"] = args.minutes
        elif args.frames is not None:  # frames asked for by name are trained, however long they take
            overrides["run.minutes"] = 0
        if args.no_progress:
            overrides["run.progress"] = False
        if args.stream_option:
            overrides["run.stream_options"] = ";".join(args.stream_option)
        if args.threads is not None:
            overrides["run.threads"] = args.threads
        if args.resize_buffer is not None:
            if not args.resume:
                raise ConfigError("--resize-buffer: only with --resume (a new run sizes its buffer with "
                                  "replay.windows or replay.fraction)")
            overrides["replay.windows"] = args.resize_buffer
        if args.compile:
            overrides["run.compile"] = True
        if getattr(args, "streams", None):
            from fastdiff.distributed import STREAMS_SEPARATOR

            overrides["run.streams"] = STREAMS_SEPARATOR.join(args.streams)
        toml_path = args.config
        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.json").exists():
                print(f"fastdiff train: --resume {run_dir}: no config.json there (not a run directory)",
                      file=sys.stderr)
                return 2
            saved = json.loads((run_dir / "config.json").read_text())
            from fastdiff.config import Config

            cfg = Config.from_dict(saved)
            from fastdiff.config import set_value, validate

            for key, value in overrides.items():
                set_value(cfg, key, value)
            validate(cfg)
        else:
            cfg = build_config(args.preset, toml_path, overrides)
    except ConfigError as err:
        print(f"fastdiff train: invalid config: {err}", file=sys.stderr)
        return 2
    too_big = _model_too_big(cfg)
    if too_big:
        print(f"fastdiff train: invalid config: {too_big}", file=sys.stderr)
        return 2

    import torch

    from fastdiff import distributed
    from fastdiff.streams.base import StreamError
    from fastdiff.train import OnlineTrainer, new_run_dir, write_config

    trainer = None  # set once the run is set up: an allocation failure before that is a config problem (exit 2)
    try:
        world = distributed.init_from_env(cfg.run.device)  # under torchrun: join the process group

        def make_run_dir():  # rank 0 only; the other ranks get its path
            run_dir = Path(args.resume) if args.resume else new_run_dir(cfg)
            write_config(cfg, run_dir)
            print(f"run directory: {run_dir}" + (f" ({world.size} ranks)" if world.active else ""))
            return run_dir

        run_dir = world.run_on_main(make_run_dir)
        try:
            trainer = OnlineTrainer(cfg, run_dir, resume=bool(args.resume),
                                    resize_buffer=args.resize_buffer is not None, started=process_started())
        except BaseException:
            if not args.resume and world.is_main:
                _remove_if_empty(run_dir)  # a run that never started leaves nothing behind
            raise
        summary = trainer.train()
        if not world.is_main:
            return 0
    except (StreamError, FileExistsError, MemoryError, ValueError) as err:
        print(f"fastdiff train: {err}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print("fastdiff train: out of GPU memory. Try a smaller preset (--preset tiny or small), "
              "replay.storage=pixel, or --set model.checkpoint_activations=true", file=sys.stderr)
        return 3
    except RuntimeError as err:  # torch's host allocator: an absurd size is refused by malloc, not MemoryError
        if "can't allocate memory" not in str(err):
            raise
        when = "while setting up the run" if trainer is None else "while training"
        print(f"fastdiff train: out of host memory {when}: {_allocation_text(err)}. Lower model.width / "
              "model.depth, autoencoder.hidden, replay.live, replay.windows / replay.fraction, or use a smaller "
              "--preset", file=sys.stderr)
        return 2 if trainer is None else 3
    print(json.dumps(summary, indent=2))
    if summary.get("interrupted"):
        return 130
    print(f"samples: {run_dir / 'samples'}")
    return 0


def _remove_if_empty(run_dir) -> None:
    """Delete a new run's directory when it holds nothing but the config written before the run could start."""
    import shutil
    from pathlib import Path

    run_dir = Path(run_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"config.json", "config.toml"}:
        shutil.rmtree(run_dir)


def _allocation_text(err: RuntimeError) -> str:
    """'a tensor of 4096.00 GiB could not be allocated' from torch's allocator message (or its first line)."""
    import re

    found = re.search(r"allocate (\d+) bytes", str(err))
    if found:
        return f"a tensor of {int(found.group(1)) / 2**30:,.2f} GiB could not be allocated"
    return str(err).splitlines()[0][:200]


def _model_too_big(cfg) -> str | None:
    """A message when the model cannot fit in this machine's memory whatever else runs: its blocks' MLP and
    adaLN weights alone (a lower bound on the parameters), in fp32 weights, EMA and gradients, exceed the
    physical memory. Building a model of millions of small blocks would otherwise take minutes and end in
    the kernel's OOM killer, with no message at all."""
    import os

    m = cfg.model
    per_block = (2 * int(m.width * m.mlp_ratio) + 9 * m.width) * m.width
    need = per_block * m.depth * 12
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    if need <= total:
        return None
    return (f"model.width={m.width}, model.depth={m.depth}: the model needs at least {need / 2**30:,.1f} GiB "
            f"(fp32 weights, EMA and gradients) but this machine has {total / 2**30:,.1f} GiB of memory; "
            "lower model.width / model.depth")


def process_started() -> float:
    """When this process started, on time.monotonic()'s clock: run.minutes counts the job's whole wall time, the
    interpreter's start and the imports included. Linux reads it from /proc; elsewhere it is now."""
    import os
    import time
    from pathlib import Path

    try:  # field 22 of stat (the 20th after the name, which may hold spaces): the start, in clock ticks since boot
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot_age = float(Path("/proc/uptime").read_text().split()[0])  # seconds since boot
        age = boot_age - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic()
    return time.monotonic() - max(age, 0.0)
