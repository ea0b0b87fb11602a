"""3D maze: a stand-in for the Windows 95 "3D Maze" screensaver recordings used by the paper.

A first-person walk through random mazes, ray-cast (DDA, one ray per column, vectorised with
NumPy) at 64x64 and 20 fps: red brick walls, a grey stone floor and a light tiled ceiling. The
walker follows the right-hand wall from cell centre to cell centre with smooth turns. Rare events,
as in the screensaver:

- grey spinning polyhedra ("rocks"): touching one rolls the camera upside down (and the walker
  then follows the other wall) until the next rock or the end of the maze;
- a yellow smiley marks the exit: reaching it makes the walls sink into the floor, a new maze is
  generated and its walls rise.

Counters ``mazes_completed`` and ``flips`` and the per-frame ``events`` (names of the events that
happened on the frame just returned) expose them. Walls are zero-thickness panels on the lines
between cells, like the screensaver's. Everything is a function of the serialisable ``state``,
so a resumed stream renders exactly the frames the original would have.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from .base import FrameStream, StreamError, StreamInfo

TEX = 64  # texels per wall / floor tile side (power of two)
LEVELS = 16  # pre-shaded brightness levels of each texture
EYE = 0.5  # camera height; walls span z in [0, 1]
MOVE_FRAMES = 10  # frames per cell walked
TURN_FRAMES = 8  # frames per 90 degree turn
ROLL_FRAMES = 14  # frames for the upside-down flip
FALL_FRAMES = 24  # frames for the walls to sink (and again to rise)
DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # E, S, W, N with y growing southwards


# ---------------------------------------------------------------- textures (procedural, fixed)
def _brick_texture(rng: np.random.Generator) -> np.ndarray:
    """Small red clay bricks with light mortar: 8 courses, 4 bricks each, alternate courses offset."""
    tex = np.empty((TEX, TEX, 3), np.float64)
    course = TEX // 8
    brick_w = TEX // 4
    for row in range(8):
        shift = (brick_w // 2) * (row % 2)
        for b in range(5):
            base = np.array([0.62, 0.17, 0.12]) * rng.uniform(0.82, 1.12) + rng.normal(0, 0.02, 3)
            x0 = b * brick_w - shift
            for x in range(max(x0, 0), min(x0 + brick_w, TEX)):
                tex[row * course:(row + 1) * course, x] = base
    tex += rng.normal(0, 0.035, tex.shape)  # clay grain
    mortar = np.array([0.78, 0.76, 0.72])
    for row in range(8):
        tex[row * course] = mortar  # bed joint
        shift = (brick_w // 2) * (row % 2)
        for b in range(5):
            x = b * brick_w - shift
            if 0 <= x < TEX:
                tex[row * course:(row + 1) * course, x] = mortar  # head joint
    return np.clip(tex, 0, 1)


def _stone_floor(rng: np.random.Generator) -> np.ndarray:
    """Grey stone slabs, 2x2 per cell, dark joints."""
    tex = np.full((TEX, TEX, 3), 0.0)
    half = TEX // 2
    for i in range(2):
        for j in range(2):
            tone = rng.uniform(0.40, 0.50)
            tex[i * half:(i + 1) * half, j * half:(j + 1) * half] = [tone, tone, tone * 1.06]
    tex += rng.normal(0, 0.04, (TEX, TEX, 1))
    tex[::half] *= 0.55
    tex[:, ::half] *= 0.55
    return np.clip(tex, 0, 1)


def _ceiling_tiles(rng: np.random.Generator) -> np.ndarray:
    """Light beige acoustic tiles, 2x2 per cell, with faint speckle."""
    tex = np.empty((TEX, TEX, 3))
    tex[:] = [0.86, 0.83, 0.74]
    tex += rng.normal(0, 0.03, (TEX, TEX, 1))
    half = TEX // 2
    tex[::half] = [0.55, 0.53, 0.48]
    tex[:, ::half] = [0.55, 0.53, 0.48]
    return np.clip(tex, 0, 1)


def _shaded(tex: np.ndarray) -> np.ndarray:
    """(LEVELS * TEX * TEX, 3) uint8: the texture at LEVELS brightness levels, level 0 brightest."""
    light = np.linspace(1.0, 0.35, LEVELS)[:, None, None, None]
    return np.rint(tex[None] * light * 255).astype(np.uint8).reshape(-1, 3)


_TEXTURES: dict | None = None


def textures() -> dict:
    global _TEXTURES
    if _TEXTURES is None:
        rng = np.random.default_rng(1995)
        _TEXTURES = {
            "wall": _shaded(_brick_texture(rng)),
            "flat": np.concatenate([_shaded(_stone_floor(rng)), _shaded(_ceiling_tiles(rng))]),
        }
    return _TEXTURES


def _level(dist: np.ndarray) -> np.ndarray:
    """Brightness level from distance: a gentle falloff (the screensaver's look is mostly flat)."""
    return np.minimum((dist * 1.6).astype(np.intp), LEVELS - 1)


# ---------------------------------------------------------------- maze generation
def generate_maze(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Recursive backtracker on an n x n grid. Returns (vwall (n, n+1), hwall (n+1, n)) booleans:
    vwall[y, x] is the wall on the line x (west side of cell x); hwall[y, x] the line y."""
    vwall = np.ones((n, n + 1), bool)
    hwall = np.ones((n + 1, n), bool)
    seen = np.zeros((n, n), bool)
    stack = [(int(rng.integers(n)), int(rng.integers(n)))]
    seen[stack[0][1], stack[0][0]] = True
    while stack:
        x, y = stack[-1]
        options = [(dx, dy) for dx, dy in DIRS
                   if 0 <= x + dx < n and 0 <= y + dy < n and not seen[y + dy, x + dx]]
        if not options:
            stack.pop()
            continue
        dx, dy = options[int(rng.integers(len(options)))]
        if dx:
            vwall[y, max(x, x + dx)] = False
        else:
            hwall[max(y, y + dy), x] = False
        seen[y + dy, x + dx] = True
        stack.append((x + dx, y + dy))
    return vwall, hwall


def is_open(vwall: np.ndarray, hwall: np.ndarray, x: int, y: int, heading: int) -> bool:
    dx, dy = DIRS[heading]
    if dx:
        return not vwall[y, x + (dx > 0)]
    return not hwall[y + (dy > 0), x]


def maze_distances(vwall, hwall, start) -> np.ndarray:
    n = vwall.shape[0]
    dist = np.full((n, n), -1)
    dist[start[1], start[0]] = 0
    queue = [start]
    for x, y in queue:
        for h, (dx, dy) in enumerate(DIRS):
            if is_open(vwall, hwall, x, y, h) and dist[y + dy, x + dx] < 0:
                dist[y + dy, x + dx] = dist[y, x] + 1
                queue.append((x + dx, y + dy))
    return dist


# ---------------------------------------------------------------- rendering
class _Camera:
    """Per-size tables: column ray offsets and row slopes."""

    def __init__(self, height: int, width: int, focal: float):
        self.h, self.w, self.f = height, width, focal
        self.cols = (np.arange(width) + 0.5 - width / 2) / focal  # right-offset of each column ray
        self.rows = (height / 2 - (np.arange(height) + 0.5)) / focal  # up-slope of each row
        slope = np.abs(self.rows)
        self.flat_dist = np.where(self.rows < 0, EYE, 1 - EYE) / slope  # floor / ceiling distance
        self.flat_layer = (self.rows > 0).astype(np.intp)  # 0 floor, 1 ceiling
        self.flat_level = _level(self.flat_dist)


def cast(vwall, hwall, px, py, dir_x, dir_y, all_hits: bool):
    """DDA through zero-thickness walls. Returns per column lists of (distance, u, side) arrays:
    the first hit only, or with all_hits every wall until the ray leaves the maze."""
    n = vwall.shape[0]
    w = dir_x.shape[0]
    with np.errstate(divide="ignore"):
        ddx = np.where(dir_x != 0, np.abs(1.0 / dir_x), 1e30)
        ddy = np.where(dir_y != 0, np.abs(1.0 / dir_y), 1e30)
    step_x = np.where(dir_x > 0, 1, -1)
    step_y = np.where(dir_y > 0, 1, -1)
    mx = np.full(w, int(px))
    my = np.full(w, int(py))
    side_x = np.where(dir_x > 0, (mx + 1 - px) * ddx, (px - mx) * ddx)
    side_y = np.where(dir_y > 0, (my + 1 - py) * ddy, (py - my) * ddy)
    line_x = mx + (step_x > 0)  # the next vertical / horizontal grid line each ray crosses
    line_y = my + (step_y > 0)
    vflat = vwall.ravel()
    hflat = hwall.ravel()
    active = np.ones(w, bool)
    hits = []
    for _ in range(4 * n + 4):
        use_x = side_x < side_y
        dist = np.where(use_x, side_x, side_y)
        inside = (mx >= 0) & (mx < n) & (my >= 0) & (my < n)
        cy = np.minimum(np.maximum(my, 0), n - 1)  # np.clip costs more than the two ufuncs here
        cx = np.minimum(np.maximum(mx, 0), n - 1)
        vi = cy * (n + 1) + np.minimum(np.maximum(line_x, 0), n)
        hi = np.minimum(np.maximum(line_y, 0), n) * n + cx
        wall = np.where(use_x, vflat[vi], hflat[hi]) & inside & active
        if wall.any():
            u = np.where(use_x, py + dist * dir_y, px + dist * dir_x)
            hits.append((np.where(wall, dist, np.inf), u - np.floor(u), use_x))
            if not all_hits:
                active &= ~wall
                if not active.any():
                    break
        mx = np.where(use_x, mx + step_x, mx)
        my = np.where(use_x, my, my + step_y)
        line_x = np.where(use_x, line_x + step_x, line_x)
        line_y = np.where(use_x, line_y, line_y + step_y)
        side_x = np.where(use_x, side_x + ddx, side_x)
        side_y = np.where(use_x, side_y, side_y + ddy)
        if all_hits and not inside.any():
            break
    return hits


def render_view(state: dict, cam: _Camera) -> np.ndarray:
    """One upright frame (cam.h, cam.w, 3) uint8 of the state's maze from its camera pose."""
    tex = textures()
    px, py, ang = state["px"], state["py"], state["angle"]
    fx, fy = math.cos(ang), math.sin(ang)
    rx, ry = -fy, fx
    dir_x = fx + rx * cam.cols
    dir_y = fy + ry * cam.cols
    # floor and ceiling
    d = cam.flat_dist[:, None]
    wx = px + d * dir_x[None, :]
    wy = py + d * dir_y[None, :]
    tx = (wx * TEX).astype(np.intp) & (TEX - 1)
    ty = (wy * TEX).astype(np.intp) & (TEX - 1)
    layer = (cam.flat_layer * LEVELS + cam.flat_level)[:, None]
    img = tex["flat"][(layer * TEX + ty) * TEX + tx]
    # walls, far to near (only the nearest unless the walls are lower than the eye can see over)
    height = state["wall_h"]
    hits = cast(state["vwall"], state["hwall"], px, py, dir_x, dir_y, all_hits=height < 1.0)
    zbuf = np.full(cam.w, np.inf)
    for dist, u, side in reversed(hits):
        hit = np.isfinite(dist)
        dist = np.where(hit, dist, 0.0)
        z = EYE + cam.rows[:, None] * dist[None, :]
        mask = (z >= 0) & (z <= height) & hit[None, :]
        if not mask.any():
            continue
        v = ((height - z) * TEX).astype(np.intp)
        np.minimum(np.maximum(v, 0, out=v), TEX - 1, out=v)
        tu = (u * TEX).astype(np.intp)
        level = np.minimum(_level(dist) + side * 2, LEVELS - 1)
        idx = (level[None, :] * TEX + v) * TEX + tu[None, :]
        np.copyto(img, tex["wall"][idx], where=mask[:, :, None])
        zbuf = np.where(hit, np.minimum(zbuf, dist), zbuf)
    if height >= 1.0:
        _draw_sprites(img, state, cam, fx, fy, rx, ry, zbuf)
    return img


def _draw_sprites(img, state, cam, fx, fy, rx, ry, zbuf):
    sprites = [("rock", x + 0.5, y + 0.5) for x, y in state["rocks"]]
    ex, ey = state["exit"]
    sprites.append(("exit", ex + 0.5, ey + 0.5))
    placed = []
    for kind, sx, sy in sprites:
        relx, rely = sx - state["px"], sy - state["py"]
        depth = relx * fx + rely * fy
        if depth < 0.2:
            continue
        placed.append((depth, kind, relx * rx + rely * ry))
    spin = state["frame"] * 0.15
    for depth, kind, lat in sorted(placed, reverse=True):
        radius = (0.18 if kind == "rock" else 0.25) * cam.f / depth
        cc = cam.w / 2 + lat * cam.f / depth
        rc = cam.h / 2  # sprites float at eye height
        c0, c1 = max(int(cc - radius), 0), min(int(cc + radius) + 1, cam.w)
        r0, r1 = max(int(rc - radius), 0), min(int(rc + radius) + 1, cam.h)
        if c0 >= c1 or r0 >= r1:
            continue
        u = (np.arange(c0, c1) + 0.5 - cc)[None, :] / radius
        v = (np.arange(r0, r1) + 0.5 - rc)[:, None] / radius
        visible = (depth < zbuf[c0:c1])[None, :]
        patch = img[r0:r1, c0:c1]
        if kind == "rock":  # a spinning octahedron: diamond silhouette, four shaded facets
            half_w = 0.45 + 0.35 * abs(math.cos(spin))
            inside = (np.abs(u) / half_w + np.abs(v) <= 1.0) & visible
            edge = math.sin(spin) * half_w * 0.6  # the front ridge sweeps across as it turns
            right = u > edge * (1 - np.abs(v))
            tone = np.where(right, 0.55 + 0.25 * math.cos(spin), 0.75 - 0.2 * math.sin(spin))
            tone = tone * np.where(v < 0, 1.0, 0.78)
            patch[inside] = np.rint(np.broadcast_to(tone * 200, inside.shape)[inside, None]
                                    * np.array([1.0, 1.0, 1.04])).clip(0, 255).astype(np.uint8)
        else:  # the exit's smiley: yellow disc, dark eyes, a smiling mouth
            r2 = u * u + v * v
            inside = (r2 <= 1.0) & visible
            patch[inside] = (250, 220, 40)
            eyes = ((np.abs(u) - 0.35) ** 2 + (v + 0.3) ** 2 <= 0.03) & visible
            mouth = (r2 > 0.3) & (r2 < 0.5) & (v > 0.15) & visible
            patch[eyes | mouth] = (40, 40, 140)


def render_frame(state: dict, cam: _Camera, big: _Camera) -> np.ndarray:
    """The frame including the camera roll (0 upright, pi upside down, in between mid-flip)."""
    roll = state["roll"] % (2 * math.pi)
    if abs(roll) < 1e-9 or abs(roll - 2 * math.pi) < 1e-9:
        return render_view(state, cam)
    if abs(roll - math.pi) < 1e-9:
        return render_view(state, cam)[::-1, ::-1].copy()
    # mid-roll: render a larger view with the same focal length and rotate it about the centre
    wide = render_view(state, big)
    ys, xs = np.mgrid[0:cam.h, 0:cam.w]
    dx = xs + 0.5 - cam.w / 2
    dy = ys + 0.5 - cam.h / 2
    c, s = math.cos(roll), math.sin(roll)
    sx = np.floor(c * dx + s * dy + big.w / 2).astype(np.intp).clip(0, big.w - 1)
    sy = np.floor(-s * dx + c * dy + big.h / 2).astype(np.intp).clip(0, big.h - 1)
    return wide[sy, sx]


# ---------------------------------------------------------------- the stream
class MazeStream(FrameStream):
    """``maze``: endless first-person walk through random mazes. Options: ``cells`` (maze side,
    default 8), ``size`` (frame side in pixels, default 64), ``fov`` (degrees, default 70),
    ``rocks`` (max rocks per maze, default 3)."""

    def __init__(self, *, split: str = "train", seed: int = 0, total_frames: int | None = None,
                 cells: int = 8, size: int = 64, fov: float = 70.0, rocks: int = 3):
        super().__init__()
        if split not in ("train", "test"):
            raise StreamError(f"maze: split {split!r} not supported because only 'train' and 'test' exist")
        if cells < 2:
            raise StreamError(f"maze: cells={cells} not supported because a maze needs at least 2x2 cells")
        if size < 8 or size % 2:
            raise StreamError(f"maze: size={size} not supported because it must be even and >= 8")
        self.info = StreamInfo("maze", size, size, 20.0, int(total_frames) if total_frames else None, 20)
        self.cells, self.max_rocks = int(cells), int(rocks)
        focal = (size / 2) / math.tan(math.radians(fov) / 2)
        self._cam = _Camera(size, size, focal)
        big = int(math.ceil(size * math.sqrt(2) / 2)) * 2 + 2
        self._big = _Camera(big, big, focal)
        seq = np.random.SeedSequence([int(seed), 0 if split == "train" else 1, 0x3D3A2E])
        rng = np.random.Generator(np.random.PCG64(seq))
        self.state = {
            "frame": 0, "mazes_completed": 0, "flips": 0, "roll": 0.0, "hand": 1,
            "wall_h": 1.0, "action": None, "rng": rng.bit_generator.state,
        }
        self._new_maze(rng)
        self.state["rng"] = rng.bit_generator.state
        self.events: list[str] = []

    # ---- convenience views of the counters
    @property
    def mazes_completed(self) -> int:
        return self.state["mazes_completed"]

    @property
    def flips(self) -> int:
        return self.state["flips"]

    def _new_maze(self, rng: np.random.Generator) -> None:
        s, n = self.state, self.cells
        s["vwall"], s["hwall"] = generate_maze(rng, n)
        start = (int(rng.integers(n)), int(rng.integers(n)))
        dist = maze_distances(s["vwall"], s["hwall"], start)
        far = np.argwhere(dist >= max(1, int(np.percentile(dist, 75))))  # (y, x) rows
        ey, ex = far[int(rng.integers(len(far)))]
        s["exit"] = (int(ex), int(ey))
        free = [(x, y) for y in range(n) for x in range(n) if (x, y) not in (start, s["exit"])]
        count = int(rng.integers(1, self.max_rocks + 1)) if self.max_rocks > 0 else 0
        picks = rng.choice(len(free), size=min(count, len(free)), replace=False)
        s["rocks"] = [free[int(i)] for i in sorted(picks)]
        s["cx"], s["cy"] = start
        s["px"], s["py"] = start[0] + 0.5, start[1] + 0.5
        heading = next(h for h in range(4) if is_open(s["vwall"], s["hwall"], start[0], start[1], h))
        s["heading"] = heading
        s["angle"] = heading * math.pi / 2

    def _next_frame(self) -> np.ndarray:
        frame = render_frame(self.state, self._cam, self._big)
        self.events = self._advance()
        return frame

    # ---- the walker
    def _advance(self) -> list[str]:
        s = self.state
        s["frame"] += 1
        events: list[str] = []
        if s["action"] is None:
            self._decide(events)
        act = s["action"]
        act["k"] += 1
        t = act["k"] / act["n"]
        smooth = t * t * (3 - 2 * t)
        kind = act["kind"]
        if kind == "move":
            s["px"] = act["x0"] + (act["x1"] - act["x0"]) * t
            s["py"] = act["y0"] + (act["y1"] - act["y0"]) * t
        elif kind == "turn":
            s["angle"] = act["a0"] + (act["a1"] - act["a0"]) * smooth
        elif kind == "roll":
            s["roll"] = act["r0"] + (act["r1"] - act["r0"]) * smooth
        elif kind == "fall":
            s["wall_h"] = 1.0 - smooth
            s["roll"] = act["r0"] * (1 - smooth)  # come back upright while the walls are down
        elif kind == "rise":
            s["wall_h"] = smooth
        if act["k"] >= act["n"]:
            self._finish(act, events)
        return events

    def _decide(self, events: list[str]) -> None:
        s = self.state
        cell = (s["cx"], s["cy"])
        if cell == tuple(s["exit"]):
            s["action"] = {"kind": "fall", "k": 0, "n": FALL_FRAMES, "r0": s["roll"]}
            events.append("maze_solved")
            return
        if cell in [tuple(r) for r in s["rocks"]]:
            s["rocks"] = [r for r in s["rocks"] if tuple(r) != cell]
            target = 0.0 if s["roll"] > 1.0 else math.pi
            s["action"] = {"kind": "roll", "k": 0, "n": ROLL_FRAMES, "r0": s["roll"], "r1": target}
            s["hand"] = -s["hand"]
            s["flips"] += 1
            events.append("rock_flip")
            return
        h = s["heading"]
        order = (h + s["hand"], h, h - s["hand"], h + 2)
        new = next(d % 4 for d in order if is_open(s["vwall"], s["hwall"], s["cx"], s["cy"], d % 4))
        if new != h:
            turn = ((new - h + 2) % 4) - 2  # -1 left, +1 right, -2 back
            if turn == -2:
                turn = 2 * s["hand"]
            a0 = s["angle"]
            s["action"] = {"kind": "turn", "k": 0, "n": TURN_FRAMES * abs(turn), "a0": a0,
                           "a1": a0 + turn * math.pi / 2, "then": new}
            return
        self._start_move()

    def _start_move(self) -> None:
        s = self.state
        dx, dy = DIRS[s["heading"]]
        s["action"] = {"kind": "move", "k": 0, "n": MOVE_FRAMES, "x0": s["cx"] + 0.5, "y0": s["cy"] + 0.5,
                       "x1": s["cx"] + dx + 0.5, "y1": s["cy"] + dy + 0.5}

    def _finish(self, act: dict, events: list[str]) -> None:
        s = self.state
        s["action"] = None
        kind = act["kind"]
        if kind == "move":
            dx, dy = DIRS[s["heading"]]
            s["cx"] += dx
            s["cy"] += dy
        elif kind == "turn":
            s["heading"] = act["then"]
            s["angle"] = s["heading"] * math.pi / 2  # keep the angle canonical
            self._start_move()
        elif kind == "fall":
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = s["rng"]
            self._new_maze(rng)
            s["rng"] = rng.bit_generator.state
            s["roll"], s["hand"], s["wall_h"] = 0.0, 1, 0.0
            s["mazes_completed"] += 1
            s["action"] = {"kind": "rise", "k": 0, "n": FALL_FRAMES}
            events.append("new_maze")
        elif kind == "rise":
            s["wall_h"] = 1.0

    # ---- state
    def state_dict(self) -> dict:
        return {"kind": "maze", "position": self.position, "state": copy.deepcopy(self.state),
                "events": list(self.events)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "maze":
            raise StreamError(f"maze: state_dict is for {state.get('kind')!r}, not a maze stream")
        self.state = copy.deepcopy(state["state"])
        self.events = list(state["events"])
        self.position = int(state["position"])
