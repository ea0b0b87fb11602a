"""The paper's experiment (Yoo et al. 2024): strategies at equal steps, batch and seeds, then evaluated.

    out/<strategy>-seed<s>/   one run directory each (resumable: finished runs are kept, stopped ones resume)
    out/report.md             the table in the paper's form, forgetting by test-stream quarter, plots
    out/report.json           every number behind it
    out/along_stream.png      loss / ColorKL / minADE along the stream, one line per strategy
    out/loss_by_quarter.png   held-out loss on each quarter of the test stream, per strategy

Balls runs train in pixel space, as the paper did: a frame autoencoder fitted on the first frames of
balls-c cannot represent the colours the stream drifts to, which would hide exactly what is measured.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fastdiff.config import CPU_PRESET, STRATEGIES, build_config, default_preset
from fastdiff.evaluate import EvalOptions, evaluate_run, plot_curves
from fastdiff.metrics import rescore_colour_kl

STRATEGY_NAMES = {"offline": "Offline (i.i.d.)", "er": "ER (5%)", "none": "No replay", "full": "Full replay",
                  "gen-distill": "Generative distillation"}
# The paper's Balls (C) test-stream numbers (Table 6): FVD, loss, minADE, ColorKL.
PAPER_BALLS_C = {"offline": (5.9, 6.5e-5, 2.14, 0.007), "none": (343.6, 2.3e-2, 2.73, 0.022),
                 "er": (5.7, 7.5e-5, 2.06, 0.005), "full": (5.6, 7.9e-5, 2.12, 0.006)}
TABLE_METRICS = (("FVD", "FVD", "{:.1f}"), ("loss", "loss", "{:.3e}"), ("minADE", "minADE (px)", "{:.2f}"),
                 ("ColorKL", "ColorKL", "{:.3f}"), ("colour_accuracy", "colour acc.", "{:.3f}"),
                 ("ball_count_ok", "two-ball frames", "{:.1%}"), ("ball_speed", "ball speed px/frame", "{:.2f}"),
                 ("forecast_error", "forecast px", "{:.2f}"))


def experiment_overrides(stream: str, frames: int, strategy: str, seed: int, curve_points: int) -> dict:
    overrides = {
        "run.stream": stream, "run.frames": frames, "run.stream_frames": frames, "run.seed": seed,
        "replay.strategy": strategy, "replay.live": 1, "replay.replayed": 1,  # the paper's balls batch: 1 + 1
        "run.milestone_every": max(frames // curve_points, 1), "run.checkpoint_every": max(frames // 4, 1),
        "run.sample_every": 0, "run.keep_checkpoints": 2,
        "run.minutes": 0,  # every strategy trains on all the frames, whatever the machine's pace
    }
    if stream.startswith("balls"):
        overrides.update({"autoencoder.latent": "none", "model.patch": 4})
    return overrides


def run_name(strategy: str, seed: int) -> str:
    """The directory of one run under the experiment's folder."""
    return f"{strategy}-seed{seed}"


def run_strategy(run_dir: Path, cfg, log=print) -> dict:
    """Train one run to completion (or pick up where it stopped) and return its summary."""
    from fastdiff.train import OnlineTrainer, write_config

    summary = run_dir / "summary.json"
    if summary.exists():
        log(f"{run_dir.name}: finished earlier, kept")
        return json.loads(summary.read_text())
    resume = (run_dir / "config.json").exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_config(cfg, run_dir)
    log(f"{run_dir.name}: {'resuming' if resume else 'training'} ({cfg.run.frames} frames, strategy "
        f"{cfg.replay.strategy}, seed {cfg.run.seed})")
    return OnlineTrainer(cfg, run_dir, resume=resume, log=log).train()


def train_and_evaluate(run_dir: Path, cfg, opts: EvalOptions, log=print) -> dict:
    """One run of the experiment: trained (or kept, or resumed) and evaluated (or its evaluation with the same
    options read back)."""
    summary = run_strategy(run_dir, cfg, log=log)
    cached = run_dir / "eval" / "eval.json"
    report = json.loads(cached.read_text()) if cached.exists() else None
    if report is None or report["options"] != asdict(opts):
        report = evaluate_run(run_dir, opts, log=log)
    # evaluations cached by older versions carry no time
    return {"summary": summary, "final": report["final"], "curve": report["curve"],
            "eval_seconds": report.get("seconds")}


def core_groups(jobs: int) -> list[list[int]]:
    """The cores this process may run on, split into `jobs` groups of consecutive cores, one per worker: each
    worker's threads then run on cores of their own instead of spin-waiting on each other's."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning; each worker takes its share by thread count
        cores = list(range(os.cpu_count() or 1))
    if jobs > len(cores):
        raise ValueError(f"--jobs {jobs}: not supported because this process may run on {len(cores)} cores, and "
                         "runs sharing a core only slow each other down")
    return [group.tolist() for group in np.array_split(np.array(cores), jobs)]


def _claim_cores(groups) -> None:
    """Worker initializer: take one group of cores off the queue and run on those only, one thread per core."""
    import torch

    from fastdiff.build import cpu_threads

    cores = groups.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    threads = cpu_threads(0)  # the cores just claimed, unless OMP_NUM_THREADS says otherwise
    if threads is not None:
        torch.set_num_threads(threads)


def _worker(run_dir: str, preset: str, overrides: dict, opts: dict) -> dict:
    """train_and_evaluate in a worker process; its log lines carry the run's name, as runs interleave."""
    name = Path(run_dir).name

    def log(message):
        print(f"[{name}] {message}", flush=True)

    cfg = build_config(preset, None, overrides)
    result = train_and_evaluate(Path(run_dir), cfg, EvalOptions(**opts), log=log)
    return result | {"cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []}


def experiment_preset() -> str:
    """The preset an experiment trains when none is named: the machine's default, except that on a CPU it is
    `tiny` (pixels), not the default job's tiny-latent: balls-c's forgetting shows in the colours, which the
    latent draws worse (ColorKL about 0.5 against 0.02 at 4,500 frames, profiles/learning/README.md)."""
    preset = default_preset()
    return "tiny" if preset == CPU_PRESET else preset


def run_experiment(out: Path, *, stream: str, frames: int, seeds: list[int], strategies: list[str],
                   preset: str | None, overrides: dict, opts: EvalOptions, curve_points: int = 8,
                   jobs: int = 1, log=print) -> dict:
    """Train and evaluate every (seed, strategy) run and write the report. `jobs` > 1 runs that many at once, each
    in its own process on its own share of the cores (a run with run.threads set keeps it); on a GPU they share
    the device. A run trains and scores the same whichever process it runs in, given the same threads."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if frames < 100:
        raise ValueError(f"--frames {frames}: an experiment needs at least 100 frames")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    opts.check()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    preset = preset or experiment_preset()
    runs = {(seed, strategy): {**experiment_overrides(stream, frames, strategy, seed, curve_points), **overrides}
            for seed in seeds for strategy in strategies}
    configs = {key: build_config(preset, None, run_overrides)  # a bad setting is refused before any run starts
               for key, run_overrides in runs.items()}
    jobs = min(jobs, len(runs))
    done: dict[tuple[int, str], dict] = {}
    if jobs == 1:
        for (seed, strategy), cfg in configs.items():
            done[seed, strategy] = train_and_evaluate(out / run_name(strategy, seed), cfg, opts, log=log)
    else:
        done = _run_in_workers(out, runs, preset, opts, jobs, log)
    results: dict[str, list[dict]] = {s: [] for s in strategies}
    for (seed, strategy), result in done.items():
        results[strategy].append({"seed": seed, **result})
    for strategy in strategies:
        results[strategy].sort(key=lambda r: seeds.index(r["seed"]))
    report = {"stream": stream, "frames": frames, "seeds": seeds, "strategies": strategies, "preset": preset,
              "overrides": overrides, "eval": asdict(opts), "jobs": jobs,
              "minutes": (time.perf_counter() - started) / 60, "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_report(out, report)
    return report


def _run_in_workers(out: Path, runs: dict, preset: str, opts: EvalOptions, jobs: int, log) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    groups = context.Queue()
    for group in core_groups(jobs):
        groups.put(group)
    log(f"{len(runs)} runs, {jobs} at a time, each on its own cores")
    progress = {"run.progress": "false"}  # progress bars of runs side by side would overwrite each other
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_claim_cores, initargs=(groups,)) as pool:
        futures = {(seed, strategy): pool.submit(_worker, str(out / run_name(strategy, seed)), preset,
                                                 {**progress, **run_overrides}, asdict(opts))
                   for (seed, strategy), run_overrides in runs.items()}
        try:
            return {key: future.result() for key, future in futures.items()}
        except BaseException:
            pool.shutdown(cancel_futures=True)  # runs not started stay unstarted; stopped ones resume next time
            raise


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _cell(values: list[float], fmt: str) -> str:
    mean, sd = _mean_sd(values)
    if math.isnan(mean):
        return "–"
    return fmt.format(mean) + ("" if math.isnan(sd) else " ± " + fmt.format(sd))


def _mean_curve(runs: list[dict]) -> list[dict]:
    """The milestones' numbers averaged over seeds, frame by frame."""
    by_frame: dict[int, list[dict]] = {}
    for run in runs:
        for row in run["curve"]:
            by_frame.setdefault(row["frame"], []).append(row)
    curve = []
    for frame in sorted(by_frame):
        rows = by_frame[frame]
        keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float))}
        curve.append({k: _mean_sd([r.get(k) for r in rows])[0] for k in keys} | {"frame": frame})
    return curve


def write_report(out: Path, report: dict) -> Path:
    """OUT/report.md and the plots from a report (run_experiment's, or a stored report.json: ColorKL is recomputed
    from the stored transition counts, so an old report reads by the current definition)."""
    results, strategies = report["results"], report["strategies"]
    for runs in results.values():
        for r in runs:
            for scores in (r["final"], *r["final"].get("floors", {}).values(), *r["curve"]):
                rescore_colour_kl(scores)
    metric_cols = [m for m in TABLE_METRICS if any(m[0] in r["final"] for runs in results.values() for r in runs)]
    seeds = report["seeds"]
    lines = [
        f"# The paper's experiment on {report['stream']}: {report['frames']:,} frames, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
        "",
        f"One gradient step per frame, batch 1 live + 1 other window, preset `{report['preset']}`"
        + (f", overrides `{report['overrides']}`" if report["overrides"] else "") + ". "
        f"Evaluated on {report['eval']['clips']} held-out clips spread over the whole test stream: loss at "
        f"{report['eval']['levels']} fixed noise levels; {report['eval']['samples']} continuations of "
        f"{report['eval']['observed']} real frames to {report['eval']['length']} for minADE, ColorKL and colour "
        "accuracy. Values are mean ± sd over seeds.",
        "",
        "| strategy | " + " | ".join(label for _, label, _ in metric_cols) + " | frames/s |",
        "|---|" + "---|" * (len(metric_cols) + 1),
    ]
    for strategy in strategies:
        runs = results[strategy]
        cells = [_cell([r["final"].get(key) for r in runs], fmt) for key, _, fmt in metric_cols]
        fps = _cell([r["summary"].get("frames_per_second") for r in runs], "{:.1f}")
        lines.append(f"| {STRATEGY_NAMES[strategy]} | " + " | ".join(cells) + f" | {fps} |")
    # The floors and the ceiling, scored on the same clips as the models. Each seed's stream, and so its held-out
    # clips, is its own, shared by that seed's strategies: the floors are the mean ± sd over the seeds' clips, as
    # the models' rows are over their seeds.
    floors_by_seed: dict[int, dict] = {}
    for runs in results.values():
        for r in runs:
            if r["final"].get("floors"):
                floors_by_seed.setdefault(r["seed"], r["final"]["floors"])
    for name in dict.fromkeys(name for floors in floors_by_seed.values() for name in floors):
        scores = [floors[name] for floors in floors_by_seed.values() if name in floors]
        cells = [_cell([s.get(key) for s in scores], fmt) for key, _, fmt in metric_cols]
        lines.append(f"| *{name}* | " + " | ".join(cells) + " | |")
    quarters = sorted({q for runs in results.values() for r in runs for q in r["final"]["loss_per_quarter"]})
    lines += [
        "",
        "## Who forgets: held-out loss by quarter of the test stream",
        "",
        "The test stream drifts like the training stream (balls-c: blue rises over the stream), so a model "
        "that forgot the early stream is worse on the early quarters.",
        "",
        "| strategy | " + " | ".join(quarters) + " |",
        "|---|" + "---|" * len(quarters),
    ]
    for strategy in strategies:
        runs = results[strategy]
        cells = [_cell([r["final"]["loss_per_quarter"].get(q) for r in runs], "{:.3e}") for q in quarters]
        lines.append(f"| {STRATEGY_NAMES[strategy]} | " + " | ".join(cells) + " |")
    if report["stream"] == "balls-c":
        lines += ["", "## The paper's Balls (C) test-stream numbers (Table 6; 1M frames, 74M-parameter U-Net)", "",
                  "| strategy | FVD | loss | minADE | ColorKL |", "|---|---|---|---|---|"]
        for strategy, (fvd, loss, ade, kl) in PAPER_BALLS_C.items():
            lines.append(f"| {STRATEGY_NAMES[strategy]} | {fvd} | {loss:.1e} | {ade} | {kl} |")
    curves = {STRATEGY_NAMES[s]: _mean_curve(results[s]) for s in strategies}
    if any(curves.values()):
        plot_curves(curves, out / "along_stream.png", title=f"{report['stream']}: evaluated along the stream")
        lines += ["", "## Along the stream", "", "![along the stream](along_stream.png)"]
    _plot_quarters(out / "loss_by_quarter.png", results, strategies, quarters)
    lines += ["", "![loss by quarter](loss_by_quarter.png)", "", time_line(report)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def time_line(report: dict) -> str:
    """Where the experiment's time went. Runs and evaluations finished by an earlier invocation are kept, so this
    invocation's wall time alone says nothing of what the results cost: the runs' own times are summed too."""
    runs = [r for strategy_runs in report["results"].values() for r in strategy_runs]
    training = sum(r["summary"].get("seconds", 0.0) for r in runs) / 60
    evaluations = [r.get("eval_seconds") for r in runs]
    evaluation = sum(s for s in evaluations if s is not None) / 60
    unrecorded = sum(s is None for s in evaluations)
    line = (f"Time: training {training:.1f} minutes and evaluation {evaluation:.1f} minutes, summed over the "
            f"{len(runs)} runs")
    if unrecorded:
        line += f" ({unrecorded} evaluation{'s' if unrecorded > 1 else ''} cached without a time)"
    jobs = report.get("jobs", 1)
    return line + (f", {jobs} at a time" if jobs > 1 else ", one at a time") + (
        f"; this invocation's wall time {report['minutes']:.1f} minutes (finished runs and evaluations are kept).")


def _plot_quarters(path: Path, results: dict, strategies: list[str], quarters: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    width = 0.8 / max(len(strategies), 1)
    for i, strategy in enumerate(strategies):
        values = [_mean_sd([r["final"]["loss_per_quarter"].get(q) for r in results[strategy]])[0] for q in quarters]
        ax.bar(np.arange(len(quarters)) + i * width, values, width, label=STRATEGY_NAMES[strategy])
    ax.set_xticks(np.arange(len(quarters)) + width * (len(strategies) - 1) / 2, quarters)
    ax.set_xlabel("quarter of the test stream")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
