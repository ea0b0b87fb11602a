"""The one interface every stream implements: an iterator of uint8 (H, W, 3) frames, in order,
with metadata and an exact resume point."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class StreamError(RuntimeError):
    """A stream cannot be opened or read (missing file, not a video, empty, undecodable frame)."""


@dataclass(frozen=True)
class StreamInfo:
    name: str
    height: int
    width: int
    fps: float
    length: int | None  # None when unknown or endless
    window: int = 10  # the natural window K for this stream (balls 10, maze 20)


class FrameStream:
    """Base class. Subclasses implement _next_frame() and the state methods.

    ``position`` counts frames already returned. ``state_dict()`` taken after frame p has been
    returned makes a fresh stream, after ``load_state_dict``, return frame p+1 next: a resumed run
    sees exactly the frames it would have seen.
    """

    info: StreamInfo

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        frame = self._next_frame()  # raises StopIteration at the end
        self.position += 1
        return frame

    def _next_frame(self) -> np.ndarray:
        raise NotImplementedError

    def read(self, n: int) -> np.ndarray:
        """Up to n frames as (n, H, W, 3) uint8; fewer at the end of the stream."""
        frames = []
        for _ in range(n):
            try:
                frames.append(next(self))
            except StopIteration:
                break
        if not frames:
            return np.zeros((0, self.info.height, self.info.width, 3), np.uint8)
        return np.stack(frames)

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
