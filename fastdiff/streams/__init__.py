"""Frame streams and their registry.

``make_stream(spec)`` builds any stream from a spec string: ``balls-o``, ``balls-c``, ``maze``,
``video:PATH`` (file, folder or comma-separated list) and ``npy:DIR`` (an exported stream).
Every stream is a FrameStream: an iterator of uint8 (H, W, 3) frames with ``info`` (StreamInfo)
and ``state_dict()`` / ``load_state_dict()`` that resume at the exact frame.
"""

from __future__ import annotations

from .base import FrameStream, StreamError, StreamInfo

STREAMS = {
    "balls-o": "Lifelong Bouncing Balls (O), stationary: 32x32, 2 balls, colour rule red>yellow>red>green",
    "balls-c": "Lifelong Bouncing Balls (C): as balls-o, blue drifts in over total_frames",
    "maze": "3D maze walk (stand-in for the Windows 95 maze screensaver): 64x64, 20 fps, rare events",
    "video:PATH": "video file, folder or comma-separated list via decord (crop, size, fps, on_error)",
    "npy:DIR": "a stream exported with `fastdiff streams export` (DIR/frames.npy, memory-mapped)",
}


def list_streams() -> list[tuple[str, str]]:
    return list(STREAMS.items())


def make_stream(spec: str, *, split: str = "train", seed: int = 0, total_frames: int | None = None,
                **options) -> FrameStream:
    """Build a stream from its spec. ``split`` and ``seed`` choose the simulation for the synthetic
    streams (video and npy streams have no split); ``total_frames`` is the run length (balls-c
    drifts over it). Options: balls (num_balls, resolution, chunk), maze (cells, size, fov, rocks),
    video (crop=(x, y, w, h), size=(h, w), fps, on_error="skip|stop|raise", batch)."""
    spec = str(spec).strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind in ("balls-o", "balls-c"):
        from .balls import BallsStream

        return BallsStream(color_shift=kind == "balls-c", split=split, seed=seed, total_frames=total_frames,
                           **options)
    if kind == "maze":
        from .maze import MazeStream

        return MazeStream(split=split, seed=seed, total_frames=total_frames, **options)
    if kind == "video":
        from .video import video_stream

        return video_stream(arg, **options)
    if kind == "npy":
        from .npy import NpyStream

        if not arg:
            raise StreamError("npy: give a directory, e.g. npy:exports/balls")
        return NpyStream(arg, **options)
    known = ", ".join(name for name, _ in list_streams())
    raise StreamError(f"stream {spec!r} not supported because it is not one of: {known}")


__all__ = ["FrameStream", "StreamError", "StreamInfo", "list_streams", "make_stream"]
