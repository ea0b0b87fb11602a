"""3D maze stream: shape, determinism, splits, rare events, the flip, and exact resume."""

import numpy as np
import pytest

from fastdiff.streams import StreamError, make_stream
from fastdiff.streams.maze import generate_maze, is_open, maze_distances


def run_with_events(stream, n):
    frames, events = [], []
    for _ in range(n):
        frames.append(next(stream))
        events.append(list(stream.events))
    return np.stack(frames), events


def test_frames_and_info():
    s = make_stream("maze", seed=0)
    f = s.read(5)
    assert f.shape == (5, 64, 64, 3) and f.dtype == np.uint8
    assert s.info.fps == 20 and s.info.window == 20 and (s.info.height, s.info.width) == (64, 64)
    # walls (reddish), floor (grey) and ceiling (light) all show up in a corridor view
    top, bottom = f[0, :6].reshape(-1, 3).mean(0), f[0, -6:].reshape(-1, 3).mean(0)
    assert top.mean() > bottom.mean() + 40  # light ceiling over a darker floor
    assert (f[0, :, :, 0].astype(int) - f[0, :, :, 2] > 60).mean() > 0.2  # brick red is on screen


def test_maze_generation_is_a_perfect_maze():
    rng = np.random.default_rng(0)
    v, h = generate_maze(rng, 7)
    assert v[:, 0].all() and v[:, -1].all() and h[0].all() and h[-1].all()  # closed outside
    dist = maze_distances(v, h, (0, 0))
    assert (dist >= 0).all()  # every cell reachable
    openings = sum(is_open(v, h, x, y, d) for x in range(7) for y in range(7) for d in range(4)) // 2
    assert openings == 7 * 7 - 1  # a tree: no loops


def test_determinism_and_splits():
    a = make_stream("maze", seed=3, cells=4).read(40)
    b = make_stream("maze", seed=3, cells=4).read(40)
    c = make_stream("maze", seed=4, cells=4).read(40)
    t = make_stream("maze", seed=3, cells=4, split="test").read(40)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != t).any()


def test_rare_events_happen_and_flip_turns_the_view():
    s = make_stream("maze", seed=0, cells=3)
    frames, events = run_with_events(s, 260)
    flat = [e for ev in events for e in ev]
    assert "rock_flip" in flat and "maze_solved" in flat and "new_maze" in flat
    assert s.flips >= 1 and s.mazes_completed >= 1
    flip_at = next(i for i, ev in enumerate(events) if "rock_flip" in ev)
    upside = frames[flip_at + 20]  # after the roll: ceiling below, floor above
    assert upside[-6:].mean() > upside[:6].mean() + 40
    solved_at = next(i for i, ev in enumerate(events) if "maze_solved" in ev)
    new_at = next(i for i, ev in enumerate(events) if "new_maze" in ev)
    assert new_at > solved_at
    # walls down between the two phases: little brick red on screen
    low = frames[new_at]
    red = (low[..., 0].astype(int) - low[..., 2] > 60).mean()
    assert red < 0.05, red


@pytest.mark.parametrize("cut", [0, 17, 150, 160])  # before, during a roll, during the walls' fall
def test_resume_is_exact(cut):
    ref = make_stream("maze", seed=0, cells=3)
    ref.read(cut)
    state = ref.state_dict()
    expect, ev_expect = run_with_events(ref, 60)
    s = make_stream("maze", seed=5, cells=3)
    s.load_state_dict(state)
    got, ev_got = run_with_events(s, 60)
    np.testing.assert_array_equal(got, expect)
    assert ev_got == ev_expect and s.position == cut + 60


def test_bad_options():
    with pytest.raises(StreamError, match="cells"):
        make_stream("maze", cells=1)
    with pytest.raises(StreamError, match="size"):
        make_stream("maze", size=63)
    with pytest.raises(StreamError, match="split"):
        make_stream("maze", split="valid")
