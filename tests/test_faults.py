"""Faults the trainer must survive without losing anything: non-finite losses and gradients, a disk
that fills up while a checkpoint is written, checkpoints that are truncated or belong to another model."""

import errno
import json

import pytest
import torch

from fastdiff import checkpoint as ckpt
from fastdiff.config import build_config
from fastdiff.step import NonFiniteLoss
from fastdiff.train import OnlineTrainer

TINY = {
    "model.width": "64", "model.depth": "2", "model.heads": "2",
    "autoencoder.latent": "ae", "model.patch": "1",
    "autoencoder.warmup_frames": "32", "autoencoder.fit_steps": "5", "autoencoder.fit_batch": "8",
    "autoencoder.hidden": "16", "replay.replayed": "1", "replay.windows": "8",
    "run.checkpoint_every": "5", "run.sample_every": "0",
    "run.final_clips": "0", "run.log_every": "1", "run.progress": "false",
    "optim.name": "adamw",
}


def _trainer(tmp_path, name="run", resume=False, **extra):
    overrides = {**TINY, "run.out": str(tmp_path), **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return OnlineTrainer(build_config("tiny", None, overrides), tmp_path / name, resume=resume, log=lambda *_: None)


def _snapshot(trainer):
    weights = {k: v.clone() for k, v in trainer.step.model.state_dict().items()}
    ema = {k: v.clone() for k, v in trainer.step.ema.state_dict().items()}
    opt = trainer.step.optimizer.state_dict()
    flat_opt = [t.clone() for st in opt["state"].values() for t in _tensors(st)]
    return weights, ema, flat_opt


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _same(a, b):
    wa, ea, oa = a
    wb, eb, ob = b
    return (all(torch.equal(wa[k], wb[k]) for k in wa) and all(torch.equal(ea[k], eb[k]) for k in ea)
            and len(oa) == len(ob) and all(torch.equal(x, y) for x, y in zip(oa, ob)))


def _poison_forward(trainer, value, at_call):
    """Make the model's output non-finite on call number `at_call` (counting from 0)."""
    calls = {"n": 0}
    original = trainer.step.train_model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        return out * value if calls["n"] - 1 == at_call else out

    trainer.step.train_model.forward = forward


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit-bnb", "adamw8bit-fused"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step_and_changes_nothing(tmp_path, optimizer, value):
    trainer = _trainer(tmp_path, run__frames=16, optim__name=optimizer)
    while trainer.steps < 3:  # a few honest steps first: the optimizer has state
        trainer.advance()
    before = _snapshot(trainer)
    _poison_forward(trainer, value, at_call=0)
    trainer.advance()
    assert trainer.step.result().skipped and trainer.skipped == 1 and trainer.steps == 3
    assert _same(before, _snapshot(trainer)), "a skipped step changed weights, EMA or optimizer state"
    trainer.advance()  # training goes on
    assert not trainer.step.result().skipped and trainer.steps == 4
    assert not _same(before, _snapshot(trainer))


def test_non_finite_gradient_is_skipped_and_reported(tmp_path):
    trainer = _trainer(tmp_path, run__frames=14)
    first = next(iter(trainer.step.model.parameters()))
    state = {"armed": False}

    def poison(grad):
        return grad * float("inf") if state["armed"] else grad

    first.register_hook(poison)
    original_step = trainer.step.step

    def step_poisoned_once():
        state["armed"] = trainer.frames_seen == 12
        return original_step()

    trainer.step.step = step_poisoned_once
    summary = trainer.train()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 14 - 10 + 1 - 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if r["frame"] >= 12] == [1, 1, 1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] == 1


def test_nan_policy_stop_stops_with_a_loadable_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, run__frames=30, run__nan_policy="stop")
    _poison_forward(trainer, float("nan"), at_call=7)  # frame 17: after the checkpoint at frame 15
    with pytest.raises(NonFiniteLoss, match="nan_policy=stop"):
        trainer.train()
    state, path = ckpt.load_latest(tmp_path / "run" / "checkpoints", log=lambda *_: None)
    assert path.name == "ckpt_0000000015.pt" and state["counters"]["frames_seen"] == 15


def _fail_writes(monkeypatch, after_bytes=64):
    """Every checkpoint write gets `after_bytes` onto the disk, then the disk is full."""
    real = ckpt.atomic_write_bytes

    def full_disk(path, write):
        def partial(f):
            f.write(b"\0" * after_bytes)
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, partial)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_disk)


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, policy):
    trainer = _trainer(tmp_path, run__frames=20, run__disk_full_policy=policy)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    original = trainer.save_checkpoint

    def save_then_fill_disk():
        path = original()
        if trainer.frames_seen == 10:  # the first checkpoint lands; every later one hits a full disk
            _fail_writes(monkeypatch)
        return path

    trainer.save_checkpoint = save_then_fill_disk
    if policy == "stop":
        with pytest.raises(OSError, match="No space left"):
            trainer.train()
    else:
        summary = trainer.train()
        assert summary["frames"] == 20 and trainer.checkpoint_failures == 3  # frames 15, 20 and the final save
    # no temp files left behind: the checkpoint before the first step and the one at frame 10
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["ckpt_0000000000.pt", "ckpt_0000000010.pt"]
    state, _ = ckpt.load_latest(ckpt_dir, log=lambda *_: None)
    assert state["counters"]["frames_seen"] == 10


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _trainer(tmp_path, run__frames=20).train()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    newest = sorted(ckpt_dir.glob("ckpt_*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    messages = []
    resumed = OnlineTrainer(build_config("tiny", None, {**TINY, "run.frames": "25"}), tmp_path / "run",
                            resume=True, log=messages.append)
    assert resumed.frames_seen == 15
    assert any(newest.name in m for m in messages), messages
    for p in ckpt_dir.glob("ckpt_*.pt"):
        p.write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError):
        _trainer(tmp_path, resume=True, run__frames=25)


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    _trainer(tmp_path, run__frames=12).train()
    with pytest.raises(ckpt.CheckpointError, match="different model shape"):
        _trainer(tmp_path, resume=True, run__frames=20, model__depth=3)
