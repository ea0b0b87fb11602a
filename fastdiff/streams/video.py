"""Video files through decord: one file, a folder (files in sorted order) or a list, read in order.

Frames are decoded ``batch`` at a time with ``VideoReader.get_batch`` (never a whole file in
memory), optionally resampled in time (``fps``: output frame k of a file is source frame
round(k * src_fps / fps)), cropped (``crop=(x, y, w, h)``) and resized (``size=(h, w)``, bicubic
with antialiasing, like ffmpeg's scale). decord always hands back RGB24, whatever the source's
pixel format (grayscale and alpha sources included).

Bad input: a missing path, a file decord cannot open (not a video, or truncated before its index)
or a video without frames raises StreamError at construction, before any training work. A frame
that fails to decode mid-stream (decord raises DECORDError) is handled by ``on_error``:
``skip`` (warn, naming the file and frame index, and go on), ``stop`` (warn and end the stream
cleanly) or ``raise`` (StreamError naming the file and frame index).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .base import FrameStream, StreamError, StreamInfo

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts"}
POLICIES = ("skip", "stop", "raise")


def resolve_paths(source) -> list[Path]:
    """A file, a folder (its video files, sorted by name), a comma-separated string or a list."""
    if isinstance(source, (list, tuple)):
        items = [str(s) for s in source]
    else:
        items = [s for s in str(source).split(",") if s.strip()] if "," in str(source) else [str(source)]
    paths: list[Path] = []
    for item in items:
        p = Path(item.strip()).expanduser()
        if not p.exists():
            raise StreamError(f"video: {p}: no such file or folder")
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                kinds = ", ".join(sorted(VIDEO_SUFFIXES))
                raise StreamError(f"video: {p}: folder holds no video files ({kinds})")
            paths.extend(found)
        else:
            paths.append(p)
    if not paths:
        raise StreamError(f"video: {source!r}: no video files given")
    return paths


def _open(path: Path):
    import decord

    if path.stat().st_size == 0:
        raise StreamError(f"video: {path}: empty file (0 bytes), not a video")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0))
    except Exception as err:  # decord raises RuntimeError / DECORDError on anything it cannot parse
        raise StreamError(f"video: {path}: cannot be opened as a video (not a video, or truncated/corrupt "
                          f"container): {str(err).splitlines()[0][:200]}") from None


def _parse_crop(crop):
    if crop is None:
        return None
    if isinstance(crop, str):
        crop = [int(v) for v in crop.replace("x", ",").split(",")]
    if len(crop) != 4 or min(crop[2], crop[3]) <= 0 or min(crop[0], crop[1]) < 0:
        raise StreamError(f"video: crop={crop!r} not supported because it must be (x, y, w, h) with w, h > 0")
    return tuple(int(v) for v in crop)


def _parse_size(size):
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    if isinstance(size, str):
        size = [int(v) for v in size.replace("x", ",").split(",")]
    if len(size) != 2 or min(size) <= 0:
        raise StreamError(f"video: size={size!r} not supported because it must be (h, w) with h, w > 0")
    return int(size[0]), int(size[1])


class VideoStream(FrameStream):
    """``video:PATH``. Options: crop=(x, y, w, h), size=(h, w), fps=float, on_error=skip|stop|raise,
    batch=frames decoded per call."""

    def __init__(self, source, *, crop=None, size=None, fps: float | None = None, on_error: str = "skip",
                 batch: int = 32, window: int = 20):
        super().__init__()
        if on_error not in POLICIES:
            raise StreamError(f"video: on_error={on_error!r} not supported because it must be one of "
                              f"{POLICIES}")
        if fps is not None and float(fps) <= 0:
            raise StreamError(f"video: fps={fps} not supported because it must be > 0")
        self.paths = resolve_paths(source)
        self.crop, self.size = _parse_crop(crop), _parse_size(size)
        self.fps = float(fps) if fps else None
        self.on_error, self.batch = on_error, max(1, int(batch))
        self.files = []  # per file: (frames, source fps, source (h, w))
        for p in self.paths:
            vr = _open(p)
            n = len(vr)
            if n == 0:
                raise StreamError(f"video: {p}: holds no frames")
            (h, w), vr = self._shape_of(vr, p, n)
            src_fps = float(vr.get_avg_fps() or 0) or 30.0
            if self.crop and (self.crop[0] + self.crop[2] > w or self.crop[1] + self.crop[3] > h):
                raise StreamError(f"video: {p}: crop {self.crop} does not fit in its {w}x{h} frames")
            self.files.append((n, src_fps, (h, w)))
            if len(self.files) == 1:
                first_reader = vr  # reading starts here: don't pay for opening the file twice
        h, w = self.files[0][2]
        if self.crop:
            h, w = self.crop[3], self.crop[2]
        if self.size:
            h, w = self.size
        elif any(f[2] != self.files[0][2] for f in self.files):
            sizes = {}
            for p, f in zip(self.paths, self.files):
                sizes.setdefault(f"{f[2][1]}x{f[2][0]}", []).append(p.name)
            found = "; ".join(f"{wh}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                              for wh, names in sizes.items())
            raise StreamError(f"video: the files have different frame sizes (width x height: {found}); give "
                              "size=(h, w) to bring them to one size (make_stream option; from the command line, "
                              "`fastdiff streams export video:PATH --option size=[h,w] --out DIR` and train on "
                              "npy:DIR)")
        out_fps = self.fps or self.files[0][1]
        length = sum(len(self._indices(i)) for i in range(len(self.files)))
        listed = isinstance(source, (list, tuple))
        name = "video:" + (",".join(map(str, source)) if listed else str(source))
        self.info = StreamInfo(name, h, w, out_fps, length, window)
        self.file_index, self.frame_index = 0, 0  # next output frame: index into _indices(file)
        self.errors: list[str] = []  # messages about undecodable frames
        self._reader = first_reader
        self._keys = np.zeros(0, np.int64)  # output index (within its file) of each buffered frame
        self._frames = None  # buffered decoded frames, (len(_keys), H, W, 3)
        self._offset = 0  # next buffered frame to hand out
        self._stopped = False

    @staticmethod
    def _shape_of(vr, path, count):
        """Frame size from the first decodable frame among the first 16, and the reader that decoded it."""
        err = None
        for i in range(min(count, 16)):
            try:
                return tuple(vr.get_batch([i]).shape[1:3]), vr
            except Exception as e:  # DECORDError: damaged frame; try the next with a fresh reader
                err, vr = e, _open(path)
        if "DECORDArrayCopyFromTo" in str(err):  # decord's frame copy fails at some widths: the file is fine
            raise StreamError(f"video: {path}: decord cannot decode frames of this width (a decord bug at some "
                              "widths, e.g. 8, 16, 24, 48 or 72 pixels); re-encode the video wider, e.g. "
                              "`ffmpeg -i IN -vf scale=64:-2 OUT`") from None
        raise StreamError(f"video: {path}: none of its first frames can be decoded: "
                          f"{str(err).splitlines()[-1][:200]}") from None

    def _indices(self, file: int) -> np.ndarray:
        """Source frame indices that make up the output of one file (after fps resampling); cached, since
        every batch asks and a long file has millions of frames."""
        cached = getattr(self, "_index_cache", None)
        if cached is not None and cached[0] == file:
            return cached[1]
        self._index_cache = (file, self._compute_indices(file))
        return self._index_cache[1]

    def _compute_indices(self, file: int) -> np.ndarray:
        n, src_fps, _ = self.files[file]
        if not self.fps or abs(self.fps - src_fps) < 1e-6:
            return np.arange(n)
        count = int(np.floor((n - 1) * self.fps / src_fps + 1e-9)) + 1
        idx = np.floor(np.arange(count) * (src_fps / self.fps) + 0.5).astype(np.int64)
        return idx[idx < n]

    # ---- decoding
    def _transform(self, frames: np.ndarray) -> np.ndarray:
        if self.crop:
            x, y, w, h = self.crop
            frames = frames[:, y:y + h, x:x + w]
        if self.size and frames.shape[1:3] != self.size:
            from PIL import Image

            h, w = self.size
            frames = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize(
                (w, h), Image.BICUBIC)) for f in frames])
        return np.ascontiguousarray(frames, dtype=np.uint8)

    def _bad_frame(self, path, index, err) -> bool:
        """Apply the policy to one undecodable frame; True to go on with the next frame."""
        msg = f"video: {path}: frame {index} cannot be decoded ({str(err).splitlines()[-1][:160]})"
        self.errors.append(msg)
        if self.on_error == "raise":
            raise StreamError(msg) from None
        warnings.warn(msg + ("; skipped" if self.on_error == "skip" else "; stream stopped here"),
                      RuntimeWarning, stacklevel=3)
        return self.on_error == "skip"

    def _decode(self, file: int, start: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """Output indices (from ``start``) and frames for these source indices, and whether the
        policy stopped the stream."""
        path = self.paths[file]
        if self._reader is None:
            self._reader = _open(path)
        try:
            frames = self._transform(self._reader.get_batch(indices.tolist()).asnumpy())
            return np.arange(start, start + len(frames)), frames, False
        except Exception:  # locate the bad frame(s) one by one with fresh readers
            self._reader = None
        keys, out, stopped = [], [], False
        for k, i in enumerate(indices.tolist(), start):
            try:
                if self._reader is None:
                    self._reader = _open(path)
                out.append(self._transform(self._reader.get_batch([i]).asnumpy())[0])
                keys.append(k)
            except StreamError:
                raise
            except Exception as err:
                self._reader = None  # a reader that failed once keeps failing: reopen
                if not self._bad_frame(path, i, err):
                    stopped = True
                    break
        h, w = self.info.height, self.info.width
        frames = np.stack(out) if out else np.zeros((0, h, w, 3), np.uint8)
        return np.array(keys, np.int64), frames, stopped

    def _buffered(self) -> int:
        return len(self._keys) - self._offset

    def _refill(self) -> bool:
        """Decode the next batch into the buffer; False at the end of the stream."""
        while self._buffered() == 0:
            if self._stopped or self.file_index >= len(self.files):
                return False
            indices = self._indices(self.file_index)
            if self.frame_index >= len(indices):
                self.file_index, self.frame_index, self._reader = self.file_index + 1, 0, None
                continue
            chunk = indices[self.frame_index:self.frame_index + self.batch]
            self._keys, self._frames, stopped = self._decode(self.file_index, self.frame_index, chunk)
            self._offset = 0
            self.frame_index += len(chunk)
            self._stopped = stopped
        return True

    def _next_frame(self) -> np.ndarray:
        if not self._refill():
            raise StopIteration
        self._offset += 1
        return self._frames[self._offset - 1]

    def read(self, n: int) -> np.ndarray:
        parts, left = [], int(n)
        while left > 0 and self._refill():
            take = min(left, self._buffered())
            parts.append(self._frames[self._offset:self._offset + take])
            self._offset += take
            self.position += take
            left -= take
        if not parts:
            return np.zeros((0, self.info.height, self.info.width, 3), np.uint8)
        # A single part is a view of the decoded batch, not a copy: batches are replaced on refill, never
        # written in place, so the view stays valid and unchanged.
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ---- state: which output frame of which file comes next
    def state_dict(self) -> dict:
        """Resume point: file index and output-frame index within that file (after resampling)."""
        frame = int(self._keys[self._offset]) if self._buffered() else self.frame_index
        return {"kind": "video", "paths": [str(p) for p in self.paths], "file": self.file_index,
                "frame": frame, "position": self.position, "stopped": self._stopped and not self._buffered()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "video":
            raise StreamError(f"video: state_dict is for {state.get('kind')!r}, not a video stream")
        if state["paths"] != [str(p) for p in self.paths]:
            raise StreamError("video: state_dict was saved for other files: " + ", ".join(state["paths"][:3]))
        self.file_index, self.frame_index = int(state["file"]), int(state["frame"])
        self.position, self._stopped = int(state["position"]), bool(state["stopped"])
        self._keys, self._frames, self._offset, self._reader = np.zeros(0, np.int64), None, 0, None

    def close(self) -> None:
        self._reader = None


def video_stream(path: str, **options) -> VideoStream:
    if not path:
        raise StreamError("video: give a path, e.g. video:clip.mp4, video:folder/ or video:a.mp4,b.mp4")
    return VideoStream(os.path.expanduser(path), **options)
