"""Asynchronous ingest: the stream is read ahead on a background thread and encoded a chunk at a time.

    thread:  stream.read(chunk) -> pinned host tensor          (decode / generate, off the training thread)
    side stream (CUDA): H2D copy, non_blocking -> frozen encoder -> latents of the whole chunk
    trainer: takes frame i of the ready chunk (a device slice); the compute stream waits on the chunk's event

One chunk is always in flight ahead of the one being trained on, so a stream that is fast enough never
makes the trainer wait; when it does wait, the time is measured (``wait_seconds``) and reported.
Each chunk carries the stream state from before it was read, which is what a checkpoint stores: resuming
re-reads that chunk and skips to the frame, exactly as the synchronous reader did. A reader error (a
corrupt video, say) is raised in the trainer at the chunk where it happened, never lost in the thread.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from fastdiff.models.autoencoder import encode_frames

CHUNK = 256  # frames read and encoded at once; a checkpoint keeps the stream's state per chunk


@dataclass
class Chunk:
    state: dict  # the stream's state before this chunk was read
    pixels: torch.Tensor  # (n, H, W, 3) uint8 on the training device
    latents: torch.Tensor  # (n, C, h, w) float32 on the training device
    ready: torch.cuda.Event | None = None  # recorded on the side stream once pixels and latents are there

    def __len__(self) -> int:
        return self.pixels.shape[0]


class _End:
    pass


class SyncIngest:
    """The same chunks, read and encoded on the training thread (run.async_ingest=false)."""

    def __init__(self, stream, autoencoder, device: torch.device, *, chunk: int):
        self.stream, self.autoencoder, self.device, self.chunk = stream, autoencoder, device, chunk
        self.wait_seconds = 0.0

    def next_chunk(self) -> Chunk | None:
        started = time.perf_counter()
        state = self.stream.state_dict()
        frames = self.stream.read(self.chunk)
        self.wait_seconds += time.perf_counter() - started
        if len(frames) == 0:
            return None
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        return Chunk(state, pixels, encode_frames(self.autoencoder, pixels))

    def close(self) -> dict | None:
        return None


class AsyncIngest:
    """Chunks of the stream, read ahead on a thread and moved to the device on a side stream."""

    def __init__(self, stream, autoencoder, device: torch.device, *, chunk: int, depth: int = 2):
        self.stream, self.autoencoder, self.device, self.chunk = stream, autoencoder, device, chunk
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.wait_seconds = 0.0
        self._ahead: Chunk | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._pending: collections.deque = collections.deque()  # states of chunks read (or being read), not handed out
        self.thread = threading.Thread(target=self._read_ahead, name="fastdiff-ingest", daemon=True)
        self.thread.start()

    # --- the thread ------------------------------------------------------------------------------------
    def _read_ahead(self) -> None:
        try:
            while not self.stop.is_set():
                state = self.stream.state_dict()
                self._pending.append(state)
                frames = self.stream.read(self.chunk)
                if len(frames) == 0:
                    self._put(_End())
                    return
                pixels = torch.from_numpy(np.ascontiguousarray(frames))
                if self.cuda:
                    pixels = pixels.pin_memory()
                self._put((state, pixels))
        except BaseException as err:  # handed to the trainer, raised there
            self._put(err)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # --- the trainer's side ------------------------------------------------------------------------------
    def _take(self, block: bool):
        started = time.perf_counter()
        try:
            item = self.queue.get(block=block)
        except queue.Empty:
            return None
        if block:
            self.wait_seconds += time.perf_counter() - started
        return item

    def _launch(self, item) -> Chunk:
        """Start the chunk's copy and encode (on the side stream on CUDA)."""
        state, host = item
        if not self.cuda:
            return Chunk(state, host, encode_frames(self.autoencoder, host))
        with torch.cuda.stream(self.side):
            pixels = host.to(self.device, non_blocking=True)
            latents = encode_frames(self.autoencoder, pixels)
            ready = torch.cuda.Event()
            ready.record(self.side)
        return Chunk(state, pixels, latents, ready)

    def next_chunk(self) -> Chunk | None:
        """The next chunk, ready to use on the current stream; None at the end of the stream."""
        if self._ahead is not None:
            chunk, self._ahead = self._ahead, None
        elif self._error is not None:  # met while looking ahead: raised now, at its chunk
            raise self._error
        elif self._ended:
            return None
        else:
            item = self._take(block=True)
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _End):
                self._ended = True
                return None
            chunk = self._launch(item)
        self._pending.popleft()
        if chunk.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(chunk.ready)
            # made on the side stream, used on the compute stream: tell the caching allocator
            chunk.pixels.record_stream(compute)
            chunk.latents.record_stream(compute)
        if not self._ended and self._error is None:  # the following chunk, if read, starts its copy and encode
            item = self._take(block=False)
            if isinstance(item, BaseException):
                self._error = item
            elif isinstance(item, _End):
                self._ended = True
            elif item is not None:
                self._ahead = self._launch(item)
        return chunk

    def close(self) -> dict | None:
        """Stop the reader. Returns the stream state to rewind to (before the first chunk read ahead but not
        handed out), or None when nothing was read ahead."""
        self.stop.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a reader waiting to put
                self.queue.get(timeout=0.05)
        self.thread.join()
        return self._pending[0] if self._pending else None


class FrameFeed:
    """The stream, one frame at a time, as (pixels, latent) on the training device: what the trainer ingests.

    Frames come a chunk at a time from :class:`AsyncIngest` (or :class:`SyncIngest`), the reader started at the
    first chunk's end: the first chunk is read synchronously, because the autoencoder is fitted on its prefix
    before there is anything to encode with. The feed's state (the current chunk's starting stream state, its
    length and the position in it) is what a checkpoint keeps: resuming re-reads exactly that chunk and skips."""

    def __init__(self, stream, autoencoder, device: torch.device, *, async_read: bool, chunk: int | None = None):
        self.stream, self.autoencoder, self.device = stream, autoencoder, device
        self.async_read, self.chunk_size = async_read, chunk or CHUNK
        self.reader: AsyncIngest | SyncIngest | None = None
        self.chunk: Chunk | None = None
        self.position = 0  # next frame of the chunk
        self.wait_before = 0.0  # waiting done by readers already closed

    def read_first(self, frames: int) -> np.ndarray:
        """Read the first chunk (at least `frames` frames) synchronously; returns its frames for the autoencoder
        fit. Call :meth:`encode_first` once the autoencoder can encode."""
        self._first_state = self.stream.state_dict()
        self._first_frames = self.stream.read(max(frames, self.chunk_size))
        return self._first_frames

    def encode_first(self) -> None:
        self.chunk = self._chunk(self._first_state, self._first_frames)
        self.position = 0
        del self._first_state, self._first_frames

    def _chunk(self, state: dict, frames: np.ndarray) -> Chunk:
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        return Chunk(state, pixels, encode_frames(self.autoencoder, pixels))

    @property
    def wait_seconds(self) -> float:
        """Time the trainer spent waiting on the stream."""
        return self.wait_before + (self.reader.wait_seconds if self.reader is not None else 0.0)

    def next(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next frame's pixels (H, W, 3) uint8 and latent (C, h, w), views into the ready chunk; None at the end."""
        if self.chunk is not None and self.position >= len(self.chunk):
            if self.reader is None:
                reader = AsyncIngest if self.async_read else SyncIngest
                self.reader = reader(self.stream, self.autoencoder, self.device, chunk=self.chunk_size)
            self.chunk = self.reader.next_chunk()
            self.position = 0
        if self.chunk is None:
            return None
        self.position += 1
        return self.chunk.pixels[self.position - 1], self.chunk.latents[self.position - 1]

    def close(self) -> None:
        """Stop reading ahead; rewind the stream to the first frame not handed out in a chunk."""
        if self.reader is None:
            return
        rewind = self.reader.close()
        if rewind is not None:
            self.stream.load_state_dict(rewind)
        self.wait_before += self.reader.wait_seconds
        self.reader = None

    def state_dict(self) -> dict:
        return {"chunk_state": self.chunk.state if self.chunk is not None else self.stream.state_dict(),
                "chunk_len": len(self.chunk) if self.chunk is not None else 0, "skip": self.position,
                "info": self.stream.info.__dict__}

    def load_state_dict(self, saved: dict) -> None:
        self.stream.load_state_dict(saved["chunk_state"])
        frames = self.stream.read(max(saved.get("chunk_len", self.chunk_size), saved["skip"]))
        self.chunk = self._chunk(saved["chunk_state"], frames) if len(frames) else None
        self.position = saved["skip"]
