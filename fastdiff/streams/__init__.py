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


def parse_stream_options(text: str) -> dict:
    """`run.stream_options` ("on_error=skip;size=64x64;crop=0,0,320,240;fps=10") as make_stream's keywords: numbers
    become numbers, "AxB" a (height, width) pair, comma lists tuples of numbers; anything else stays a string."""
    options = {}
    for item in filter(None, (part.strip() for part in (text or "").split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StreamError(f"stream option {item!r}: expected key=value, e.g. on_error=skip")
        options[key.strip()] = _option_value(value.strip())
    return options


def _option_value(text: str):
    def number(t):
        try:
            return int(t)
        except ValueError:
            return float(t)

    try:
        if "x" in text.lower() and all(p.strip().isdigit() for p in text.lower().split("x")):
            return tuple(int(p) for p in text.lower().split("x"))
        if "," in text:
            return tuple(number(p.strip()) for p in text.split(","))
        return number(text)
    except ValueError:
        return text


def make_stream(spec: str, *, split: str = "train", seed: int = 0, total_frames: int | None = None,
                **options) -> FrameStream:
    """Build a stream from its spec. ``split`` and ``seed`` choose the simulation for the synthetic
    streams (video and npy streams have no split); ``total_frames`` is the run length (balls-c
    drifts over it). Options: balls (num_balls, resolution, chunk), maze (cells, size, fov, rocks),
    video (crop=(x, y, w, h), size=(h, w), fps, on_error="skip|stop|raise", batch)."""
    spec = str(spec).strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    try:
        return _build(kind, arg, spec, split, seed, total_frames, options)
    except TypeError as err:  # an option this stream does not take: say which, not a traceback
        if "unexpected keyword argument" not in str(err):
            raise
        bad = str(err).split("argument")[-1].strip(" '")
        raise StreamError(f"{kind}: option {bad!r} not supported because this stream does not take it (see "
                          "`fastdiff streams list` and the stream options in the README)") from None


def _build(kind, arg, spec, split, seed, total_frames, options) -> FrameStream:
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


__all__ = ["FrameStream", "StreamError", "StreamInfo", "list_streams", "make_stream", "parse_stream_options"]
