"""The soak (scripts/soak.py): memory stays flat over a long online run. The full 100k-frame run is marked
slow (`pytest -m slow`); a 300-frame run checks that the script writes a well-formed CSV, PNG and JSON."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("fastdiff_soak_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_outputs(out: Path):
    with open(out / "soak.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / "soak.json").read_text())


@pytest.mark.usefixtures("one_thread")
def test_short_soak_writes_csv_png_json(tmp_path):
    soak = load_soak()
    out = tmp_path / "soak"
    args = ["--frames", "300", "--every", "50", "--warmup", "100", "--device", "cpu", "--out", str(out), "--quiet",
            "--set", "autoencoder.warmup_frames=64", "autoencoder.fit_steps=3", "run.checkpoint_every=100"]
    assert soak.main(args) == 0
    rows, report = read_outputs(out)
    assert list(rows[0]) == ["frame", "seconds", "rss_MiB", "cuda_alloc_MiB", "cuda_max_alloc_MiB"]
    assert [int(r["frame"]) for r in rows] == list(range(0, 301, 50))
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds)
    assert all(float(r["rss_MiB"]) > 10 for r in rows)
    assert all(r["cuda_alloc_MiB"] == "" for r in rows)  # CPU run: no CUDA column values

    png = (out / "soak.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    assert report["frames"] == 300 and report["steps"] == 300 - 10 + 1
    assert report["machine"].startswith("CPU ") and "-core" in report["machine"]
    assert report["warmup_frames"] == 100 and report["rss_warmup_end_frame"] == 100
    assert report["rss_end_frame"] == 300 and report["rss_end_MiB"] == float(rows[-1]["rss_MiB"])
    assert report["verdict"] in ("flat", "growing")
    assert report["rss_median_after_warmup_MiB"] > 10 and report["median_over_samples"] == 3
    assert isinstance(report["rss_slope_MiB_per_10k_frames"], float)
    for key in ("date", "command", "frames_per_second", "wall_seconds", "overrides", "tolerance_MiB_per_10k_frames"):
        assert key in report, key
    assert report["overrides"]["model.width"] == "32" and report["overrides"]["autoencoder.fit_steps"] == "3"


def test_slope_and_verdict():
    soak = load_soak()
    assert soak.slope_per_10k([0, 10_000, 20_000], [100.0, 101.0, 102.0]) == pytest.approx(1.0)
    rows = [{"frame": f, "rss_MiB": 500.0 + (f >= 1000) * 50 + f * 1e-5, "cuda_alloc_MiB": ""}
            for f in range(0, 100_001, 1000)]
    flat = soak.summarize(rows, warmup=10_000, tolerance=2.0)  # the jump during warm-up does not count
    assert flat["verdict"] == "flat" and flat["rss_slope_MiB_per_10k_frames"] == pytest.approx(0.1)
    leaky = [{**r, "rss_MiB": r["rss_MiB"] + r["frame"] * 5e-4} for r in rows]
    assert soak.summarize(leaky, warmup=10_000, tolerance=2.0)["verdict"] == "growing"
    spiky = [{**r, "rss_MiB": r["rss_MiB"] + 8 * (r["frame"] == 100_000)} for r in rows]  # one sample off at the end
    summary = soak.summarize(spiky, warmup=10_000, tolerance=2.0)
    assert summary["rss_growth_after_warmup_MiB"] > 8 and summary["rss_median_growth_after_warmup_MiB"] < 1


def test_from_csv_rewrites_the_summary(tmp_path):
    soak = load_soak()
    rows = "frame,seconds,rss_MiB,cuda_alloc_MiB,cuda_max_alloc_MiB\n" + "".join(
        f"{f},{f / 100},{500 + f * 1e-4},,\n" for f in range(0, 10_001, 500))
    (tmp_path / "soak.csv").write_text(rows)
    (tmp_path / "soak.json").write_text(json.dumps({"frames": 10_000, "machine": "CPU test"}))
    assert soak.main(["--from-csv", "--out", str(tmp_path), "--warmup", "0.2"]) == 0
    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["machine"] == "CPU test" and report["warmup_frames"] == 2000
    assert report["rss_slope_MiB_per_10k_frames"] == pytest.approx(1.0) and report["verdict"] == "flat"
    assert (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_soak_100k_frames_memory_is_flat(tmp_path):
    """100k frames of balls-o with the soak's small model (about 20-40 minutes on 2 CPU cores): host RSS
    (and CUDA allocated memory on a GPU) grows by no more than 2 MiB per 10k frames after the warm-up."""
    soak = load_soak()
    out = tmp_path / "soak"
    assert soak.main(["--frames", "100000", "--out", str(out), "--quiet"]) == 0
    rows, report = read_outputs(out)
    assert report["frames"] == 100_000 and int(rows[-1]["frame"]) == 100_000
    assert report["skipped_steps"] == 0
    assert report["verdict"] == "flat", report
    assert abs(report["rss_slope_MiB_per_10k_frames"]) <= 2.0
    assert abs(report["rss_median_growth_after_warmup_MiB"]) <= 20.0
