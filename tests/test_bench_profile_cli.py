"""`fastdiff bench`, `fastdiff profile` and `fastdiff tune`, at smoke sizes on CPU (the reference comparison,
bench/compare_lifelong_vdm.py, has its own tests/test_compare_lifelong_vdm.py)."""

import json
import subprocess

import torch

from fastdiff.cli import main
from fastdiff.commands import bench


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
    assert (tmp_path / "bench_streams.json").exists() and (tmp_path / "bench_streams.csv").exists()
    assert main(["bench", "--only", "nothing-matches"]) == 2


def test_bench_passes_every_benchmark_the_same_flags(tmp_path, monkeypatch, capsys):
    """No per-benchmark special cases: each script gets --device, --out <folder>/bench_<name>.json, --smoke
    without a GPU, and --repeats when given."""
    calls = []

    def record(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", record)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--out", str(tmp_path), "--repeats", "3"]) == 0
    assert [c[1].rsplit("/", 1)[-1] for c in calls] == [f"bench_{name}.py" for name in bench.BENCHES]
    for cmd, name in zip(calls, bench.BENCHES):
        assert cmd[2:] == ["--device", "cpu", "--out", str(tmp_path / f"bench_{name}.json"), "--smoke",
                           "--repeats", "3"]


def test_tune_needs_a_gpu_and_says_so(capsys):
    if torch.cuda.is_available():
        return
    assert main(["tune", "adaln"]) == 1
    assert "no CUDA device" in capsys.readouterr().err
