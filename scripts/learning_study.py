#!/usr/bin/env python
"""The learning-efficiency study: what moves held-out quality per minute of CPU training on Lifelong Bouncing
Balls (balls-o), each row against the floors (repeat the last frame, constant velocity) and the ground truth.

A row is the `tiny` preset as the study found it (BASE below) with some overrides, trained online for a fixed
budget of process CPU seconds (the autoencoder's fit and all set-up included: it is part of what a user waits
for), then evaluated on the same
held-out clips as every other row: the held-out loss, and from sampled 50-frame continuations (5 real frames,
45 generated) minADE, ColorKL, colour accuracy and the share of generated frames with exactly two balls.
CPU seconds, not wall seconds: rows run side by side on a shared machine, and a busy core slows a run's wall
clock but not the work it gets done (run one row per core, one thread each).

    python scripts/learning_study.py run NAME --budget 720 [--seed 0] [--set section.field=value ...]
    python scripts/learning_study.py queue ROWS.txt --jobs 2        # one row per line: NAME [run options]
    python scripts/learning_study.py table [--out profiles/learning]  # study.md + study.json from the results
    python scripts/learning_study.py sampler NAME [--steps 10 20 50] [--sampler ddim heun] [--set diffusion.K=V]
        [--run RUN_DIR] [--clips 12] [--threads 1]   # one model, other samplers: samples and their scores only
    python scripts/learning_study.py forecast RUN_DIR_OR_CHECKPOINT ...  # the one-call forecast error, seconds each
    python scripts/learning_study.py loss RUN_DIR_OR_CHECKPOINT ... [--windows 64]  # the plain held-out loss
    python scripts/learning_study.py contacts RUN_DIR_OR_CHECKPOINT ... [--windows 400] [--sampled 60]
        [--set diffusion.K=V] [--out FILE.json] [--denoise 10 150 400]   # the forecast (and sampled windows, and
        # one-call denoising of the true frames) where balls meet and elsewhere

Results go to runs/learning/<NAME>/ (the run directory and result.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "learning"
# Every row starts from these; a row's --set overrides them. They pin the tiny preset as it was when the study
# began (latent, patch 1, eps, learned positions, no frame positions or local mix, lr 1e-4, 1 live + 5 replayed),
# so that a row's settings mean the same after the preset moved to the study's winner.
BASE = {"run.progress": "false", "run.sample_every": "0", "run.final_clips": "0", "run.frames": "1000000",
        "run.checkpoint_every": "100000000", "run.log_every": "100", "replay.windows": "500",
        "autoencoder.latent": "ae", "model.patch": "1", "model.pos_embed": "learned", "diffusion.prediction": "eps",
        "diffusion.sample_steps": "50", "optim.lr": "1e-4", "optim.warmup": "0", "replay.replayed": "5",
        "model.frame_pos": "false", "model.local_mix": "false",
        "diffusion.train_staggered": "false", "optim.cooldown": "0"}
EVAL = {"clips": 12, "samples": 3, "sample_steps": 20}
METRICS = ("loss", "minADE", "ColorKL", "colour_accuracy", "ball_count_ok", "forecast_error")


def run_row(name: str, budget: float, seed: int, settings: list[str], eval_opts: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from fastdiff.config import build_config, parse_overrides
    from fastdiff.evaluate import FORECAST_WINDOWS, EvalOptions, evaluate, evaluation_clips
    from fastdiff.sampling import load_run
    from fastdiff.train import OnlineTrainer

    overrides = {**BASE, "run.seed": str(seed), "run.threads": str(threads), **parse_overrides(settings)}
    cfg = build_config("tiny", None, overrides)
    run_dir = RUNS / name
    if (run_dir / "result.json").exists():
        return json.loads((run_dir / "result.json").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trainer = OnlineTrainer(cfg, run_dir, log=lambda *a, **k: print(*a, flush=True))
    setup_cpu = time.process_time() - cpu0
    curve = []
    # A row ends at its CPU budget, or at run.frames where a row sets it (a cool-down ends there).
    while time.process_time() - cpu0 < budget and trainer.frames_seen < trainer.total_frames and trainer.advance():
        if trainer.step.ready and trainer.frames_seen % 100 == 0:
            curve.append({"frame": trainer.frames_seen, "loss": trainer.step.result().loss,
                          "cpu": round(time.process_time() - cpu0, 1)})
    train_cpu, train_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    trainer.feed.close()
    trainer.save_checkpoint()
    run = load_run(run_dir, device="cpu")
    opts = EvalOptions(clips=eval_opts["clips"], samples=eval_opts["samples"], sample_steps=eval_opts["sample_steps"],
                       curve_clips=1)
    clips = evaluation_clips(run, opts.clips, opts.length)
    eval0 = time.perf_counter()
    # the one-call forecast (the row's and its floors') on more windows than the sampled clips: it is one model call
    result = evaluate(run, clips, opts, forecast_clips=evaluation_clips(run, FORECAST_WINDOWS, run.window))
    result.update(name=name, seed=seed, settings=settings, budget_cpu=budget, steps=trainer.steps,
                  frames=trainer.frames_seen, setup_cpu=round(setup_cpu, 1), train_cpu=round(train_cpu, 1),
                  train_wall=round(train_wall, 1), eval_wall=round(time.perf_counter() - eval0, 1),
                  cpu_per_step=round((train_cpu - setup_cpu) / max(trainer.steps, 1), 4), curve=curve, eval=eval_opts,
                  parameters=sum(p.numel() for p in trainer.step.model.parameters()))
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(name, {k: round(result[k], 4) for k in METRICS if k in result}, "steps", trainer.steps, flush=True)
    return result


def queue(path: Path, jobs: int) -> None:
    """Run the rows listed in `path` (NAME [options]), `jobs` at a time, one thread each."""
    rows = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    rows = [shlex.split(r) for r in rows if r]
    running: list[subprocess.Popen] = []
    logs = RUNS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    for row in rows:
        while len(running) >= jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(2)
        if (RUNS / row[0] / "result.json").exists():
            continue
        with open(logs / f"{row[0]}.log", "w") as log:
            running.append(subprocess.Popen([sys.executable, __file__, "run", *row], stdout=log,
                                            stderr=subprocess.STDOUT, env=env))
    for p in running:
        p.wait()


def load_model(path: Path, settings: list[str] | tuple[str, ...] = ()):
    """A run directory or one of its checkpoint files, loaded on the CPU, with `settings` (section.field=value)
    applied to its config and the result validated."""
    from fastdiff.config import parse_overrides, set_value, validate
    from fastdiff.sampling import load_run

    run_dir, checkpoint = (path.parent.parent, path) if path.is_file() else (path, None)
    run = load_run(run_dir, device="cpu", checkpoint=checkpoint)
    for key, value in parse_overrides(list(settings)).items():
        set_value(run.cfg, key, value)
    validate(run.cfg)
    return run


def sampler_row(name: str, steps: list[int], samplers: list[str], eval_opts: dict,
                settings: list[str] | None = None, run_dir: Path | None = None, threads: int = 1) -> list[dict]:
    """One trained model's rollouts under other samplers and step counts (the sampler lever); `settings`
    (diffusion.field=value) change the sampling settings of the loaded run, e.g. diffusion.sample_frame_lag.
    `run_dir` (default runs/learning/NAME) may be any run, e.g. a default job's; with `eval_opts["clips"]` 8
    and seed 0 its clips and sampling noise are those of the run's own final sample. Samples only: the
    held-out loss does not depend on the sampler."""
    import torch

    torch.set_num_threads(threads)
    from fastdiff.evaluate import EvalOptions, balls_scores, continuations, evaluation_clips

    run_dir = run_dir or RUNS / name
    rows = []
    for sampler in samplers:
        for n in steps:
            run = load_model(run_dir, [f"diffusion.sampler={sampler}", *(settings or [])])
            opts = EvalOptions(clips=eval_opts["clips"], samples=eval_opts["samples"], sample_steps=n)
            clips = evaluation_clips(run, opts.clips, opts.length)
            started = time.perf_counter()
            result = balls_scores(continuations(run, clips, opts), clips, opts.observed)
            seconds = round(time.perf_counter() - started, 1)
            rows.append({"model": name, "sampler": sampler, "steps": n, "settings": settings or [], "seconds": seconds,
                         "clips": opts.clips, "threads": threads,
                         **{k: result.get(k) for k in (*METRICS, "ball_speed", "colour_changes")}})
            print(rows[-1], flush=True)
    out = run_dir / "samplers.json"
    earlier = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(earlier + rows, indent=2))
    return rows


def forecast(paths: list[Path], threads: int) -> list[dict]:
    """The one-call forecast error (fastdiff.evaluate.forecast_videos) of run directories or checkpoint files, on
    FORECAST_WINDOWS held-out windows of each run's stream, per frame ahead next to the floors: a few seconds each."""
    import torch

    from fastdiff.evaluate import FORECAST_WINDOWS, evaluation_clips, forecast_scores

    torch.set_num_threads(threads)
    rows = []
    for path in paths:
        run = load_model(path)
        scores = forecast_scores(run, evaluation_clips(run, FORECAST_WINDOWS, run.window), observed=5)
        rows.append({"run": str(path), "frame": run.frame, **scores})
        per_frame = "  ".join(f"{name} {' '.join(f'{e:.2f}' for e in errors)}"
                              for name, errors in scores["forecast_error_per_frame"].items())
        print(f"{path} (frame {run.frame}): mean {scores['forecast_error']:.3f} px | {per_frame}", flush=True)
    return rows


def heldout(paths: list[Path], windows: int, threads: int) -> list[dict]:
    """The plain held-out loss (fastdiff.evaluate.heldout_loss: unweighted, at eval's 10 fixed noise levels and
    seed) of run directories or checkpoint files on `windows` held-out windows of each run's stream: the study's
    held-out loss for models trained outside `run` (a default job with one change), whatever loss they trained
    with. Seconds each."""
    import torch

    from fastdiff.evaluate import EvalOptions, evaluation_clips, heldout_loss

    torch.set_num_threads(threads)
    rows = []
    for path in paths:
        run = load_model(path)
        scores = heldout_loss(run, evaluation_clips(run, windows, run.window), EvalOptions(clips=windows))
        rows.append({"run": str(path), "frame": run.frame, "windows": windows, **scores})
        print(f"{path} (frame {run.frame}): held-out loss {scores['loss']:.4f} on {windows} windows", flush=True)
    return rows


def colour_distances(paths: list[Path], frames: int = 200, seed: int = 0) -> list[dict]:
    """How far a run's latent moves when a ball changes colour, against when it appears: the mean squared distance
    between the latents (and the pixels, in [-1, 1] units) of `frames` one-ball frames that differ only in the
    ball's colour, or in whether the ball is there, the ball at random places. The diffusion loss is a squared
    latent distance: where red against green is small next to ball against black, colour weighs little."""
    import numpy as np
    import torch

    from fastdiff.models.autoencoder import encode_frames, pixels_to_unit
    from fastdiff.streams.balls import COLOR_RGB, render

    rng = np.random.RandomState(seed)
    places = rng.uniform(2, 8, size=(frames, 1, 2))
    images = {name: render(places, np.broadcast_to(COLOR_RGB[c], (frames, 1, 3)).astype(np.float64))
              for c, name in enumerate(("red", "yellow", "green"))}
    images["none"] = np.zeros_like(images["red"])
    pairs = (("red", "none"), ("red", "green"), ("red", "yellow"), ("yellow", "green"))

    def distance(first: torch.Tensor, second: torch.Tensor) -> float:
        return round(float((first - second).pow(2).flatten(1).sum(1).mean()), 2)

    unit = {name: pixels_to_unit(torch.from_numpy(f)) for name, f in images.items()}
    pixel_distances = {(a, b): distance(unit[a], unit[b]) for a, b in pairs}  # the same for every run
    rows = []
    for path in paths:
        run = load_model(path)
        latents = {name: encode_frames(run.autoencoder, f, run.device).cpu() for name, f in images.items()}
        row = {"run": str(path)}
        for a, b in pairs:
            row[f"{a}-{b}"] = {"latent": distance(latents[a], latents[b]), "pixels": pixel_distances[a, b]}
        rows.append(row)
        print(f"{path}: " + "  ".join(f"{k} latent {v['latent']:.1f} / pixels {v['pixels']:.1f}"
                                      for k, v in row.items() if k != "run"), flush=True)
    return rows


def every_ball_shares(videos, observed: int, balls: int, parts: dict) -> dict[str, float]:
    """Of the frames after the `observed` ones of `videos` (N, 1, K, H, W, 3), the share that shows every ball,
    within each part (a name -> (N, K - observed) bool mask)."""
    from fastdiff import metrics

    counted = metrics.count_balls(videos[:, 0, observed:].reshape(-1, *videos.shape[3:]))
    whole = (counted == balls).reshape(videos.shape[0], -1)
    return {part: round(float(whole[mask].mean()), 4) for part, mask in parts.items() if mask.any()}


def contacts(paths: list[Path], windows: int, sampled: int, settings: list[str], threads: int,
             out: Path | None = None, denoise: list[int] = ()) -> list[dict]:
    """Where a model's balls go wrong: held-out windows split by whether two balls meet from the last observed
    frame on (fastdiff.evaluate.contact_windows), and for each part the one-call forecast error per frame ahead,
    next to the floors' on the same windows. With `sampled` > 0, also the first `sampled` windows of each part
    rolled out once with the run's sampler (5 real frames, the rest generated; `settings` change the sampling,
    e.g. diffusion.ddim_eta=0): the share of generated frames with every ball, and the sampled balls' error.
    With `denoise` levels, also the model's one-call x0 prediction of the contact windows from their true frames
    noised to each level (fastdiff.evaluate.denoised_videos): the share of frames with every ball where two
    balls of one colour touch (within 9 px), where two of different colours do, and elsewhere, next to the truth's."""
    import numpy as np
    import torch

    from fastdiff.evaluate import (
        EvalOptions,
        contact_windows,
        continuations,
        denoised_videos,
        evaluation_clips,
        floor_videos,
        forecast_error,
        forecast_videos,
        has_colour_shift,
        is_balls,
        touching_frames,
    )

    torch.set_num_threads(threads)
    observed = EvalOptions.observed
    rounded = lambda errors: [round(float(e), 3) for e in errors]  # noqa: E731
    rows = []
    for path in paths:
        run = load_model(path, settings)
        if not is_balls(run):
            raise SystemExit(f"contacts: {path} not supported because its stream ({run.cfg.run.stream}) has no ball "
                             "positions to find contacts in; balls-o and balls-c have")
        clips = evaluation_clips(run, windows, run.window)
        touching = contact_windows(clips, observed)
        parts = {"all": np.ones(len(touching), dtype=bool), "contact": touching, "free": ~touching}
        videos = {"model": forecast_videos(run, clips, observed)}
        videos.update((name, video) for name, video in floor_videos(clips, observed, has_colour_shift(run)).items()
                      if name != "ground truth")
        row = {"run": str(path), "frame": run.frame, "settings": settings, "windows": len(touching),
               "contact_windows": int(touching.sum()),
               "forecast_px": {part: {name: rounded(forecast_error(video[mask], clips.subset(mask), observed))
                                      for name, video in videos.items()}
                               for part, mask in parts.items() if mask.any()}}
        if sampled:
            pick = np.concatenate([np.flatnonzero(touching)[:sampled], np.flatnonzero(~touching)[:sampled]])
            some = clips.subset(pick)
            # one batch: the sampling noise of a window then depends only on the windows picked
            opts = EvalOptions(samples=1, observed=observed, length=run.window, batch=len(pick))
            video = continuations(run, some, opts)
            balls = clips.centres.shape[2]
            window_parts = {"contact": touching[pick], "free": ~touching[pick]}
            shares = every_ball_shares(video, observed, balls, {part: np.repeat(mask[:, None], run.window - observed, 1)
                                                                for part, mask in window_parts.items()})
            row["sampled"] = {
                part: {"windows": int(mask.sum()), "every_ball_frames": shares[part],
                       "centre_error_px": rounded(forecast_error(video[mask], some.subset(mask), observed))}
                for part, mask in window_parts.items() if mask.any()}
        if denoise:
            met = clips.subset(np.flatnonzero(touching))
            near, same = touching_frames(met, observed)
            frame_parts = {"same_colour": same, "other_colour": near & ~same, "apart": ~near}
            balls = clips.centres.shape[2]
            row["denoised"] = {
                "frames": {part: int(mask.sum()) for part, mask in frame_parts.items()},
                "truth": every_ball_shares(met.frames[:, None, :run.window], observed, balls, frame_parts),
                "levels": {str(level): every_ball_shares(denoised_videos(run, met, observed, level), observed, balls,
                                                    frame_parts) for level in denoise}}
        rows.append(row)
        print(f"{path} (frame {run.frame}; {row['contact_windows']} of {row['windows']} windows with a contact)")
        for part, errors in row["forecast_px"].items():
            print(f"  forecast px, {part:8}" + "".join(f"  {name} {' '.join(f'{e:.2f}' for e in per)}"
                                                     for name, per in errors.items()))
        for part, s in row.get("sampled", {}).items():
            print(f"  sampled, {part:8} ({s['windows']} windows): every ball in {s['every_ball_frames']:.1%} of "
                  f"generated frames, centre error {' '.join(f'{e:.2f}' for e in s['centre_error_px'])} px", flush=True)
        if denoise:
            d = row["denoised"]
            print(f"  denoised contact windows, frames with every ball ({d['frames']}): truth {d['truth']}")
            for level, shares in d["levels"].items():
                print(f"    from level {level}: {shares}", flush=True)
    if out:
        out.write_text(json.dumps(rows, indent=2))
    return rows


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def table(out: Path) -> None:
    """profiles/learning/study.md and study.json: every row, grouped by lever, next to the floors."""
    results = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*/result.json"))]
    if not results:
        raise SystemExit(f"no results under {RUNS}")
    from fastdiff.metrics import rescore_colour_kl

    for r in results:
        for scores in (r, *r.get("floors", {}).values()):
            rescore_colour_kl(scores)
    out.mkdir(parents=True, exist_ok=True)
    # The held-out clips come from the run's stream seed, so each seed's rows have floors of their own.
    floors_by_seed = {r["seed"]: r.get("floors", {}) for r in results}
    lines = ["# Learning-efficiency study (balls-o, tiny preset, CPU)", "",
             f"Each row: trained online for a fixed budget of process CPU seconds (set-up and autoencoder fit "
             f"included), one thread; evaluated on the same {results[0]['eval']['clips']} held-out clips per seed, "
             f"{results[0]['eval']['samples']} sampled continuations each (5 real frames, 45 generated, "
             f"{results[0]['eval']['sample_steps']} DDIM steps unless the row says otherwise). minADE in pixels "
             "(lower is better), two balls = share of generated frames showing exactly two balls. Colour changes: "
             "how many the ColorKL is estimated from, over every sample (3 per clip for a row, 1 for a floor).", "",
             "| row | settings | seed | budget (CPU s) | steps | CPU s/step | held-out loss | minADE | ColorKL | "
             "colour changes | colour acc. | two balls | forecast px |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for seed, floors in sorted(floors_by_seed.items()):
        for name, f in floors.items():
            lines.append(f"| *{name}* | floor, seed {seed}'s clips | {seed} | – | – | – | – | {_fmt(f['minADE'], 2)} | "
                         f"{_fmt(f['ColorKL'])} | {f.get('colour_changes', '–')} | {_fmt(f['colour_accuracy'])} | "
                         f"{_fmt(f['ball_count_ok'])} | – |")
    for r in results:
        settings = " ".join(r["settings"]) or "study base"
        lines.append(f"| {r['name']} | `{settings}` | {r['seed']} | {r['budget_cpu']:.0f} | "
                     f"{r['steps']} | {r['cpu_per_step']:.3f} | {_fmt(r['loss'], 4)} | {_fmt(r.get('minADE'), 2)} | "
                     f"{_fmt(r.get('ColorKL'))} | {r.get('colour_changes', '–')} | {_fmt(r.get('colour_accuracy'))} | "
                     f"{_fmt(r.get('ball_count_ok'))} | {_fmt(r.get('forecast_error'), 2)} |")
    samplers = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*/samplers.json"))]
    if samplers:
        lines += ["", "## Samplers and step counts (one trained model each)", "",
                  "| model | sampler | steps | settings | seconds | minADE | ColorKL | colour acc. | two balls |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for rows in samplers:
            for s in rows:
                lines.append(f"| {s['model']} | {s['sampler']} | {s['steps']} | `{' '.join(s.get('settings', []))}` | "
                             f"{s['seconds']} | "
                             f"{_fmt(s['minADE'], 2)} | {_fmt(s['ColorKL'])} | {_fmt(s['colour_accuracy'])} | "
                             f"{_fmt(s['ball_count_ok'])} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items() if k not in ("transitions", "loss_per_level")} for r in results]
    (out / "study.json").write_text(json.dumps({"rows": slim, "samplers": samplers}, indent=2))
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--budget", type=float, default=720.0, help="process CPU seconds, set-up included")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("queue")
    q.add_argument("rows", type=Path)
    q.add_argument("--jobs", type=int, default=2)
    t = sub.add_parser("table")
    t.add_argument("--out", type=Path, default=ROOT / "profiles" / "learning")
    s = sub.add_parser("sampler")
    s.add_argument("name")
    s.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    s.add_argument("--sampler", nargs="+", default=["ddim", "heun"])
    s.add_argument("--set", action="append", default=[], metavar="diffusion.KEY=VALUE")
    s.add_argument("--run", type=Path, default=None, help="a run directory (default: runs/learning/NAME)")
    s.add_argument("--clips", type=int, default=EVAL["clips"])
    s.add_argument("--threads", type=int, default=1)
    f = sub.add_parser("forecast")
    f.add_argument("paths", type=Path, nargs="+", help="run directories or checkpoint files")
    f.add_argument("--threads", type=int, default=1)
    h = sub.add_parser("loss")
    h.add_argument("paths", type=Path, nargs="+", help="run directories or checkpoint files")
    h.add_argument("--windows", type=int, default=64, help="held-out windows, spread over the test stream")
    h.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("contacts")
    c.add_argument("paths", type=Path, nargs="+", help="run directories or checkpoint files")
    c.add_argument("--windows", type=int, default=400, help="held-out windows, spread over the test stream")
    c.add_argument("--sampled", type=int, default=0, help="windows of each part (contact, free) to sample once")
    c.add_argument("--set", action="append", default=[], metavar="diffusion.KEY=VALUE")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", type=Path, default=None, help="JSON of the rows")
    c.add_argument("--denoise", type=int, nargs="*", default=[], metavar="LEVEL",
                   help="noise levels to denoise the contact windows' true frames from in one call")
    d = sub.add_parser("colours")
    d.add_argument("paths", type=Path, nargs="+", help="run directories or checkpoint files")
    args = parser.parse_args(argv)
    if args.command == "run":
        run_row(args.name, args.budget, args.seed, args.set, EVAL, args.threads)
    elif args.command == "queue":
        queue(args.rows, args.jobs)
    elif args.command == "table":
        table(args.out)
    elif args.command == "forecast":
        forecast(args.paths, args.threads)
    elif args.command == "loss":
        heldout(args.paths, args.windows, args.threads)
    elif args.command == "colours":
        colour_distances(args.paths)
    elif args.command == "contacts":
        contacts(args.paths, args.windows, args.sampled, args.set, args.threads, args.out, args.denoise)
    else:
        sampler_row(args.name, args.steps, args.sampler, {**EVAL, "clips": args.clips}, args.set, args.run,
                    args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
