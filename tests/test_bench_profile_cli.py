"""`fastdiff bench`, `fastdiff profile`, `fastdiff tune` and the reference comparison, at smoke sizes on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from fastdiff.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_profile_writes_a_trace_and_a_top_ops_table(tmp_path, capsys):
    out = tmp_path / "profile"
    code = main(["profile", "--steps", "2", "--warmup", "1", "--out", str(out), "--set", "model.width=64",
                 "--set", "model.heads=2", "--set", "model.depth=2", "--set", "autoencoder.fit_steps=2"])
    assert code == 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["traceEvents"]
    rows = json.loads((out / "top_kernels.json").read_text())
    assert rows and 0.0 < sum(r["share"] for r in rows) <= 1.0 + 1e-9 and rows[0]["calls_per_step"] > 0
    assert [r["share"] for r in rows] == sorted((r["share"] for r in rows), reverse=True)
    assert "aten::" in (out / "top_kernels.md").read_text()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert main(["profile", "--steps", "0"]) == 2


def test_bench_runs_a_component_benchmark_and_says_it_is_a_smoke_run(tmp_path, capsys):
    code = main(["bench", "--only", "streams", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    if not torch.cuda.is_available():
        assert "smoke sizes" in printed
    assert (tmp_path / "bench_streams.json").exists()
    assert main(["bench", "--only", "nothing-matches"]) == 2


def test_tune_needs_a_gpu_and_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert main(["tune", "adaln"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_reference_comparison_refuses_a_folder_that_is_not_a_checkout(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_lifelong_vdm.py"), "--repo", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a lifelong-vdm checkout" in done.stderr
