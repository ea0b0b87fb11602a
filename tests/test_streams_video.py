"""Video streams through decord, on tiny videos written here with PyAV: order, crop / resize / fps,
grayscale and alpha sources, corrupt files under each policy, bad input, exact resume."""

import warnings

import numpy as np
import pytest

av = pytest.importorskip("av")
decord = pytest.importorskip("decord")

from fastdiff.streams import StreamError, make_stream  # noqa: E402


def write_video(path, n=30, h=48, w=64, fps=10, codec="mpeg4", pix="yuv420p", mode="rgb", offset=0,
                options=None):
    c = av.open(str(path), "w", options=options or {})
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, pix
    for i in range(n):
        v = ((i + offset) * 8) % 256
        if mode == "gray":
            img, fmt = np.full((h, w), v, np.uint8), "gray"
        elif mode == "rgba":
            img, fmt = np.zeros((h, w, 4), np.uint8), "rgba"
            img[..., 0], img[..., 3] = v, 128
        elif mode == "noise":  # incompressible: the frames, not the index, make up most of the file
            img, fmt = np.random.RandomState(i).randint(0, 256, (h, w, 3), dtype=np.uint8), "rgb24"
        else:
            img, fmt = np.zeros((h, w, 3), np.uint8), "rgb24"
            img[..., 0] = v
            img[:, : w // 2, 1] = 200
        for p in s.encode(av.VideoFrame.from_ndarray(img, format=fmt)):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    out = {
        "rgb": write_video(d / "rgb.mp4"),
        "gray": write_video(d / "gray.mkv", codec="ffv1", pix="gray", mode="gray"),
        "rgba": write_video(d / "rgba.mkv", codec="ffv1", pix="bgra", mode="rgba"),
        "long": write_video(d / "long.mkv", n=60),
    }
    folder = d / "folder"
    folder.mkdir()
    write_video(folder / "b.mp4", n=12, offset=100)
    write_video(folder / "a.mp4", n=10)
    (folder / "notes.txt").write_text("not a video, ignored by suffix")
    out["folder"] = folder
    data = out["rgb"].read_bytes()
    bad = bytearray(data)
    # fixed garbage in the middle of the frames' data (the mdat box), never in the index (moov): where the file's
    # midpoint falls depends on the encoder's thread count, and a damaged index makes the file unopenable
    mdat = data.index(b"mdat") - 4
    payload = int.from_bytes(data[mdat:mdat + 4], "big") - 8
    assert payload > 1000, payload
    middle = mdat + 8 + payload // 2
    bad[middle:middle + 300] = bytes(range(256)) + bytes(44)
    (d / "garbage.mp4").write_bytes(bytes(bad))
    out["garbage"] = d / "garbage.mp4"
    (d / "trunc.mp4").write_bytes(data[: len(data) // 2])  # moov index at the end: unopenable
    out["trunc_mp4"] = d / "trunc.mp4"
    long = out["long"].read_bytes()
    (d / "trunc.mkv").write_bytes(long[: len(long) * 2 // 3])  # cluster-wise: readable prefix
    out["trunc_mkv"] = d / "trunc.mkv"
    (d / "text.mp4").write_text("hello, not a video\n" * 20)
    out["text"] = d / "text.mp4"
    (d / "empty.mp4").write_bytes(b"")
    out["empty"] = d / "empty.mp4"
    (d / "none").mkdir()
    out["empty_dir"] = d / "none"
    return out


def decord_all(path):
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()


def test_reads_all_frames_in_order(videos):
    s = make_stream(f"video:{videos['rgb']}", batch=7)
    frames = s.read(1000)
    np.testing.assert_array_equal(frames, decord_all(videos["rgb"]))
    assert s.info.length == 30 and s.info.fps == 10 and (s.info.height, s.info.width) == (48, 64)
    with pytest.raises(StopIteration):
        next(s)


def test_folder_and_list(videos):
    a, b = decord_all(videos["folder"] / "a.mp4"), decord_all(videos["folder"] / "b.mp4")
    frames = make_stream(f"video:{videos['folder']}").read(100)
    np.testing.assert_array_equal(frames, np.concatenate([a, b]))  # sorted: a then b
    listed = make_stream(f"video:{videos['folder'] / 'b.mp4'},{videos['folder'] / 'a.mp4'}").read(100)
    np.testing.assert_array_equal(listed, np.concatenate([b, a]))
    from fastdiff.streams.video import VideoStream

    as_list = VideoStream([videos["folder"] / "b.mp4", videos["folder"] / "a.mp4"]).read(100)
    np.testing.assert_array_equal(as_list, listed)


def test_crop_resize_and_fps(videos):
    from PIL import Image

    full = decord_all(videos["long"])
    s = make_stream(f"video:{videos['long']}", crop=(8, 4, 40, 32), size=(20, 25), fps=5)
    got = s.read(1000)
    want = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f[4:36, 8:48])).resize((25, 20),
                                Image.BICUBIC)) for f in full[::2]])
    assert s.info.fps == 5 and s.info.length == 30
    np.testing.assert_array_equal(got, want)
    up = make_stream(f"video:{videos['rgb']}", fps=20).read(1000)  # upsampling repeats frames
    src = decord_all(videos["rgb"])
    assert len(up) == 59
    np.testing.assert_array_equal(up[::2], src)
    np.testing.assert_array_equal(up[1::2], src[np.floor(np.arange(1, 59, 2) / 2 + 0.5).astype(int)])
    paper = make_stream(f"video:{videos['long']}", crop="0,0,48,48", size="16x16")
    assert paper.read(3).shape == (3, 16, 16, 3)


def test_gray_and_alpha_sources_give_rgb(videos):
    gray = make_stream(f"video:{videos['gray']}").read(100)
    assert gray.shape == (30, 48, 64, 3) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    assert abs(int(gray[5, 0, 0, 0]) - 40) <= 3  # frame 5 was written with value 40
    rgba = make_stream(f"video:{videos['rgba']}").read(100)
    assert rgba.shape == (30, 48, 64, 3)
    assert abs(int(rgba[5, 0, 0, 0]) - 40) <= 3 and rgba[5, ..., 1:].max() <= 3


def test_corrupt_video_policies(videos):
    spec = f"video:{videos['garbage']}"
    clean = decord_all(videos["rgb"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = make_stream(spec, on_error="skip", batch=8)
        skipped = s.read(1000)
    assert 0 < len(skipped) < 30 and s.errors
    assert all("garbage.mp4" in m and "frame" in m for m in s.errors)
    assert any("skipped" in str(w.message) for w in caught)
    np.testing.assert_array_equal(skipped[:5], clean[:5])  # frames before the damage are intact
    assert len(skipped) + len(s.errors) == 30  # every frame either delivered or reported

    # decord's threaded decoder does not always fail on the same frame of a damaged file, so each
    # run is checked against its own report
    stop = make_stream(spec, on_error="stop", batch=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stopped = stop.read(1000)
    assert len(stop.errors) == 1 and any("stream stopped" in str(w.message) for w in caught)
    first_bad = int(stop.errors[0].split("frame ")[1].split()[0])
    assert len(stopped) == first_bad  # everything before the first bad frame, then a clean end
    np.testing.assert_array_equal(stopped[:5], clean[:5])
    with pytest.raises(StopIteration):
        next(stop)

    s = make_stream(spec, on_error="raise", batch=8)
    with pytest.raises(StreamError, match=r"garbage\.mp4: frame \d+ cannot be decoded"):
        s.read(1000)


def test_truncated_files(videos):
    with pytest.raises(StreamError, match="trunc.mp4"):
        make_stream(f"video:{videos['trunc_mp4']}")
    s = make_stream(f"video:{videos['trunc_mkv']}", on_error="raise")
    frames = s.read(1000)
    full = decord_all(videos["long"])
    assert 0 < len(frames) < 60
    np.testing.assert_array_equal(frames[:20], full[:20])


@pytest.mark.parametrize("key,match", [("text", "cannot be opened as a video"), ("empty", "empty file"),
                                       ("empty_dir", "no video files")])
def test_bad_inputs_fail_at_construction(videos, key, match):
    with pytest.raises(StreamError, match=match):
        make_stream(f"video:{videos[key]}")


def test_missing_path_and_bad_options(videos, tmp_path):
    with pytest.raises(StreamError, match="no such file"):
        make_stream(f"video:{tmp_path / 'missing.mp4'}")
    with pytest.raises(StreamError, match="no such file"):  # one bad entry in a list fails the lot
        make_stream(f"video:{videos['rgb']},{tmp_path / 'missing.mp4'}")
    with pytest.raises(StreamError, match="on_error"):
        make_stream(f"video:{videos['rgb']}", on_error="ignore")
    with pytest.raises(StreamError, match="crop"):
        make_stream(f"video:{videos['rgb']}", crop=(0, 0, 100, 10))
    with pytest.raises(StreamError, match="different frame sizes"):
        make_stream(f"video:{videos['rgb']},{write_video(tmp_path / 's.mp4', n=3, h=32, w=32)}")


@pytest.mark.parametrize("cut", [0, 5, 8, 13, 21])
def test_resume_is_exact(videos, cut):
    spec = f"video:{videos['folder']}"
    ref = make_stream(spec, batch=4, fps=7)
    ref.read(cut)
    state = ref.state_dict()
    expect = ref.read(100)
    s = make_stream(spec, batch=4, fps=7)
    s.load_state_dict(state)
    np.testing.assert_array_equal(s.read(100), expect)
    assert s.position == ref.position
    with pytest.raises(StreamError, match="other files"):
        make_stream(f"video:{videos['rgb']}").load_state_dict(state)
