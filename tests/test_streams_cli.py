"""`fastdiff streams list | preview | export`, the media writers and the npy:DIR stream."""

import json

import numpy as np
import pytest
from PIL import Image

from fastdiff import media
from fastdiff.cli import main
from fastdiff.streams import StreamError, list_streams, make_stream


def test_list(capsys):
    assert main(["streams", "list"]) == 0
    out = capsys.readouterr().out
    for name, _ in list_streams():
        assert name in out
    assert {n for n, _ in list_streams()} >= {"balls-o", "balls-c", "maze", "video:PATH", "npy:DIR"}


@pytest.mark.parametrize("suffix", ["png", "gif", "mp4"])
def test_preview(tmp_path, suffix):
    out = tmp_path / f"prev.{suffix}"
    assert main(["streams", "preview", "balls-o", "--frames", "12", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    if suffix == "png":
        img = np.asarray(Image.open(out))
        # 12 frames of 32x32 enlarged 4x, 10 per row -> 2 rows
        assert img.shape[1] >= 10 * 128 and img.shape[0] >= 2 * 128
    if suffix == "gif":
        assert Image.open(out).n_frames == 12
    if suffix == "mp4":
        import decord

        assert len(decord.VideoReader(str(out))) == 12


def test_preview_rejects_unknown_suffix(tmp_path, capsys):
    assert main(["streams", "preview", "balls-o", "--frames", "2", "--out", str(tmp_path / "x.bmp")]) == 2
    assert "suffix" in capsys.readouterr().err


def test_export_balls_and_read_back(tmp_path):
    out = tmp_path / "exp"
    args = ["streams", "export", "balls-c", "--frames", "2500", "--out", str(out), "--seed", "3",
            "--split", "test"]
    assert main(args) == 0
    frames = np.load(out / "frames.npy", mmap_mode="r")
    pos, col = np.load(out / "positions.npy"), np.load(out / "colors.npy")
    assert frames.shape == (2500, 32, 32, 3) and frames.dtype == np.uint8
    assert pos.shape == (2500, 2, 2) and pos.dtype == np.float32 and col.dtype == np.int8
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stream"] == "balls-c" and meta["seed"] == 3 and meta["split"] == "test"
    assert meta["fps"] == 10 and meta["window"] == 10
    ref = make_stream("balls-c", seed=3, split="test", total_frames=2500)
    f, p, c = ref.read_with_truth(2500)
    np.testing.assert_array_equal(frames, f)
    np.testing.assert_array_equal(pos, p)
    np.testing.assert_array_equal(col, c)
    s = make_stream(f"npy:{out}")
    assert s.info.length == 2500 and s.info.fps == 10 and s.info.window == 10
    np.testing.assert_array_equal(s.read(10), f[:10])
    state = s.state_dict()
    rest = s.read(5000)
    np.testing.assert_array_equal(rest, f[10:])
    again = make_stream(f"npy:{out}")
    again.load_state_dict(state)
    np.testing.assert_array_equal(next(again), f[10])


def test_export_maze_with_options(tmp_path):
    out = tmp_path / "maze"
    assert main(["streams", "export", "maze", "--frames", "12", "--out", str(out),
                 "--option", "cells=4", "--option", "size=32"]) == 0
    frames = np.load(out / "frames.npy")
    assert frames.shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(frames, make_stream("maze", cells=4, size=32).read(12))
    assert not (out / "positions.npy").exists()
    assert json.loads((out / "meta.json").read_text())["window"] == 20


def test_bad_specs(tmp_path, capsys):
    with pytest.raises(StreamError, match="not one of"):
        make_stream("pong")
    with pytest.raises(StreamError, match="no such file"):
        make_stream(f"npy:{tmp_path}")
    args = ["streams", "export", "video:/nonexistent.mp4", "--frames", "3", "--out", str(tmp_path / "v")]
    assert main(args) == 2
    assert "no such file" in capsys.readouterr().err


def test_media_writers(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    png = media.save_png_strip(frames, tmp_path / "s.png", scale=3, max_cols=2)
    img = np.asarray(Image.open(png))
    assert img.shape == (3 * 21 + 2 * 3, 2 * 27 + 3, 3)
    np.testing.assert_array_equal(img[:21, :27], media.upscale(frames[:1], 3)[0])
    np.testing.assert_array_equal(img[24:45, 30:57], media.upscale(frames[3:4], 3)[0])
    gif = media.save_gif(frames, tmp_path / "a.gif", fps=5, scale=2)
    assert Image.open(gif).size == (18, 14)
    mp4 = media.save_mp4(frames, tmp_path / "a.mp4", fps=5)  # odd sizes are padded to even
    assert mp4.stat().st_size > 0
    with pytest.raises(ValueError, match="uint8"):
        media.save_gif(frames.astype(np.float32), tmp_path / "b.gif")


def test_cli_sets_openmp_waits_before_torch_loads():
    """OMP_WAIT_POLICY only counts if it is set before torch's OpenMP runtime starts: the CLI sets it (unless the
    user chose) while torch is still unloaded, and the command then runs with it. The machine is faked to be
    quiet: the probe's own choice then must be ACTIVE."""
    import os
    import subprocess
    import sys

    probe = ("import os, sys; from fastdiff import cli, host; host.busy_cores = lambda: 0.1; cli.build_parser(); "
             "loaded = 'torch' in sys.modules; "
             "cli.main(['streams', 'list']); print('POLICY', os.environ['OMP_WAIT_POLICY'], loaded)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert "POLICY ACTIVE False" in out
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True,
                         text=True, check=True).stdout
    assert "POLICY PASSIVE False" in out  # the user's choice wins over a quiet machine


def _stat_file(path, ticks_by_cpu):
    """A /proc/stat with one line per cpu: (busy, idle[, waiting for I/O]) ticks, busy split over user and
    system."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for cpu, (busy, idle, *iowait) in enumerate(ticks_by_cpu):
        lines.append(f"cpu{cpu} {busy - busy // 3} 0 {busy // 3} {idle} {sum(iowait)} 0 0 0 0 0")
    path.write_text("\n".join(lines + ["intr 0", "ctxt 0"]) + "\n")


def test_openmp_threads_spin_only_while_no_other_process_uses_the_cores(tmp_path, monkeypatch):
    """Spinning waits are 1.35x faster on an idle machine and much slower on a busy one. The choice follows what
    the cores this process may run on do now (/proc/stat sampled while it sleeps), not the 1-minute load average,
    which still counts a job that has just ended; where neither exists, it sleeps."""
    import os

    from fastdiff import host

    stat = tmp_path / "stat"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # a job ended a moment ago

    def busy_over(after_ticks):
        _stat_file(stat, [(1000, 5000), (1000, 5000), (0, 0)])
        return host.busy_cores(1.0, str(stat), sleep=lambda s: _stat_file(stat, after_ticks))

    # 100 ticks a core pass; cpu2 is outside this process's affinity, and its work does not count
    assert busy_over([(1000, 5100), (1000, 5100), (1100, 0)]) == 0.0
    assert busy_over([(1100, 5000), (1000, 5100), (0, 0)]) == 1.0  # one core busy
    assert busy_over([(1030, 5070), (1000, 5100), (0, 0)]) == 0.3
    assert busy_over([(1000, 5000, 100), (1000, 5100), (0, 0)]) == 0.0  # waiting for a disk is not using a core
    for after, policy in (([(1000, 5100), (1000, 5100), (1100, 0)], "ACTIVE"),
                          ([(1030, 5070), (1010, 5090), (0, 0)], "ACTIVE"),
                          ([(1030, 5070), (1030, 5070), (0, 0)], "PASSIVE"),
                          ([(1100, 5000), (1100, 5000), (0, 0)], "PASSIVE")):
        assert host.openmp_wait_policy(lambda after=after: busy_over(after)) == policy, after

    assert host.busy_cores(0.0, str(tmp_path / "missing")) is None  # no /proc/stat: the load average decides
    assert host.openmp_wait_policy(lambda: None) == "PASSIVE"
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert host.openmp_wait_policy(lambda: None) == "ACTIVE"

    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert host.openmp_wait_policy(lambda: None) == "PASSIVE"


def test_the_cli_keeps_freed_memory_instead_of_faulting_it_in_again(tmp_path):
    """The training step frees and reallocates its activations every step; glibc's default thresholds hand them
    back to the OS and the kernel faults in fresh pages each time (the latent default job: 30 million faults).
    After the CLI's setting, freeing and allocating a 64 MiB block again faults under a quarter as often as with
    glibc's defaults, in the process and in one it starts; a user's own MALLOC_ setting is left alone."""
    import os
    import subprocess
    import sys

    probe = ("import os, resource, subprocess, sys\n"
             "from fastdiff import host\n"
             "took = host.keep_freed_memory() if sys.argv[1] == 'keep' else None\n"
             "def faults():\n"
             "    import numpy as np\n"
             "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
             "    for _ in range(10):\n"
             "        block = np.ones(8 * 2**20); del block\n"
             "    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10\n"
             "child = subprocess.run([sys.executable, __file__, 'child'], capture_output=True, text=True).stdout "
             "if sys.argv[1] == 'keep' else ''\n"
             "print('RESULT', took, faults(), child.strip().split()[-1] if child else '')\n")
    script = tmp_path / "probe.py"
    script.write_text(probe)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def run(mode, extra=None):
        out = subprocess.run([sys.executable, str(script), mode], env={**env, **(extra or {})}, capture_output=True,
                             text=True, check=True).stdout
        return out.split("RESULT")[-1].split()

    took, kept, child = run("keep")
    if took != "True":
        pytest.skip("not glibc: its malloc thresholds cannot be set")
    default = float(run("plain")[1])
    assert float(kept) * 4 < default and float(child) * 4 < default, (kept, child, default)
    assert run("keep", {"MALLOC_TRIM_THRESHOLD_": "131072"})[0] == "False"


def test_cpu_threads_follow_the_cores_this_process_may_use(monkeypatch):
    """run.threads wins; else OMP_NUM_THREADS is left to decide; else the affinity (a taskset or container
    limit), not the machine's core count, which would oversubscribe and spin."""
    import os

    from fastdiff import build

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert build.cpu_threads(0) == 1
    assert build.cpu_threads(5) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert build.cpu_threads(0) is None
    assert build.cpu_threads(3) == 3
