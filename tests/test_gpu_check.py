"""scripts/gpu_check.sh, the prepared GPU run, in its dry-run mode: every stage's plumbing runs on a CPU and
leaves its JSON and its summary line, so the few minutes of a lent GPU are not spent finding a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("environment", "correctness", "attention", "train_step", "presets", "checkpoint_move")


def test_dry_run_writes_every_stage(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in STAGES:
        result = json.loads((tmp_path / f"{stage}.json").read_text())
        assert result["ok"] and result["dry_run"], (stage, result.get("output_tail", "")[-2000:])
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {stage} | ok |" in summary for stage in STAGES), summary
    assert json.loads((tmp_path / "attention.json").read_text())["rows"]  # the benchmark really ran
    moves = json.loads((tmp_path / "checkpoint_move.json").read_text())["moves"]
    assert set(moves) == {"cpu->cpu"} or len(moves) == 2
    assert len(list(tmp_path.iterdir())) <= 8  # the device returns at most 8 files


def test_a_stage_that_cannot_run_is_reported_not_ok(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    assert gpu_check.main([str(tmp_path), "--dry-run", "--only", "environment", "--budget", "5"]) == 1
    result = json.loads((tmp_path / "environment.json").read_text())
    assert not result["ok"] and "no time left" in result["skipped"]
    assert "| environment | FAILED |" in (tmp_path / "summary.md").read_text()
