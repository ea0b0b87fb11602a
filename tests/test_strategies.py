"""The paper's strategies on CPU: each trains, offline draws i.i.d. windows of the whole stream,
generative distillation replays its teacher, both resume bit-identically; `fastdiff eval` and
`fastdiff experiment paper` end to end at toy sizes."""

import json
import os

import numpy as np
import pytest
import torch
from test_train import TINY, _cfg, _params, _stop_at

from fastdiff.cli import main
from fastdiff.config import ConfigError, build_config
from fastdiff.strategies import StreamBank
from fastdiff.train import OnlineTrainer

QUIET = lambda *_, **__: None  # noqa: E731


@pytest.mark.parametrize("strategy", ["er", "none", "full", "offline", "gen-distill"])
def test_each_strategy_trains(tmp_path, strategy):
    trainer = OnlineTrainer(_cfg(tmp_path, run__frames=24, replay__strategy=strategy, replay__teacher_every=12),
                            tmp_path / "run", log=QUIET)
    before = _params(trainer)
    summary = trainer.train()
    assert summary["steps"] == 24 - 10 + 1 and summary["skipped_steps"] == 0
    assert np.isfinite(summary["last_loss"]) and summary["last_loss"] > 0
    after = _params(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_offline_bank_draws_whole_stream_windows_uniformly():
    frames = torch.arange(1000, dtype=torch.float32)[:, None].expand(1000, 3).contiguous()
    bank = StreamBank(frames, window=10)
    windows = bank.sample(4000, torch.Generator().manual_seed(0))
    starts = windows[:, 0, 0].long()
    assert torch.equal(windows[..., 0], starts[:, None] + torch.arange(10))  # contiguous stream windows
    assert starts.min() >= 0 and starts.max() <= 990
    counts = torch.bincount(starts // 100, minlength=10).float()  # uniform over the stream's deciles
    assert counts.min() > 0.8 * counts.mean()
    with pytest.raises(ValueError, match="shorter than one window"):
        StreamBank(frames[:5], window=10)


def test_offline_trains_on_the_whole_stream_not_the_prefix(tmp_path):
    trainer = OnlineTrainer(_cfg(tmp_path, run__frames=60, replay__strategy="offline"), tmp_path / "run", log=QUIET)
    assert trainer.step.bank.frames.shape[0] == 60  # read to the end before the first step
    batch = trainer.step.batch(trainer.step.ring[None, :10])
    assert batch.shape[0] == 1 + 2


def test_replay_only_steps_draw_every_window_from_the_buffer(tmp_path):
    """replay.live=0: one step per frame as before (the newest window still enters the buffer), but every window
    of the batch is a stored one; before anything is stored, the newest window stands in."""
    trainer = OnlineTrainer(_cfg(tmp_path, run__frames=40, replay__live=0, replay__replayed=2), tmp_path / "run",
                            log=QUIET)
    step = trainer.step
    assert step.live_frames == 10  # the ring holds one window: the one inserted after each step
    while not step.ready:
        trainer.advance()
    first = step.batch(step.live_windows())  # the buffer is still empty
    assert first.shape[0] == 2 and torch.equal(first, step.ring[None].expand(2, *step.ring.shape))
    summary = trainer.train()
    assert summary["steps"] == 40 - 10 + 1 and summary["skipped_steps"] == 0
    stored = step.buffer.windows[step.buffer.starts >= 0]
    batch = step.batch(step.live_windows())
    assert batch.shape[0] == 2
    for window in batch:
        assert any(torch.equal(window, s.float()) for s in stored)
    newest = step.ring
    assert any(torch.equal(newest, s.float()) for s in stored)  # the newest window entered the buffer


@pytest.mark.parametrize("strategy, replayed", [("none", 1), ("offline", 1), ("gen-distill", 1), ("er", 0)])
def test_replay_only_needs_a_buffer_to_draw_from(tmp_path, strategy, replayed):
    with pytest.raises(ConfigError, match="replay.live=0 .* not supported because"):
        _cfg(tmp_path, replay__live=0, replay__replayed=replayed, replay__strategy=strategy)


def test_gen_distill_replays_teacher_windows_and_targets_its_prediction(tmp_path, monkeypatch):
    trainer = OnlineTrainer(_cfg(tmp_path, run__frames=24, replay__strategy="gen-distill", replay__teacher_every=12),
                            tmp_path / "run", log=QUIET)
    trainer.train()
    distill = trainer.step.distill
    assert distill.refreshed_at == 24 and distill.teacher is not None
    assert not any(p.requires_grad for p in distill.teacher.parameters())
    for a, b in zip(distill.teacher.parameters(), trainer.step.ema.parameters()):
        assert torch.equal(a, b)  # refreshed from the EMA at frame 24
    # The replayed part's target is the teacher's output: with a student equal to the teacher and the
    # live part's error removed, the loss is exactly 0; with any other student it is not.
    live = trainer.step.ring[None, :10].clone()
    calls = []
    original = distill.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(distill, "generate", spy)
    gen = torch.Generator().manual_seed(0)
    cfg = trainer.cfg.diffusion
    loss_teacher = distill.loss(distill.teacher, live, 2, trainer.step.schedule, cfg, gen)
    assert calls and calls[0].shape == (2, *live.shape[1:])
    assert not torch.allclose(calls[0][0], live[0])  # generated, not copied
    assert loss_teacher > 0  # the live windows' error remains
    distill.weight = 0.0
    gen = torch.Generator().manual_seed(0)
    live_only = distill.loss(distill.teacher, live, 2, trainer.step.schedule, cfg, gen)
    distill.weight = 1.0
    # same draws: the replayed frames contributed nothing, because student == teacher
    assert float(loss_teacher) == pytest.approx(float(live_only), rel=1e-5)


@pytest.mark.parametrize("strategy", ["offline", "gen-distill"])
def test_strategy_resumes_bit_identically(tmp_path, strategy):
    extra = {"replay__strategy": strategy, "replay__teacher_every": 12, "run__stream_frames": 30}
    straight = OnlineTrainer(_cfg(tmp_path, run__frames=30, **extra), tmp_path / "a", log=QUIET)
    straight.train()
    _stop_at(OnlineTrainer(_cfg(tmp_path, run__frames=30, **extra), tmp_path / "b", log=QUIET), 20)
    resumed = OnlineTrainer(_cfg(tmp_path, run__frames=30, **extra), tmp_path / "b", resume=True, log=QUIET)
    resumed.train()
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_strategy_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="replay.strategy"):
        build_config("tiny", None, {"replay.strategy": "dreaming"})
    with pytest.raises(ConfigError, match="replay.teacher_every"):
        build_config("tiny", None, {"replay.strategy": "gen-distill", "replay.teacher_every": "0"})


def test_eval_cli_with_milestones(tmp_path, capsys):
    cfg = _cfg(tmp_path, run__frames=40, run__milestone_every=20, autoencoder__latent="none", model__patch="4",
               diffusion__sample_steps="3")
    from fastdiff.train import write_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_config(cfg, run_dir)
    OnlineTrainer(cfg, run_dir, log=QUIET).train()
    assert sorted(p.name for p in (run_dir / "milestones").iterdir()) == ["frame0000000020.pt",
                                                                          "frame0000000040.pt"]
    code = main(["eval", str(run_dir), "--clips", "3", "--curve-clips", "2", "--samples", "2", "--length", "15"])
    assert code == 0
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    final = report["final"]
    assert final["clips"] == 3 and len(final["loss_per_level"]) == 10
    assert final["loss"] > 0 and 0 <= final["colour_accuracy"] <= 1 and final["minADE"] > 0
    assert [row["frame"] for row in report["curve"]] == [20, 40]
    assert (run_dir / "eval" / "curve.png").stat().st_size > 0
    assert "minADE" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert main(["eval", str(run_dir), "--observed", "20", "--length", "15"]) == 2


def _toy_experiment_args(out, *extra):
    args = ["experiment", "paper", "--stream", "balls-c", "--frames", "100", "--strategies", "er,none",
            "--out", str(out), "--clips", "2", "--curve-clips", "1", "--samples", "1", "--steps", "2",
            "--curve-points", "2", "--set", "run.threads=1", *extra]
    for key, value in TINY.items():
        if key not in ("run.checkpoint_every", "replay.replayed"):
            args += ["--set", f"{key}={value}"]
    return args


def test_experiment_paper_writes_the_report_and_keeps_finished_runs(tmp_path, capsys):
    out = tmp_path / "exp"
    args = _toy_experiment_args(out)
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for needle in ("| ER (5%) |", "| No replay |", "| *repeat last frame* |", "| *constant velocity* |",
                   "Who forgets", "q1", "Table 6", "along_stream.png", "two-ball frames", "ball speed",
                   "forecast px", "one at a time"):
        assert needle in report
    data = json.loads((out / "report.json").read_text())
    assert [r["summary"]["steps"] for r in data["results"]["er"]] == [91]
    final = data["results"]["er"][0]["final"]  # the one-call forecast, its floors' on the same windows beside it
    assert final["forecast_error"] > 0 and final["floors"]["repeat last frame"]["forecast_error"] > 0
    assert len(data["results"]["none"][0]["curve"]) == 2
    for png in ("along_stream.png", "loss_by_quarter.png"):
        assert (out / png).stat().st_size > 0
    stamp = (out / "er-seed0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # again: nothing retrained, nothing re-evaluated
    assert (out / "er-seed0" / "summary.json").stat().st_mtime_ns == stamp
    assert "finished earlier" in capsys.readouterr().out
    # the report still says what the kept runs cost when they ran, not only this invocation's few seconds
    runs = [r for rs in data["results"].values() for r in rs]
    training = sum(r["summary"]["seconds"] for r in runs) / 60
    evaluation = sum(r["eval_seconds"] for r in runs) / 60
    assert evaluation > 0
    assert f"Time: training {training:.1f} minutes and evaluation {evaluation:.1f} minutes" in (
        out / "report.md").read_text()
    assert main(["experiment", "paper", "--strategies", "er,magic", "--out", str(out)]) == 2
    if len(os.sched_getaffinity(0)) >= 2:
        _check_jobs_match_one_at_a_time(tmp_path, data)


def _check_jobs_match_one_at_a_time(tmp_path, serial):
    """The same experiment with --jobs 2: each run lands under its own strategy, trained and scored as it was in
    one process, its worker on cores of its own."""
    import subprocess
    import sys

    args = _toy_experiment_args(tmp_path / "parallel", "--jobs", "2")
    # a child process, so that the workers' output (their own file descriptors) can be read here
    done = subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, check=True)
    assert "[er-seed0]" in done.stdout and "[none-seed0]" in done.stdout  # the workers' lines say whose they are
    parallel = json.loads((tmp_path / "parallel" / "report.json").read_text())
    assert parallel["jobs"] == 2 and serial["jobs"] == 1
    for strategy in ("er", "none"):
        a, b = serial["results"][strategy][0], parallel["results"][strategy][0]
        assert b["summary"]["steps"] == a["summary"]["steps"] == 91
        assert b["summary"]["last_loss"] == a["summary"]["last_loss"]
        for key in ("loss", "minADE", "ColorKL"):
            assert b["final"][key] == a["final"][key]
        assert [row["loss"] for row in b["curve"]] == [row["loss"] for row in a["curve"]]
    assert serial["results"]["er"][0]["final"]["loss"] != serial["results"]["none"][0]["final"]["loss"]
    cores = [parallel["results"][s][0]["cores"] for s in ("er", "none")]
    assert all(len(c) == len(os.sched_getaffinity(0)) // 2 for c in cores) and not set(cores[0]) & set(cores[1])
    assert "2 at a time" in (tmp_path / "parallel" / "report.md").read_text()


def test_experiment_refuses_bad_jobs(tmp_path, capsys):
    assert main(_toy_experiment_args(tmp_path / "x", "--jobs", "0")) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    more = len(os.sched_getaffinity(0)) + 1  # runs enough for one more worker than there are cores
    seeds = [str(seed) for seed in range(more)]
    assert main(_toy_experiment_args(tmp_path / "x", "--jobs", str(more), "--seeds", *seeds)) == 2
    assert "not supported because" in capsys.readouterr().err
    assert not (tmp_path / "x" / "er-seed0").exists()  # refused before any run started


def test_report_floors_are_each_seeds_own_clips_averaged(tmp_path):
    """Each seed's runs are scored on that seed's held-out clips, the floors with them: the report's floor rows
    are the mean ± sd over the seeds, as the models' rows are, not the first seed's clips."""
    from fastdiff.experiment import write_report

    def final(minade, floor_minade):
        return {"loss": 0.01, "minADE": minade, "loss_per_quarter": {"q1": 0.01},
                "floors": {"repeat last frame": {"minADE": floor_minade}}}

    results = {"er": [{"seed": 0, "summary": {"seconds": 60.0}, "final": final(7.0, 8.0), "curve": []},
                      {"seed": 1, "summary": {"seconds": 60.0}, "final": final(8.0, 10.0), "curve": []}]}
    report = {"stream": "balls-c", "frames": 100, "seeds": [0, 1], "strategies": ["er"], "preset": "tiny",
              "overrides": {}, "eval": {"clips": 2, "levels": 10, "samples": 1, "observed": 5, "length": 50},
              "minutes": 0.0, "results": results}
    text = write_report(tmp_path, report).read_text()
    assert "| ER (5%) | 1.000e-02 ± 0.000e+00 | 7.50 ± 0.71 |" in text
    assert "| *repeat last frame* | – | 9.00 ± 1.41 |" in text
    assert "Time: training 2.0 minutes and evaluation 0.0 minutes, summed over the 2 runs (2 evaluations cached " \
           "without a time), one at a time" in text
