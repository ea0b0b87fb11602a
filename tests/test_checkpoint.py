import os

import pytest
import torch

from fastdiff import checkpoint as ckpt


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "state.pt"
    ckpt.atomic_torch_save({"v": 1}, path)

    def failing_writer(f):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ckpt.atomic_write_bytes(path, failing_writer)
    assert torch.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temp files left behind


def test_keeps_newest_and_skips_corrupt(tmp_path, capsys):
    for frame in (100, 200, 300):
        ckpt.save_checkpoint({"frame": frame}, tmp_path, frame, keep=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["ckpt_0000000200.pt", "ckpt_0000000300.pt"]
    newest = ckpt.list_checkpoints(tmp_path)[-1]
    with open(newest, "r+b") as f:  # truncate the newest on disk
        f.truncate(os.path.getsize(newest) // 2)
    messages = []
    state, path = ckpt.load_latest(tmp_path, log=messages.append)
    assert state["frame"] == 200 and path.name == "ckpt_0000000200.pt"
    assert "unreadable" in messages[0]


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_latest(tmp_path)
