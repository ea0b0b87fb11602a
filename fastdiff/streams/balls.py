"""Lifelong Bouncing Balls (Yoo et al. 2024), the paper's generator rebuilt for speed.

Faithful to plai-group/continual-diffusion ``datasets/ball.py`` (itself Sutskever's RTRBM bouncing
balls): a box of side SIZE = 10, ``n`` balls of radius 1.2 and mass 1, initial velocities
``randn(n, 2)`` scaled so the norm over all balls together is 0.5, initial positions uniform in
[2, 10) redrawn until no ball overlaps a wall or another ball. Each frame records the positions
and then runs two Euler substeps of eps = 0.5: move, reflect off walls (v = +|v| or -|v|), then
elastic 1-D momentum exchange along the line of centres for every overlapping pair.

Rendering: ball i at box coordinates (x, y) adds ``exp(-(((I - x)^2 + (J - y)^2) / r^2)^4)``
times its colour, where I (columns) and J (rows) are pixel centres ``(k + 0.5) / res * SIZE``;
the sum is clipped to 1 on a black background and stored as uint8 ``rint(255 * value)``.

Colour: every ball starts red. Frame t shows the current colour; if the ball's frame-start
velocity at t differs from the one at t - 1, its colour then advances by the second-order rule
(previous, current) -> next (red -> yellow -> red -> green -> red -> ...), so the new colour is
seen from frame t + 1 on. Variant C (``colour_shift``) adds t / total_frames to the blue channel
of every ball's colour.

Seeds: like the original script, one ``RandomState(seed)`` draws the train simulation's initial
state and then the test simulation's, so ``split="test"`` is an independent simulation from the
same seed (with the original's defaults, seed 0 reproduces the published 2balls1m streams up to
floating-point summation order). After the initial draw the simulation is deterministic.

Speed: physics runs as plain Python floats (a few microseconds per frame); frames are rendered
``chunk`` at a time with NumPy broadcasting in float32.
"""

from __future__ import annotations

import math

import numpy as np

from .base import FrameStream, StreamError, StreamInfo

SIZE = 10.0
RADIUS = 1.2
MASS = 1.0
EPS = 0.5
RED, YELLOW, GREEN = 0, 1, 2
COLOR_NAMES = ("red", "yellow", "green")
COLOR_RGB = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
NONE = -1
# (previous colour, current colour) -> next colour; the paper's second-order rule.
COLOR_TRANSITION = {
    (NONE, RED): YELLOW,
    (RED, YELLOW): RED,
    (YELLOW, RED): GREEN,
    (RED, GREEN): RED,
    (GREEN, RED): YELLOW,
    (NONE, GREEN): RED,
    (NONE, YELLOW): RED,
}


def initial_state(rng: np.random.RandomState, n: int, radius: float = RADIUS) -> tuple[list, list]:
    """Draw velocities then rejection-sample positions, in the original script's order."""
    v = rng.randn(n, 2)
    v = v / math.sqrt(float((v**2).sum())) * 0.5
    while True:
        x = 2 + rng.rand(n, 2) * 8
        ok = bool(np.all(x - radius >= 0) and np.all(x + radius <= SIZE))
        for i in range(n):
            for j in range(i):
                if math.sqrt(float(((x[i] - x[j]) ** 2).sum())) < 2 * radius:
                    ok = False
        if ok:
            return x.tolist(), v.tolist()


class BallsSim:
    """The physics and colour state, advanced one frame at a time (plain floats, exact resume)."""

    def __init__(self, x: list, v: list, radius: float = RADIUS, mass: float = MASS):
        self.n = len(x)
        self.x = [list(map(float, p)) for p in x]
        self.v = [list(map(float, p)) for p in v]
        self.r = float(radius)
        self.m = float(mass)
        self.t = 0
        self.cur = [RED] * self.n
        self.prev = [NONE] * self.n
        self.v_last: list | None = None  # frame-start velocities of frame t - 1

    def state(self) -> dict:
        return {
            "x": [p[:] for p in self.x], "v": [p[:] for p in self.v], "t": self.t,
            "cur": self.cur[:], "prev": self.prev[:],
            "v_last": None if self.v_last is None else [p[:] for p in self.v_last],
            "r": self.r, "m": self.m,
        }

    @classmethod
    def from_state(cls, s: dict) -> BallsSim:
        sim = cls(s["x"], s["v"], s["r"], s["m"])
        sim.t = int(s["t"])
        sim.cur = list(s["cur"])
        sim.prev = list(s["prev"])
        sim.v_last = None if s["v_last"] is None else [list(p) for p in s["v_last"]]
        return sim

    def run(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Advance ``count`` frames. Returns positions (count, n, 2) in box units, the colour index
        shown in each frame (count, n) and each frame's frame-start velocities (count, n, 2)."""
        n, r, m, size = self.n, self.r, self.m, SIZE
        x, v = self.x, self.v
        cur, prev = self.cur, self.prev
        v_last = self.v_last
        pos = np.empty((count, n, 2))
        vel = np.empty((count, n, 2))
        col = np.empty((count, n), np.int8)
        two_r = 2 * r
        transition = COLOR_TRANSITION
        for k in range(count):
            for i in range(n):
                xi, vi = x[i], v[i]
                pos[k, i, 0] = xi[0]
                pos[k, i, 1] = xi[1]
                vel[k, i, 0] = vi[0]
                vel[k, i, 1] = vi[1]
                col[k, i] = cur[i]
                if v_last is not None:
                    lv = v_last[i]
                    if lv[0] != vi[0] or lv[1] != vi[1]:
                        nxt = transition[(prev[i], cur[i])]
                        prev[i] = cur[i]
                        cur[i] = nxt
            v_last = [vi[:] for vi in v]
            for _ in range(2):  # int(1 / EPS) substeps
                for i in range(n):
                    xi, vi = x[i], v[i]
                    xi[0] += EPS * vi[0]
                    xi[1] += EPS * vi[1]
                for i in range(n):
                    xi, vi = x[i], v[i]
                    for z in (0, 1):
                        if xi[z] - r < 0:
                            vi[z] = abs(vi[z])
                        if xi[z] + r > size:
                            vi[z] = -abs(vi[z])
                for i in range(n):
                    for j in range(i):
                        xi, xj = x[i], x[j]
                        dx = xi[0] - xj[0]
                        dy = xi[1] - xj[1]
                        dist = math.sqrt(dx * dx + dy * dy)
                        if dist < two_r:
                            wx, wy = dx / dist, dy / dist
                            vi, vj = v[i], v[j]
                            v_i = wx * vi[0] + wy * vi[1]
                            v_j = wx * vj[0] + wy * vj[1]
                            new_v_j = (2 * m * v_i + v_j * (m - m)) / (m + m)
                            new_v_i = new_v_j + (v_j - v_i)
                            di, dj = new_v_i - v_i, new_v_j - v_j
                            vi[0] += wx * di
                            vi[1] += wy * di
                            vj[0] += wx * dj
                            vj[1] += wy * dj
        self.v_last = v_last
        self.t += count
        return pos, col, vel


def pixel_centres(res: int) -> np.ndarray:
    """Box coordinate of each pixel centre along one axis (the original's ``ar(0, 1, 1/res)*SIZE``)."""
    return (np.arange(res, dtype=np.float64) + 0.5) / res * SIZE


def render_dense(pos: np.ndarray, colors: np.ndarray, res: int = 32, radius: float = RADIUS) -> np.ndarray:
    """The original's rendering, every ball over every pixel in float64 (slow; the reference)."""
    grid = pixel_centres(res)
    dx2 = (grid[None, None, :] - pos[:, :, 0, None]) ** 2  # (N, n, cols)
    dy2 = (grid[None, None, :] - pos[:, :, 1, None]) ** 2  # (N, n, rows)
    bump = np.exp(-(((dy2[:, :, :, None] + dx2[:, :, None, :]) / radius**2) ** 4))
    img = np.einsum("tnyx,tnc->tyxc", bump, colors)
    return np.rint(np.minimum(img, 1.0) * 255).astype(np.uint8)


PATCH = 12  # pixels per side around a ball that can round to a non-zero uint8 (needs 10, 12 is safe)


def render(pos: np.ndarray, colors: np.ndarray, res: int = 32, radius: float = RADIUS,
           batch: int = 256) -> np.ndarray:
    """uint8 frames (N, res, res, 3) from box positions (N, n, 2) and float RGB colours (N, n, 3).

    Same values as ``render_dense``: a bump falls below 0.5/255 beyond 1.26 radii (4.8 px), so each
    ball is evaluated only on a PATCH x PATCH window around its centre and the windows are summed
    into the frames with a weighted ``np.bincount`` per channel (overlapping balls add up, then
    clip, exactly as in the original). Works ``batch`` frames at a time to stay in cache.
    """
    if len(pos) > batch:
        return np.concatenate([render(pos[k:k + batch], colors[k:k + batch], res, radius, batch)
                               for k in range(0, len(pos), batch)])
    count = pos.shape[0]
    scale = res / SIZE
    start = np.floor(pos * scale - 0.5).astype(np.intp) - (PATCH // 2 - 1)  # first col / row
    idx = start[..., None] + np.arange(PATCH)  # (N, n, 2, PATCH) pixel indices along x and y
    d2 = ((idx + 0.5) * (1.0 / scale) - pos[..., None]) ** 2 * (1.0 / (radius * radius))
    inside = (idx >= 0) & (idx < res)
    q = d2[:, :, 1, :, None] + d2[:, :, 0, None, :]  # (N, n, rows, cols)
    np.square(q, out=q)
    np.square(q, out=q)
    np.negative(q, out=q)
    np.exp(q, out=q)
    q *= inside[:, :, 1, :, None] & inside[:, :, 0, None, :]  # window pixels off the frame add 0
    np.clip(idx, 0, res - 1, out=idx)
    rows = idx[:, :, 1, :, None] + (np.arange(count) * res)[:, None, None, None]
    flat = (rows * res + idx[:, :, 0, None, :]).ravel()
    out = np.empty((count, res, res, 3), np.uint8)
    c255 = colors * 255.0
    for ch in range(3):
        acc = np.bincount(flat, (q * c255[:, :, ch, None, None]).ravel(), minlength=count * res * res)
        np.minimum(acc, 255.0, out=acc)
        acc += 0.5  # rint for non-negative values
        out[..., ch] = acc.reshape(count, res, res)
    return out


class BallsStream(FrameStream):
    """``balls-o`` (stationary) and ``balls-c`` (blue drifts in over ``total_frames``)."""

    def __init__(
        self,
        *,
        color_shift: bool = False,
        split: str = "train",
        seed: int = 0,
        total_frames: int | None = None,
        num_balls: int = 2,
        resolution: int = 32,
        chunk: int = 1000,
    ):
        super().__init__()
        if split not in ("train", "test"):
            raise StreamError(f"balls: split {split!r} not supported because only 'train' and 'test' exist")
        if num_balls < 1:
            raise StreamError(f"balls: num_balls={num_balls} not supported because it must be >= 1")
        self.color_shift = bool(color_shift)
        self.total_frames = int(total_frames) if total_frames else 1_000_000
        self.resolution = int(resolution)
        self.chunk = int(chunk)
        self.seed = int(seed)
        self.split = split
        name = "balls-c" if color_shift else "balls-o"
        self.info = StreamInfo(name, self.resolution, self.resolution, 10.0, None, 10)
        rng = np.random.RandomState(self.seed)
        x, v = initial_state(rng, num_balls)
        if split == "test":  # the original script draws the test simulation right after train's
            x, v = initial_state(rng, num_balls)
        self._sim = BallsSim(x, v)
        self._reset_chunk()

    # chunk buffer: frames [chunk_start, chunk_start + len) rendered ahead of time
    def _reset_chunk(self) -> None:
        self._chunk_state = self._sim.state()
        self._frames = np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
        self._pos = np.zeros((0, self._sim.n, 2), np.float32)
        self._col = np.zeros((0, self._sim.n), np.int8)
        self._offset = 0

    def _colors_rgb(self, col: np.ndarray, t0: int) -> np.ndarray:
        rgb = COLOR_RGB[col]  # (N, n, 3)
        if self.color_shift:
            t = np.arange(t0, t0 + len(col), dtype=np.float64) / self.total_frames
            rgb[:, :, 2] += t[:, None]
        return rgb

    def _fill(self) -> None:
        self._chunk_state = self._sim.state()
        t0 = self._sim.t
        pos, col, _ = self._sim.run(self.chunk)
        self._frames = render(pos, self._colors_rgb(col, t0), self.resolution, self._sim.r)
        self._pos = (pos * (self.resolution / SIZE) - 0.5).astype(np.float32)
        self._col = col
        self._offset = 0

    def _next_frame(self) -> np.ndarray:
        if self._offset >= len(self._frames):
            self._fill()
        frame = self._frames[self._offset]
        self._offset += 1
        return frame

    def read(self, n: int) -> np.ndarray:
        return self.read_with_truth(n)[0]

    def read_with_truth(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n frames (n, H, W, 3) uint8, ball centres (n, balls, 2) float32 in pixel coordinates
        (x = column, y = row; pixel k's centre is k) and colour indices (n, balls) int8
        (0 red, 1 yellow, 2 green)."""
        frames, pos, col = [], [], []
        left = n
        while left > 0:
            if self._offset >= len(self._frames):
                self._fill()
            take = min(left, len(self._frames) - self._offset)
            sl = slice(self._offset, self._offset + take)
            frames.append(self._frames[sl])
            pos.append(self._pos[sl])
            col.append(self._col[sl])
            self._offset += take
            self.position += take
            left -= take
        if not frames:
            return (np.zeros((0, self.resolution, self.resolution, 3), np.uint8),
                    np.zeros((0, self._sim.n, 2), np.float32), np.zeros((0, self._sim.n), np.int8))
        return np.concatenate(frames), np.concatenate(pos), np.concatenate(col)

    def truth(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions (balls, 2), colours (balls,)) of the frame returned last."""
        if self.position == 0:
            raise StreamError("balls: truth() needs a frame to have been returned first")
        return self._pos[self._offset - 1].copy(), self._col[self._offset - 1].copy()

    def state_dict(self) -> dict:
        return {
            "kind": "balls", "name": self.info.name, "position": self.position,
            "chunk_state": self._chunk_state, "offset": self._offset,
            "chunk_len": len(self._frames), "total_frames": self.total_frames,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "balls" or state.get("name") != self.info.name:
            raise StreamError(f"{self.info.name}: state_dict is for {state.get('name')!r}, not this stream")
        self.total_frames = int(state["total_frames"])
        self._sim = BallsSim.from_state(state["chunk_state"])
        self._reset_chunk()
        if state["chunk_len"]:
            self._fill()  # re-simulate the chunk the saved stream was in
        self._offset = int(state["offset"])
        self.position = int(state["position"])
