"""Benchmark: an experiment's runs on a CPU one at a time on all the cores, against side by side, one core each
(what `fastdiff experiment --jobs N` does), each run a whole `fastdiff train` process, the arms interleaved.

Arm "one at a time": one run whose threads span the C cores this process may use. Arm "side by side": C runs at
once, each pinned to a core of its own with one thread. A run's training rate is its summary's frames/s (the
trainer's own clock over its training, set-up excluded); an arm's rate is the sum over its runs, which train at the
same time. Also each arm's whole-process wall time per frame trained, set-up included. Reported per arm: median
and range over the repeats, and the side-by-side arm's rate over the other's. The model is `tiny` on balls-o (the
experiment's runs train the same model on balls-c); samples and milestones are off (the final sample: 12 frames).

    python bench/bench_experiment_jobs.py [--frames 600] [--repeats 3] [--device cpu] [--out FILE.json] [--smoke]
    pytest bench/bench_experiment_jobs.py      (CI: one tiny repeat of each arm)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import utils

from fastdiff.experiment import experiment_preset

QUIET_RUN = ("run.final_clips=0", "run.milestone_clips=0", "run.sample_every=0", "run.progress=false",
             "run.minutes=0", "run.log_every=100000", "run.sample_frames=12")
SMOKE_MODEL = ("model.width=32", "model.depth=1", "model.heads=1")


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def start_run(out: Path, name: str, frames: int, threads: int, core: int | None, extra=()) -> subprocess.Popen:
    """One `fastdiff train` process of the experiment's preset; `core` pins it (Linux affinity) before it starts."""
    command = [sys.executable, "-m", "fastdiff", "train", "--frames", str(frames), "--out", str(out), "--name", name,
               "--preset", experiment_preset()]
    for setting in (*QUIET_RUN, f"run.threads={threads}", *extra):
        command += ["--set", setting]
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=pin)


def run_arm(out: Path, arm: str, frames: int, available: list[int], repeat: int, extra=()) -> dict:
    """Start the arm's runs together, wait for all; its rate (summed frames/s) and wall time."""
    if arm == "one at a time":
        plan = [(len(available), None)]
    else:
        plan = [(1, core) for core in available]
    started = time.perf_counter()
    procs = [(f"{arm.replace(' ', '-')}-r{repeat}-{i}", start_run(out, f"{arm.replace(' ', '-')}-r{repeat}-{i}",
                                                                  frames, threads, core, extra))
             for i, (threads, core) in enumerate(plan)]
    for name, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: fastdiff train exited {proc.returncode}: {err[-2000:]}")
    wall = time.perf_counter() - started
    rates = [json.loads((out / name / "summary.json").read_text())["frames_per_second"] for name, _ in procs]
    return {"frames_per_second": sum(rates), "wall_s": wall, "wall_ms_per_frame": wall / (frames * len(procs)) * 1e3,
            "runs": len(procs)}


def run_benchmark(frames: int = 600, repeats: int = 3, out_path=None, *, device: str = "cpu", smoke: bool = False,
                  log=print) -> list[dict]:
    """Both arms `repeats` times, interleaved; rows per arm. On `device` cuda the runs share the GPU (their host
    threads are pinned as on a CPU)."""
    available = cores()
    extra = (f"run.device={device}", *(SMOKE_MODEL if smoke else ()))
    samples: dict[str, list[dict]] = {"one at a time": [], "side by side": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for arm in samples:  # interleaved: a drift of the machine's speed falls on both arms alike
                samples[arm].append(run_arm(Path(tmp), arm, frames, available, repeat, extra))
                log(f"repeat {repeat} {arm:13} {samples[arm][-1]['frames_per_second']:6.2f} frames/s "
                    f"({samples[arm][-1]['wall_s']:.1f} s wall)")
    rows = []
    medians = {arm: statistics.median(s["frames_per_second"] for s in runs) for arm, runs in samples.items()}
    for arm, runs in samples.items():
        rates = [s["frames_per_second"] for s in runs]
        walls = [s["wall_ms_per_frame"] for s in runs]
        rows.append({"bench": "experiment_jobs", "arm": arm, "runs_at_once": runs[0]["runs"],
                     "threads_per_run": len(available) if arm == "one at a time" else 1, "cores": len(available),
                     "frames_per_run": frames, "model": "tiny" + (" (smoke: width 32, depth 1)" if smoke else ""),
                     "frames_per_second": round(medians[arm], 3), "frames_per_second_min": round(min(rates), 3),
                     "frames_per_second_max": round(max(rates), 3),
                     "wall_ms_per_frame": round(statistics.median(walls), 2), "repeats": len(runs),
                     "rate_vs_one_at_a_time": round(medians[arm] / medians["one at a time"], 3),
                     "device": utils.device_name(device), "date": utils.today()})
    for row in rows:
        log(f"{row['arm']:13} {row['frames_per_second']:6.2f} frames/s (range {row['frames_per_second_min']:.2f}-"
            f"{row['frames_per_second_max']:.2f}), {row['wall_ms_per_frame']:.1f} ms wall per frame, "
            f"x{row['rate_vs_one_at_a_time']:.2f}")
    if out_path:
        utils.write_rows(rows, out_path)
    return rows


# ---------------------------------------------------------------------------------------------- pytest


def test_run_benchmark_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    rows = run_benchmark(frames=12, repeats=1, out_path=out, smoke=True, log=lambda *_: None)
    assert json.loads(out.read_text()) == rows
    assert [r["arm"] for r in rows] == ["one at a time", "side by side"]
    assert rows[1]["runs_at_once"] == len(cores()) and rows[0]["threads_per_run"] == len(cores())
    assert all(r["frames_per_second"] > 0 and r["wall_ms_per_frame"] > 0 for r in rows)
    assert rows[0]["rate_vs_one_at_a_time"] == 1.0


def main(argv=None) -> int:
    p = utils.parser(__doc__)
    p.add_argument("--frames", type=int, default=600, help="frames each run trains")
    args = p.parse_args(argv)
    smoke = bool(args.smoke)
    run_benchmark(12 if smoke else args.frames, args.repeats or (1 if smoke else 3), args.out,
                  device=args.device or "cpu", smoke=smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
