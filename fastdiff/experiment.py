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
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fastdiff.config import STRATEGIES, build_config
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


def run_experiment(out: Path, *, stream: str, frames: int, seeds: list[int], strategies: list[str],
                   preset: str | None, overrides: dict, opts: EvalOptions, curve_points: int = 8,
                   log=print) -> dict:
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if frames < 100:
        raise ValueError(f"--frames {frames}: an experiment needs at least 100 frames")
    opts.check()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, list[dict]] = {s: [] for s in strategies}
    preset = build_config(preset, None, {}).preset  # the one the default resolves to, for the report
    for seed in seeds:
        for strategy in strategies:
            cfg = build_config(preset, None, {**experiment_overrides(stream, frames, strategy, seed, curve_points),
                                              **overrides})
            run_dir = out / f"{strategy}-seed{seed}"
            summary = run_strategy(run_dir, cfg, log=log)
            cached = run_dir / "eval" / "eval.json"
            if cached.exists() and json.loads(cached.read_text())["options"] == asdict(opts):
                report = json.loads(cached.read_text())
            else:
                report = evaluate_run(run_dir, opts, log=log)
            results[strategy].append({"seed": seed, "summary": summary, "final": report["final"],
                                      "curve": report["curve"]})
    report = {"stream": stream, "frames": frames, "seeds": seeds, "strategies": strategies, "preset": preset,
              "overrides": overrides, "eval": asdict(opts), "minutes": (time.perf_counter() - started) / 60,
              "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_report(out, report)
    return report


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
    # the floors and the ceiling, scored on the same clips (the clips depend on the stream, not the run)
    floors = next((r["final"]["floors"] for runs in results.values() for r in runs if r["final"].get("floors")), {})
    for name, scores in floors.items():
        cells = [_cell([scores.get(key)], fmt) for key, _, fmt in metric_cols]
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
    lines += ["", "![loss by quarter](loss_by_quarter.png)", "",
              f"Total time: {report['minutes']:.1f} minutes (training and evaluation)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


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
