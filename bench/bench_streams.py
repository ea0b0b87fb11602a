"""Stream throughput: balls and maze frames/s on one CPU core, and our decord reader against
decord's own sequential get_batch loop on the same file, side by side.

    python bench/bench_streams.py [--frames N] [--export-1m] [--out FILE.json] [--smoke] [--repeats N]

Streams are generated and decoded on the host, so --device only labels the rows. --smoke: a few
thousand balls frames, a few hundred of the maze and of the video. Under pytest (CI, --benchmark-disable)
each benchmark runs once at smoke size. Timings report both wall time and process CPU time (the CPU
figure is the fairer one on a shared machine).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import numpy as np
import utils

from fastdiff.streams import make_stream


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def bench_generated(spec: str, frames: int, repeats: int) -> dict:
    """Frames/s of a generated stream: the best of `repeats` fresh streams, by CPU time."""
    best = None
    for _ in range(repeats):
        s = make_stream(spec)
        _, wall, cpu = _timed(lambda s=s: s.read(frames))
        best = (wall, cpu) if best is None or cpu < best[1] else best
    return {"what": f"{spec} read", "frames": frames, "fps_wall": frames / best[0], "fps_cpu": frames / best[1]}


def bench_balls(frames: int, repeats: int = 3) -> dict:
    return bench_generated("balls-o", frames, repeats)


def bench_maze(frames: int, repeats: int = 2) -> dict:
    return bench_generated("maze", frames, repeats)


def write_test_video(path: str, frames: int, size: int = 64, fps: int = 20) -> str:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.roll(base, i, axis=1)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def bench_video(frames: int, batch: int = 32, repeats: int = 3) -> dict:
    import decord

    with tempfile.TemporaryDirectory() as d:
        path = write_test_video(os.path.join(d, "bench.mp4"), frames)

        def decord_loop():
            vr = decord.VideoReader(path, ctx=decord.cpu(0))
            n = len(vr)
            return sum(len(vr.get_batch(list(range(i, min(n, i + batch)))).asnumpy())
                       for i in range(0, n, batch))

        def ours():  # streamed batch by batch and dropped, as the loop above does
            stream, count = make_stream(f"video:{path}", batch=batch), 0
            while chunk := len(stream.read(batch)):
                count += chunk
            return count

        rows = {}
        for name, fn in (("decord get_batch loop", decord_loop), ("fastdiff VideoStream", ours)) * repeats:
            count, wall, cpu = _timed(fn)
            assert count == frames
            if name not in rows or wall < rows[name][0]:
                rows[name] = (wall, cpu)
    ratio = rows["decord get_batch loop"][0] / rows["fastdiff VideoStream"][0]
    return {"what": "video 64x64 mpeg4", "frames": frames,
            "decord_fps_wall": frames / rows["decord get_batch loop"][0],
            "ours_fps_wall": frames / rows["fastdiff VideoStream"][0], "ours_vs_decord": ratio}


def bench_export(frames: int) -> dict:
    from fastdiff.cli import main

    with tempfile.TemporaryDirectory() as d:
        _, wall, cpu = _timed(lambda: main(["streams", "export", "balls-o", "--frames", str(frames),
                                            "--out", os.path.join(d, "e")]))
    return {"what": "export balls-o", "frames": frames, "seconds_wall": wall, "seconds_cpu": cpu}


def _row(r: dict) -> dict:
    return {**r, "device": f"CPU {platform.processor() or platform.machine()} (1 core)", "date": utils.today()}


# ---- pytest-benchmark entry points (smoke sizes on CPU)
def test_bench_balls(benchmark):
    r = benchmark(bench_balls, 2000, 1)
    assert r["fps_cpu"] > 0


def test_bench_maze(benchmark):
    r = benchmark(bench_maze, 40, 1)
    assert r["fps_cpu"] > 0


def test_bench_video(benchmark):
    r = benchmark(bench_video, 64, 16, 1)
    assert r["ours_fps_wall"] > 0


def main(argv=None) -> int:
    parser = utils.parser(__doc__)
    parser.add_argument("--frames", type=int, default=None,
                        help="balls frames (default 100000, --smoke 2000; maze: /50; video: /100 and /20, to show "
                             "start-up vs steady state)")
    parser.add_argument("--export-1m", action="store_true", help="also time a 1M-frame balls export")
    args = parser.parse_args(argv)
    run = utils.resolve(args, "bench_streams", repeats=3, smoke_repeats=1)
    frames = args.frames or (2000 if run.smoke else 100_000)
    rows = [bench_balls(frames, run.repeats), bench_maze(max(40, frames // 50), run.repeats),
            bench_video(max(64, frames // 100), repeats=run.repeats),
            bench_video(max(64, frames // 20), repeats=run.repeats)]
    if args.export_1m:
        rows.append(bench_export(1_000_000))
    rows = [_row(r) for r in rows]
    for r in rows:
        print(json.dumps(r))
    if run.out:
        utils.write_rows(rows, run.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
