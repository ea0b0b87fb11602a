"""Asynchronous ingest (fastdiff/ingest.py): the same chunks as the synchronous reader, errors raised in
the trainer, the stream rewound on close, waits measured; the trainer's numbers do not depend on it, and
a run resumed inside its first (warm-up) chunk reads the right frames."""

import time

import numpy as np
import pytest
import torch
from test_train import _cfg, _params, _stop_at

import fastdiff.ingest as ingest_module
from fastdiff.ingest import AsyncIngest, SyncIngest
from fastdiff.streams import make_stream
from fastdiff.streams.base import StreamError
from fastdiff.train import OnlineTrainer

QUIET = lambda *_, **__: None  # noqa: E731
class ENCODE:  # a stand-in autoencoder: grey, 4x smaller
    encode = staticmethod(lambda pixels: pixels.float().mean(-1, keepdim=True).permute(0, 3, 1, 2)[:, :, ::4, ::4])


def _chunks(reader):
    out = []
    while (chunk := reader.next_chunk()) is not None:
        out.append(chunk)
    reader.close()
    return out


class _FiniteStream:
    """700 frames of the balls stream, then the end (the generated streams themselves are endless)."""

    def __init__(self, frames=700):
        self.inner, self.left = make_stream("balls-o", total_frames=frames), frames

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "left": self.left}

    def read(self, n):
        frames = self.inner.read(min(n, self.left))
        self.left -= len(frames)
        return frames


def test_async_reader_yields_the_synchronous_chunks():
    sync = _chunks(SyncIngest(_FiniteStream(), ENCODE, torch.device("cpu"), chunk=128))
    lazy = _chunks(AsyncIngest(_FiniteStream(), ENCODE, torch.device("cpu"), chunk=128))
    assert [len(c) for c in lazy] == [len(c) for c in sync] == [128] * 5 + [60]
    for a, b in zip(sync, lazy):
        assert torch.equal(a.pixels, b.pixels) and torch.equal(a.latents, b.latents)
        assert a.state == b.state


class _FailingStream:
    """Chunks of random frames, then a decode error at frame `fail_at` (as a corrupt video raises)."""

    def __init__(self, fail_at=300, delay=0.0):
        self.position, self.fail_at, self.delay = 0, fail_at, delay
        self.rng = np.random.default_rng(0)

    def state_dict(self):
        return {"position": self.position}

    def read(self, n):
        time.sleep(self.delay)
        if self.position + n > self.fail_at:
            raise StreamError(f"video: decode error at frame {self.fail_at}")
        self.position += n
        return self.rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)


def test_reader_errors_surface_in_the_trainer_at_their_chunk():
    reader = AsyncIngest(_FailingStream(fail_at=300), ENCODE, torch.device("cpu"), chunk=100)
    first = reader.next_chunk()
    time.sleep(0.3)  # the reader runs ahead to the error: the look-ahead meets it before chunk 3 is handed out
    assert [len(first)] + [len(reader.next_chunk()) for _ in range(2)] == [100, 100, 100]
    with pytest.raises(StreamError, match="decode error at frame 300"):
        reader.next_chunk()
    reader.close()


def test_close_rewinds_to_the_first_chunk_not_handed_out():
    stream = make_stream("balls-o", total_frames=2000)
    reader = AsyncIngest(stream, ENCODE, torch.device("cpu"), chunk=100, depth=3)
    first = reader.next_chunk()
    time.sleep(0.3)  # let the thread read ahead
    rewind = reader.close()
    assert rewind is not None and rewind["position"] == 100
    stream.load_state_dict(rewind)
    fresh = make_stream("balls-o", total_frames=2000)
    fresh.read(100)
    assert np.array_equal(stream.read(100), fresh.read(100))
    assert len(first) == 100


def test_waiting_on_a_slow_stream_is_measured():
    reader = AsyncIngest(_FailingStream(fail_at=10**9, delay=0.2), ENCODE, torch.device("cpu"), chunk=10)
    reader.next_chunk()
    reader.next_chunk()
    assert reader.wait_seconds >= 0.2
    reader.close()


def test_training_does_not_depend_on_async_ingest(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_module, "CHUNK", 16)  # several chunks in a short run
    runs = {}
    for flag in ("true", "false"):
        trainer = OnlineTrainer(_cfg(tmp_path, run__frames=70, run__async_ingest=flag, run__checkpoint_every=1000),
                                tmp_path / flag, log=QUIET)
        trainer.train()
        runs[flag] = _params(trainer)
    assert all(torch.equal(runs["true"][k], runs["false"][k]) for k in runs["true"])


def test_resume_inside_the_first_warmup_chunk_reads_the_right_frames(tmp_path, monkeypatch):
    """Regression: the first chunk is as long as the autoencoder's warm-up prefix; a checkpoint taken inside
    it, past one ordinary chunk, used to resume by re-reading an ordinary chunk and train on wrong frames."""
    monkeypatch.setattr(ingest_module, "CHUNK", 16)
    extra = {"autoencoder__warmup_frames": 48, "run__checkpoint_every": 30}
    straight = OnlineTrainer(_cfg(tmp_path, run__frames=40, **extra), tmp_path / "a", log=QUIET)
    straight.train()
    _stop_at(OnlineTrainer(_cfg(tmp_path, run__frames=40, **extra), tmp_path / "b", log=QUIET), 30)
    resumed = OnlineTrainer(_cfg(tmp_path, run__frames=40, **extra), tmp_path / "b", resume=True, log=QUIET)
    assert resumed.feed.position == 30 and len(resumed.feed.chunk) == 48
    resumed.train()
    assert torch.equal(straight.step.ring, resumed.step.ring)
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
