"""List, preview and export frame streams.

  fastdiff streams list
  fastdiff streams preview balls-c --frames 40 --out balls.png   (or .gif / .mp4)
  fastdiff streams export balls-o --frames 1000000 --out exports/balls-o [--seed 0] [--split train]

Export writes DIR/frames.npy (uint8 N x H x W x 3, memory-mappable), DIR/meta.json and, for the
balls streams, the ground truth DIR/positions.npy (float32 N x 2 x 2, pixel coordinates x=column,
y=row) and DIR/colors.npy (int8 N x 2: 0 red, 1 yellow, 2 green). Read it back with npy:DIR.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "list, preview and export frame streams (balls-o, balls-c, maze, video:PATH, npy:DIR)"


def _options(pairs: list[str]) -> dict:
    """--option key=value pairs; values parsed as JSON when possible (numbers, lists), else strings."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option {pair!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="the stream specs this build knows")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="stream spec: balls-o, balls-c, maze, video:PATH, npy:DIR")
    common.add_argument("--frames", type=int, default=None, help="number of frames")
    common.add_argument("--out", required=True, help="output file (preview) or directory (export)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--split", choices=("train", "test"), default="train")
    common.add_argument("--skip", type=int, default=0, help="frames to skip before the first one kept")
    common.add_argument("--total-frames", type=int, default=None,
                        help="run length the stream is made for (balls-c drifts over it; "
                             "default: --skip + --frames)")
    common.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="stream option, e.g. crop=[30,0,240,240] size=[64,64] fps=20 cells=6")
    p = sub.add_parser("preview", parents=[common], help="write frames as PNG strip, GIF or MP4")
    p.add_argument("--scale", type=int, default=0, help="nearest-neighbour enlargement (0: automatic)")
    p.add_argument("--cols", type=int, default=10, help="frames per row of a PNG strip")
    p.add_argument("--every", type=int, default=1, help="keep every n-th frame")
    sub.add_parser("export", parents=[common], help="write DIR/frames.npy (+ ground truth for balls)")


def _make(args):
    from fastdiff.streams import make_stream

    total = args.total_frames or ((args.frames + args.skip) if args.frames else None)
    return make_stream(args.name, split=args.split, seed=args.seed, total_frames=total,
                       **_options(args.option))


def _skip(stream, count: int) -> None:
    while count > 0:
        got = len(stream.read(min(count, 4096)))
        if got == 0:
            break
        count -= got


def _preview(args) -> int:
    from fastdiff import media

    stream = _make(args)
    _skip(stream, args.skip)
    frames = stream.read((args.frames or 40) * max(1, args.every))[:: max(1, args.every)]
    if len(frames) == 0:
        print(f"{args.name}: no frames to preview", file=sys.stderr)
        return 1
    scale = args.scale or media.auto_scale(frames.shape[1])
    out = args.out
    fps = stream.info.fps / max(1, args.every)
    if out.lower().endswith(".gif"):
        media.save_gif(frames, out, fps=fps, scale=scale)
    elif out.lower().endswith(".mp4"):
        media.save_mp4(frames, out, fps=fps, scale=scale)
    elif out.lower().endswith(".png"):
        media.save_png_strip(frames, out, scale=scale, max_cols=args.cols)
    else:
        print(f"--out {out}: not supported because the suffix must be .png, .gif or .mp4", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(frames)} frames of {args.name} ({frames.shape[1]}x{frames.shape[2]}, x{scale})")
    return 0


def _export(args) -> int:
    from pathlib import Path

    import numpy as np
    from tqdm import tqdm

    stream = _make(args)
    total = args.frames if args.frames is not None else stream.info.length
    if not total:
        print(f"{args.name}: endless stream; give --frames N", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _skip(stream, args.skip)
    h, w = stream.info.height, stream.info.width
    frames = np.lib.format.open_memmap(out / "frames.npy", mode="w+", dtype=np.uint8, shape=(total, h, w, 3))
    truth = hasattr(stream, "read_with_truth")
    if truth:
        balls = stream.read_with_truth(0)[1].shape[1]
        positions = np.lib.format.open_memmap(out / "positions.npy", mode="w+", dtype=np.float32,
                                              shape=(total, balls, 2))
        colors = np.lib.format.open_memmap(out / "colors.npy", mode="w+", dtype=np.int8, shape=(total, balls))
    done, chunk = 0, 10_000 if h * w <= 64 * 64 else 1000
    with tqdm(total=total, unit="frame", desc=f"export {args.name}", smoothing=0.05) as bar:
        while done < total:
            want = min(chunk, total - done)
            if truth:
                f, p, c = stream.read_with_truth(want)
                positions[done:done + len(f)] = p
                colors[done:done + len(f)] = c
            else:
                f = stream.read(want)
            if len(f) == 0:
                break
            frames[done:done + len(f)] = f
            done += len(f)
            bar.update(len(f))
    frames.flush()
    del frames
    if done < total:  # the stream ended early (video): shrink the files to what was read
        for name in ("frames.npy",) + (("positions.npy", "colors.npy") if truth else ()):
            arr = np.load(out / name, mmap_mode="r")[:done]
            np.save(out / f".{name}", np.asarray(arr))
            (out / f".{name}").replace(out / name)
    meta = {"stream": args.name, "seed": args.seed, "split": args.split, "frames": done,
            "height": h, "width": w, "fps": stream.info.fps, "window": stream.info.window,
            "total_frames": args.total_frames, "skip": args.skip, "options": _options(args.option)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    extra = " (+ positions.npy, colors.npy)" if truth else ""
    print(f"wrote {out}/frames.npy: {done} frames {h}x{w}{extra}")
    return 0


def run(args) -> int:
    from fastdiff.streams import StreamError, list_streams

    if args.action == "list" or args.action is None:
        for name, description in list_streams():
            print(f"{name:12s} {description}")
        return 0
    try:
        return _preview(args) if args.action == "preview" else _export(args)
    except StreamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
