"""Writers for frame arrays (uint8 (N, H, W, 3)): GIF, MP4 and a PNG grid. Pillow and imageio only.

``scale`` enlarges frames by an integer factor with nearest-neighbour sampling, so that 32x32
frames stay crisp when a person looks at them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _check(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("frames: nothing to write (0 frames)")
    return frames


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor along H and W."""
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale={scale}: must be a positive integer")
    if scale == 1:
        return frames
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def auto_scale(height: int, target: int = 128) -> int:
    """The integer factor that brings a frame of this height to about ``target`` pixels."""
    return max(1, int(round(target / max(height, 1))))


def _prepare_dir(path) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        os.makedirs(path.parent, exist_ok=True)
    return path


def save_gif(frames, path, fps: float = 10.0, scale: int = 1) -> Path:
    """Animated GIF, looping forever."""
    from PIL import Image

    frames = upscale(_check(frames), scale)
    path = _prepare_dir(path)
    images = [Image.fromarray(f) for f in frames]
    duration = max(int(round(1000.0 / fps)), 20)  # ms per frame; browsers clamp below 20 ms
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0,
                   optimize=False)
    return path


def save_mp4(frames, path, fps: float = 10.0, scale: int = 1) -> Path:
    """H.264 MP4 through imageio-ffmpeg (sides padded to even sizes as yuv420p needs)."""
    import imageio_ffmpeg

    frames = upscale(_check(frames), scale)
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = h + h % 2, w + w % 2
    path = _prepare_dir(path)
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=float(fps), codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1,
                                         output_params=["-crf", "18"])
    writer.send(None)
    try:
        for f in frames:
            writer.send(np.ascontiguousarray(f))
    finally:
        writer.close()
    return path


def frame_grid(frames, max_cols: int = 10, gap: int = 1) -> np.ndarray:
    """Frames laid out left to right, top to bottom, ``max_cols`` per row, on a dark grey background."""
    frames = _check(frames)
    n, h, w, _ = frames.shape
    cols = max(1, min(int(max_cols), n))
    rows = (n + cols - 1) // cols
    grid = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 40, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = f
    return grid


def save_png_strip(frames, path, scale: int = 1, max_cols: int = 10) -> Path:
    """A PNG of the frames in rows of ``max_cols`` (each frame enlarged ``scale`` times)."""
    from PIL import Image

    grid = frame_grid(upscale(_check(frames), scale), max_cols=max_cols, gap=max(1, int(scale)))
    path = _prepare_dir(path)
    Image.fromarray(grid).save(path)
    return path
