"""Atomic checkpoints: temp file in the same directory, fsync, rename, fsync the directory.

A kill at any moment leaves either the old checkpoint or the new one, never a torn file. Loading
walks checkpoints newest first and skips (and reports) any that fail to load.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path

import torch

CKPT_PATTERN = re.compile(r"^ckpt_(\d{10})\.pt$")


# Seconds to wait between the fsync of a temp file and its rename: only the kill tests set it.
_PAUSE_BEFORE_RENAME = float(os.environ.get("FASTDIFF_TEST_CHECKPOINT_PAUSE", "0") or 0)


class CheckpointError(RuntimeError):
    pass


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(fileobj) into a temp file next to `path`, then atomically move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if _PAUSE_BEFORE_RENAME:  # test hook: hold the write window open so a kill can land inside it
            time.sleep(_PAUSE_BEFORE_RENAME)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_torch_save(obj, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def checkpoint_path(directory: Path, frame: int) -> Path:
    return Path(directory) / f"ckpt_{frame:010d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, directory: Path, frame: int, keep: int) -> Path:
    path = checkpoint_path(directory, frame)
    atomic_torch_save(state, path)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def remove_interrupted_writes(directory: Path) -> int:
    """Delete the temp files of checkpoint writes a kill cut short (their rename never happened, so nothing refers
    to them). Only the run's own trainer may call this, before it writes again: a temp file can also be a write
    in progress."""
    stale = list(Path(directory).glob(".ckpt_*.tmp")) if Path(directory).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def load_latest(directory: Path, map_location="cpu", log=print) -> tuple[dict, Path]:
    """The newest checkpoint that loads; corrupt ones are reported and skipped."""
    candidates = list_checkpoints(directory)
    if not candidates:
        raise CheckpointError(f"no checkpoint found in {directory}")
    for path in reversed(candidates):
        try:
            return torch.load(path, map_location=map_location, weights_only=False), path
        except Exception as err:  # truncated or corrupt file: fall back to the previous one
            log(f"checkpoint {path.name} is unreadable ({type(err).__name__}: {err}); trying an older one")
    raise CheckpointError(f"every checkpoint in {directory} is unreadable")
