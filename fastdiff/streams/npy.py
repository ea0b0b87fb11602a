"""``npy:DIR``: a stream exported by ``fastdiff streams export`` (DIR/frames.npy, read through mmap).

DIR/meta.json, when present, gives the name, fps and window of the exported stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import FrameStream, StreamError, StreamInfo


class NpyStream(FrameStream):
    def __init__(self, directory, *, batch: int = 256):
        super().__init__()
        d = Path(directory).expanduser()
        path = d / "frames.npy" if d.is_dir() or d.suffix != ".npy" else d
        if not path.exists():
            raise StreamError(f"npy: {path}: no such file (export one with `fastdiff streams export`)")
        try:
            self.frames = np.load(path, mmap_mode="r")
        except Exception as err:
            raise StreamError(f"npy: {path}: not a readable .npy array ({err})") from None
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise StreamError(f"npy: {path}: expected uint8 (N, H, W, 3), got {self.frames.dtype} "
                              f"{self.frames.shape}")
        meta = {}
        if (path.parent / "meta.json").exists():
            meta = json.loads((path.parent / "meta.json").read_text())
        n, h, w, _ = self.frames.shape
        self.meta = meta
        self.info = StreamInfo(f"npy:{path.parent}", h, w, float(meta.get("fps", 10.0)), n,
                               int(meta.get("window", 10)))

    def _next_frame(self) -> np.ndarray:
        if self.position >= len(self.frames):
            raise StopIteration
        return np.array(self.frames[self.position])

    def read(self, n: int) -> np.ndarray:
        out = np.array(self.frames[self.position:self.position + max(0, int(n))])
        self.position += len(out)
        return out

    def state_dict(self) -> dict:
        return {"kind": "npy", "position": self.position, "length": len(self.frames)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "npy":
            raise StreamError(f"npy: state_dict is for {state.get('kind')!r}, not an npy stream")
        self.position = int(state["position"])
