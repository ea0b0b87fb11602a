"""Bad input at the trainer level: what `fastdiff train` and OnlineTrainer do with videos that are missing,
not videos, empty, corrupt mid-stream, of changing size, grayscale or RGBA, and with absurd configs.

Each refusal is exit code 2 with a message that names the problem, before any training; a corrupt frame
mid-stream follows the stream's policy (skip: train on; stop: end the stream; raise: the error) and never
loses what was trained. The stream-level behaviour is in tests/test_streams_video.py; checkpoints of
another model shape or truncated ones are in tests/test_faults.py.
"""

import json
import warnings

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("decord")

from fastdiff import checkpoint as ckpt  # noqa: E402
from fastdiff import ingest as ingest_module  # noqa: E402
from fastdiff import train as train_module  # noqa: E402
from fastdiff.cli import main  # noqa: E402
from fastdiff.config import build_config  # noqa: E402
from fastdiff.streams import StreamError, make_stream  # noqa: E402
from fastdiff.train import OnlineTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Small enough for a few seconds on 2 cores: 16x32 frames (4x8 latents), windows of 4 frames.
TINY = {
    "model.width": "64", "model.depth": "1", "model.heads": "2",
    "autoencoder.latent": "ae", "model.patch": "1",
    "autoencoder.warmup_frames": "32", "autoencoder.fit_steps": "3", "autoencoder.fit_batch": "8",
    "autoencoder.hidden": "16", "replay.replayed": "1", "replay.windows": "8", "run.window": "4",
    "run.checkpoint_every": "10", "run.sample_every": "0", "run.final_clips": "0", "run.sample_frames": "4",
    "run.log_every": "5", "run.progress": "false", "optim.name": "adamw", "diffusion.sample_steps": "2",
}


def write_video(path, n=40, h=16, w=32, fps=10, codec="mpeg4", pix="yuv420p", mode="rgb"):
    """tests/test_streams_video.py's writer, at this file's small default size."""
    from test_streams_video import write_video as write

    return write(path, n=n, h=h, w=w, fps=fps, codec=codec, pix=pix, mode=mode)


def corrupt(src, dst, at=0.5):
    """dst: src with 300 bytes of fixed garbage at `at` of its length (frames there fail to decode)."""
    data = bytearray(src.read_bytes())
    i = int(len(data) * at)
    data[i:i + 300] = bytes(range(256)) + bytes(44)
    dst.write_bytes(bytes(data))
    return dst


def train_cli(tmp_path, *args, name="run"):
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    return main(["train", "--out", str(tmp_path / "runs"), "--name", name, "--no-progress", *sets, *args])


def cfg_for(tmp_path, stream, **extra):
    overrides = {**TINY, "run.out": str(tmp_path / "runs"), "run.stream": stream,
                 **{k.replace("__", "."): str(v) for k, v in extra.items()}}
    return build_config("tiny", None, overrides)


def nothing_trained(tmp_path, name="run"):
    run = tmp_path / "runs" / name
    return not (run / "checkpoints").exists() and not (run / "autoencoder.pt").exists()


# --- files that cannot be trained on: refused with exit 2, the file named ---------------------------------

def test_missing_file_is_refused(tmp_path, capsys):
    missing = tmp_path / "nosuch.mp4"
    assert train_cli(tmp_path, "--stream", f"video:{missing}", "--frames", "20") == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
    assert nothing_trained(tmp_path)


@pytest.mark.parametrize("content", ["random", "text"])
def test_file_that_is_not_a_video_is_refused(tmp_path, capsys, content):
    path = tmp_path / "clip.mp4"
    if content == "random":
        path.write_bytes(np.random.RandomState(0).bytes(4096))
    else:
        path.write_text("definitely not a video\n" * 50)
    assert train_cli(tmp_path, "--stream", f"video:{path}", "--frames", "20") == 2
    err = capsys.readouterr().err
    assert "clip.mp4" in err and "cannot be opened as a video" in err
    assert "Traceback" not in err
    assert nothing_trained(tmp_path)


def test_zero_byte_file_is_refused(tmp_path, capsys):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    assert train_cli(tmp_path, "--stream", f"video:{path}", "--frames", "20") == 2
    err = capsys.readouterr().err
    assert "empty.mp4" in err and "empty file (0 bytes)" in err
    assert nothing_trained(tmp_path)


@pytest.mark.parametrize("suffix,codec", [("mp4", "mpeg4"), ("mkv", "ffv1")])
def test_container_without_frames_is_refused(tmp_path, capsys, suffix, codec):
    """A well-formed header with a video stream and not one frame (PyAV writes the header only)."""
    path = tmp_path / f"noframes.{suffix}"
    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=10)
    s.width, s.height, s.pix_fmt = 32, 16, "yuv420p"
    c.start_encoding()
    c.close()
    assert path.stat().st_size > 0
    assert train_cli(tmp_path, "--stream", f"video:{path}", "--frames", "20") == 2
    err = capsys.readouterr().err
    assert f"noframes.{suffix}" in err
    assert "cannot be opened as a video" in err or "holds no frames" in err
    assert nothing_trained(tmp_path)


def test_folder_of_videos_of_changing_size_is_refused(tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video(folder / "a.mp4", n=20, h=16, w=32)
    write_video(folder / "b.mp4", n=20, h=32, w=64)
    assert train_cli(tmp_path, "--stream", f"video:{folder}", "--frames", "30") == 2
    err = capsys.readouterr().err
    # the message says which files have which size and how to bring them to one size
    assert "different frame sizes" in err and "32x16: a.mp4" in err and "64x32: b.mp4" in err
    assert "size=" in err
    assert nothing_trained(tmp_path)


def test_folder_of_images_is_refused(tmp_path, capsys):
    """video:DIR reads video files only; a folder of PNG frames is refused, naming the suffixes it reads."""
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, size in enumerate([(16, 16), (24, 16), (16, 16)]):
        Image.fromarray(np.full((*size[::-1], 3), 40 * i, np.uint8)).save(folder / f"{i:03d}.png")
    assert train_cli(tmp_path, "--stream", f"video:{folder}", "--frames", "30") == 2
    err = capsys.readouterr().err
    assert "no video files" in err and ".mp4" in err
    assert nothing_trained(tmp_path)


def test_video_decord_cannot_decode_is_refused_clearly(tmp_path, capsys):
    """decord's frame copy fails on frames 16 pixels wide (and some other widths): a valid file it cannot read
    is refused naming the file and the way out, not as 'corrupt'."""
    path = write_video(tmp_path / "narrow.mp4", n=20, h=32, w=16)
    assert train_cli(tmp_path, "--stream", f"video:{path}", "--frames", "20") == 2
    err = capsys.readouterr().err
    assert "narrow.mp4" in err and "cannot decode frames of this width" in err and "re-encode" in err
    assert nothing_trained(tmp_path)


# --- grayscale and RGBA: converted to RGB ---------------------------------------------------------------

@pytest.mark.parametrize("mode,pix", [("gray", "gray"), ("rgba", "bgra")])
def test_gray_and_rgba_videos_train_as_rgb(tmp_path, mode, pix):
    path = write_video(tmp_path / f"{mode}.mkv", n=16, codec="ffv1", pix=pix, mode=mode)
    trainer = OnlineTrainer(cfg_for(tmp_path, f"video:{path}", run__frames=16), tmp_path / mode, log=lambda *_: None)
    assert trainer.frame_shape == (16, 32, 3)
    summary = trainer.train()
    assert summary["frames"] == 16 and summary["steps"] == 16 - 4 + 1 and summary["skipped_steps"] == 0
    last = trainer.step.ring_pixels[-1].to(torch.int32)  # frame 15, written with red (or gray) = 120
    assert abs(int(last[0, 0, 0]) - 120) <= 3
    if mode == "gray":
        assert torch.equal(last[..., 0], last[..., 1]) and torch.equal(last[..., 0], last[..., 2])
    else:  # alpha is dropped, not blended into the colour channels
        assert int(last[..., 1:].max()) <= 3
    state, _ = ckpt.load_latest(tmp_path / mode / "checkpoints", log=lambda *_: None)
    assert state["counters"]["frames_seen"] == 16


# --- a video corrupted mid-stream ----------------------------------------------------------------------

@pytest.fixture
def damaged(tmp_path):
    """A 96-frame video with garbage at 3/4 of its bytes: frames near the end fail to decode."""
    clean = write_video(tmp_path / "clean.mp4", n=96, mode="noise")
    return corrupt(clean, tmp_path / "damaged.mp4", at=0.75)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 frames, so that the damaged frames are read by the ingest thread during training."""
    monkeypatch.setattr(ingest_module, "CHUNK", 16)


def _stream_errors(path, policy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = make_stream(f"video:{path}", on_error=policy)
        frames = s.read(1000)
    return len(frames), s.errors


def test_corrupt_video_skip_policy_trains_on_and_saves(tmp_path, damaged, capsys, small_chunks):
    """The CLI's stream policy is skip: bad frames are reported and skipped, the run ends with the frames that
    decoded, a final checkpoint holds all of it, and resuming it neither loses nor repeats a frame."""
    delivered, errors = _stream_errors(damaged, "skip")
    assert errors and 32 < delivered < 96  # the damage is after the autoencoder's warm-up prefix
    with pytest.warns(RuntimeWarning, match=r"damaged\.mp4: frame \d+ cannot be decoded.*skipped"):
        assert train_cli(tmp_path, "--stream", f"video:{damaged}", "--frames", "96") == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
    # decord's threaded decoder does not always fail on the same frames: a frame is delivered or reported
    assert 32 < summary["frames"] < 96 and summary["skipped_steps"] == 0
    assert summary["steps"] == summary["frames"] - 4 + 1
    run = tmp_path / "runs" / "run"
    state, path = ckpt.load_latest(run / "checkpoints", log=lambda *_: None)
    assert state["counters"]["frames_seen"] == summary["frames"] and state["counters"]["steps"] == summary["steps"]
    assert f"stream ended after {summary['frames']} frames" in out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    again = capsys.readouterr().out
    resumed = json.loads(again[again.index("{"):again.rindex("}") + 1])
    # the resumed run starts where the checkpoint ended: one step per frame it reads, none trained twice
    assert resumed["frames"] >= summary["frames"]
    assert resumed["steps"] - summary["steps"] == resumed["frames"] - summary["frames"]


def _with_policy(monkeypatch, policy):
    monkeypatch.setattr(train_module, "make_stream", lambda spec, **kw: make_stream(spec, on_error=policy, **kw))


def test_corrupt_video_stop_policy_ends_cleanly_with_a_checkpoint(tmp_path, damaged, monkeypatch, small_chunks):
    _with_policy(monkeypatch, "stop")
    with pytest.warns(RuntimeWarning, match="stream stopped here"):
        trainer = OnlineTrainer(cfg_for(tmp_path, f"video:{damaged}", run__frames=96), tmp_path / "stop",
                                log=lambda *_: None)
        summary = trainer.train()
    assert len(trainer.stream.errors) == 1
    first_bad = _frame_of(trainer.stream.errors[0])
    assert summary["frames"] == first_bad >= 4  # everything before the first bad frame, nothing after it
    assert summary["steps"] == first_bad - 4 + 1
    state, _ = ckpt.load_latest(tmp_path / "stop" / "checkpoints", log=lambda *_: None)
    assert state["counters"]["frames_seen"] == first_bad


def _frame_of(message):
    return int(message.split("frame ")[1].split()[0])


def test_corrupt_video_raise_policy_keeps_the_last_checkpoint(tmp_path, damaged, monkeypatch, small_chunks):
    """on_error=raise: the StreamError (file and frame named) reaches the caller from the ingest thread; the
    last periodic checkpoint is intact, loads, and a resumed run starts from it."""
    _with_policy(monkeypatch, "raise")
    trainer = None
    with pytest.raises(StreamError, match=r"damaged\.mp4: frame \d+ cannot be decoded") as caught:
        trainer = OnlineTrainer(cfg_for(tmp_path, f"video:{damaged}", run__frames=96), tmp_path / "raise",
                                log=lambda *_: None)
        trainer.train()
    bad = _frame_of(str(caught.value))
    if trainer is None or trainer.frames_seen < 10:  # decord failed spuriously in the warm-up prefix
        pytest.skip(f"decord reported frame {bad} bad before the first checkpoint")
    seen = trainer.frames_seen  # every frame of the chunks before the bad one
    assert seen <= bad
    state, _ = ckpt.load_latest(tmp_path / "raise" / "checkpoints", log=lambda *_: None)
    assert state["counters"]["frames_seen"] == seen // 10 * 10  # checkpoint_every=10
    _with_policy(monkeypatch, "skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = OnlineTrainer(cfg_for(tmp_path, f"video:{damaged}", run__frames=96), tmp_path / "raise",
                                resume=True, log=lambda *_: None)
    assert resumed.frames_seen == seen // 10 * 10 and resumed.steps == state["counters"]["steps"]


# --- absurd configs: refused with exit 2, the field named, before any work ------------------------------

@pytest.mark.parametrize("setting,field", [
    ("model.width=-1", "model.width"), ("model.depth=0", "model.depth"), ("model.heads=-2", "model.heads"),
    ("autoencoder.channels=-4", "autoencoder.channels"), ("run.window=-3", "run.window"),
    ("replay.windows=-1", "replay.windows"), ("run.frames=-100", "run.frames"),
    ("replay.windows=10**9", "replay.windows"),  # not an int: refused as such, not evaluated
])
def test_negative_or_malformed_sizes_are_refused(tmp_path, capsys, setting, field):
    assert train_cli(tmp_path, "--set", setting) == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and field in err
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


@pytest.mark.parametrize("settings", [
    ["replay.windows=1e9"],  # 10^9 windows of 4 latent frames: ~240 GiB
    ["replay.strategy=full", "run.stream_frames=1e12"],  # the whole (absurdly long) stream
])
def test_replay_buffer_larger_than_memory_is_refused(tmp_path, capsys, settings):
    args = [x for s in settings for x in ("--set", s)]
    assert train_cli(tmp_path, *args, "--frames", "20") == 2
    err = capsys.readouterr().err
    assert "replay buffer needs" in err and "GiB" in err and "replay.windows" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()


@pytest.mark.parametrize("settings", [
    ["replay.live=1000000000"],  # the live ring of 10^9 latent frames alone: ~1 TiB
    ["autoencoder.hidden=1000000000"],  # ~100 GiB for one convolution
])
def test_model_or_ring_larger_than_memory_is_refused(tmp_path, capsys, settings):
    """torch's host allocator refuses these with a RuntimeError, not MemoryError: the CLI says so, exit 2."""
    args = [x for s in settings for x in ("--set", s)]
    assert train_cli(tmp_path, *args, "--frames", "20") == 2
    err = capsys.readouterr().err
    assert "out of host memory while setting up the run" in err and "GiB could not be allocated" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()


@pytest.mark.parametrize("settings", [
    ["model.depth=100000000"],  # a hundred million small blocks: minutes of building, then the OOM killer
    ["model.width=131072", "model.heads=4096"],
])
def test_model_beyond_physical_memory_is_refused_before_any_work(tmp_path, capsys, settings):
    args = [x for s in settings for x in ("--set", s)]
    assert train_cli(tmp_path, *args, "--frames", "20") == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and "model.depth=" in err and "GiB" in err and "lower model.width" in err
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made
