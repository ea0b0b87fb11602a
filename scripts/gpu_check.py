"""The one prepared GPU verification run (scripts/gpu_check.sh is its entry point): what a lent H100/H200 must
show, in priority order, so that a run cut off early still leaves the most important results.

    1 environment      GPU, driver, torch / triton versions, compute capability, the wheels installed
    2 correctness      pytest -m gpu -x (every GPU test but the preset budgets), correctness before speed
    3 attention        fused temporal attention at 70,000 and 300,000 sequences against SDPA and xformers
    4 train_step       the end-to-end step table: eager fp32, compiled, compiled + CUDA graph (frames/s, memory)
    5 presets          each consumer preset under torch.cuda.set_per_process_memory_fraction of its budget
    6 checkpoint_move  a run trained on the GPU resumed on the CPU and one from the CPU resumed on the GPU; the
                       GPU-written checkpoint is kept as a fixture (cuda_checkpoint.pt)

Every stage runs in its own process under its own time limit (a hang costs that stage, not the rest), writes
OUT/<stage>.json as soon as it ends and adds its line to OUT/summary.md. The device returns at most 8 files, so
the stages' logs live inside their JSON. `--dry-run` runs the same plumbing on a CPU in about a minute (tests
collected, not run; benchmarks at smoke sizes; the checkpoint move CPU to CPU): CI runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (stage, seconds it may take on the GPU); the total stays under 8 minutes with start-up
STAGES = (("environment", 20), ("correctness", 150), ("attention", 60), ("train_step", 120), ("presets", 60),
          ("checkpoint_move", 45))
TAIL = 6000  # characters of a stage's output kept in its JSON


def run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1),
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code = 124
        out = ((err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or ""))
        out += f"\n[timed out after {timeout:.0f} s]"
    return {"command": " ".join(cmd), "returncode": code, "seconds": round(time.monotonic() - started, 1),
            "output_tail": out[-TAIL:]}


def environment(dry: bool, limit: float, work: Path) -> dict:
    probe = ("import json, torch, triton, platform; c = torch.cuda.is_available(); "
             "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
             "'triton': triton.__version__, 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if c "
             "else None, 'capability': list(torch.cuda.get_device_capability()) if c else None, "
             "'memory_GiB': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None}))")
    result = run([sys.executable, "-c", probe], limit)
    info = {}
    if result["returncode"] == 0:
        info = json.loads(result["output_tail"].strip().splitlines()[-1])
    smi = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], 10) \
        if not dry else {"returncode": None, "output_tail": "dry run"}
    packages = run([sys.executable, "-c", "import importlib.metadata as m, json; print(json.dumps({p: "
                    "(m.version(p) if any(d.metadata['Name'].lower() == p for d in m.distributions()) else None) "
                    "for p in ('bitsandbytes', 'xformers', 'decord')}))"], limit)
    return {"ok": result["returncode"] == 0, "seconds": result["seconds"], **info,
            "nvidia_smi": smi["output_tail"].strip(),
            "packages": json.loads(packages["output_tail"].strip().splitlines()[-1]) if packages["returncode"] == 0
            else packages["output_tail"], "host": platform.node(), "probe": result}


def correctness(dry: bool, limit: float, work: Path) -> dict:
    base = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests",
            "--deselect", "tests/test_memory.py::test_gpu_preset_holds_its_budget"]
    cmd = base + (["--collect-only"] if dry else ["-x", "-ra", f"--timeout={int(limit)}"])
    result = run(cmd, limit)
    return {"ok": result["returncode"] == 0, **result}


def _bench(script: str, args: list[str], dry: bool, limit: float, work: Path) -> dict:
    rows_path = work / f"{script}.json"
    cmd = [sys.executable, f"bench/{script}.py", "--out", str(rows_path)] + (["--smoke", "--device", "cpu"] if dry
                                                                            else args)
    result = run(cmd, limit)
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    return {"ok": result["returncode"] == 0 and bool(rows), "rows": rows, **result}


def attention(dry: bool, limit: float, work: Path) -> dict:
    return _bench("bench_temporal_attention", ["--sequences", "70000", "300000", "--frames", "16", "--head-dim",
                                               "64"], dry, limit, work)


def train_step(dry: bool, limit: float, work: Path) -> dict:
    return _bench("bench_train_step", ["--repeats", "100"], dry, limit, work)


def presets(dry: bool, limit: float, work: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-ra",
           "tests/test_memory.py::test_gpu_preset_holds_its_budget"] + (["--collect-only"] if dry else [])
    result = run(cmd, limit)
    return {"ok": result["returncode"] == 0, **result}


MOVE = r"""
import json, shutil, sys, torch
from pathlib import Path
from fastdiff.config import build_config
from fastdiff.train import OnlineTrainer
from fastdiff import checkpoint as ckpt
work, out, gpu = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
small = {"model.width": "64", "model.depth": "2", "model.heads": "2", "autoencoder.fit_steps": "5",
         "autoencoder.latent": "ae", "model.patch": "1", "autoencoder.warmup_frames": "32", "replay.windows": "8",
         "run.sample_every": "0", "run.final_clips": "0", "run.progress": "false",
         "run.checkpoint_every": "10", "optim.name": "adamw8bit-fused", "run.sample_frames": "6",
         "diffusion.sample_steps": "4"}
cfg = lambda device, frames: build_config("tiny", None, {**small, "run.device": device, "run.frames": str(frames)})
report = {}
for a, b in ((gpu, "cpu"), ("cpu", gpu)):
    run = work / f"{a}-to-{b}"
    OnlineTrainer(cfg(a, 20), run, log=lambda *_: None).train()
    if a != "cpu":
        shutil.copy(ckpt.list_checkpoints(run / "checkpoints")[-1], out / "cuda_checkpoint.pt")
    lines = []
    resumed = OnlineTrainer(cfg(b, 30), run, resume=True, log=lines.append)
    summary = resumed.train()
    report[f"{a}->{b}"] = {"frames": summary["frames"], "finite": summary["last_loss"] == summary["last_loss"],
                           "notice": [l for l in lines if "written on" in l]}
print(json.dumps(report))
"""


def checkpoint_move(dry: bool, limit: float, work: Path, out: Path) -> dict:
    result = run([sys.executable, "-c", MOVE, str(work), str(out), "cpu" if dry else "cuda"], limit)
    report = {}
    if result["returncode"] == 0:
        report = json.loads(result["output_tail"].strip().splitlines()[-1])
    ok = result["returncode"] == 0 and all(r["frames"] == 30 and r["finite"] for r in report.values())
    return {"ok": ok, "moves": report, **result}


def summary_line(stage: str, result: dict) -> str:
    status = "ok" if result.get("ok") else ("TIMEOUT" if result.get("returncode") == 124 else "FAILED")
    detail = ""
    if stage == "environment":
        detail = f"{result.get('gpu')} torch {result.get('torch')} triton {result.get('triton')} " \
                 f"packages {result.get('packages')}"
    elif "rows" in result:
        detail = f"{len(result['rows'])} rows"
    elif stage == "checkpoint_move":
        detail = json.dumps(result.get("moves"))
    else:
        tail = result.get("output_tail", "").strip().splitlines()
        detail = tail[-1] if tail else ""
    return f"| {stage} | {status} | {result.get('seconds', 0)} | {detail[:300]} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the stages' JSON and summary.md")
    parser.add_argument("--dry-run", action="store_true", help="check the script's plumbing on a CPU")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all stages together")
    parser.add_argument("--only", nargs="+", help="run these stages only")
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summary = out / "summary.md"
    summary.write_text(f"# GPU check {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
                       f"{' (dry run on a CPU: plumbing only, no GPU number)' if args.dry_run else ''}\n\n"
                       "| stage | status | seconds | detail |\n|---|---|---|---|\n")
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for stage, seconds in STAGES:
            if args.only and stage not in args.only:
                continue
            left = args.budget - (time.monotonic() - started)
            if left < 10:
                result = {"ok": False, "skipped": f"no time left ({left:.0f} s)"}
            else:
                limit = min(seconds + 30, left)
                work = Path(tmp) / stage
                work.mkdir()
                fn = globals()[stage]
                result = fn(args.dry_run, limit, work, out) if stage == "checkpoint_move" else \
                    fn(args.dry_run, limit, work)
            result = {"stage": stage, "dry_run": args.dry_run, "date": datetime.date.today().isoformat(), **result}
            (out / f"{stage}.json").write_text(json.dumps(result, indent=2))
            with summary.open("a") as f:
                f.write(summary_line(stage, result) + "\n")
            failures += not result.get("ok")
            print(summary_line(stage, result), flush=True)
    print(f"\n{out}/summary.md: {failures} stage(s) not ok in {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
