"""The online trainer: one gradient step per arriving frame, live window(s) + replayed windows.

Reads top to bottom: set up (stream, autoencoder, model, optimizer, replay buffer) -> for every frame:
ingest -> step -> insert into the reservoir -> log / checkpoint / sample. This eager path is the
reference the fast path is measured against.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff import checkpoint as ckpt
from fastdiff import distributed, fastpath, ops
from fastdiff.config import Config
from fastdiff.diffusion import Schedule, rollout, training_loss
from fastdiff.ingest import AsyncIngest, Chunk, SyncIngest, encode_chunk
from fastdiff.models.autoencoder import FrameAutoencoder, PixelSpace
from fastdiff.models.dit import VideoDiT
from fastdiff.replay import ReplayBuffer
from fastdiff.strategies import GenerativeDistillation, StreamBank
from fastdiff.streams import make_stream

INGEST_CHUNK = 256  # frames read and encoded at once; the stream's state is saved per chunk


class NonFiniteLoss(RuntimeError):
    pass


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r}: no CUDA device is available on this machine")
    return device


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool


class OnlineTrainer:
    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False, log=print):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        self.world = distributed.current()  # one process unless launched with torchrun
        self.world.check(cfg)
        if not self.world.is_main:
            self.log = lambda *_, **__: None  # rank 0 speaks for every rank
        self.device = self.world.device(pick_device(cfg.run.device))
        ops.use_kernels(cfg.run.kernels)
        # auto: bitsandbytes' 8-bit AdamW; the sync-free fast path needs one that skips on the device: ours.
        opt_name = cfg.optim.name if cfg.optim.name != "auto" else (
            "adamw8bit-bnb" if cfg.run.step == "eager" else "adamw8bit-fused")
        fastpath.check(cfg, self.device, opt_name)  # refuse before any work
        self.autocast_dtype = self._autocast_dtype()
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        random.seed(cfg.run.seed)

        # --- the stream ---------------------------------------------------------------------------
        self.total_frames = cfg.run.frames
        stream_frames = cfg.run.stream_frames or self.total_frames
        stream_spec, stream_seed = self.world.stream_spec(cfg)  # several streams: one per rank
        self.stream = make_stream(stream_spec, split="train", seed=stream_seed, total_frames=stream_frames)
        info = self.stream.info
        if info.length is not None and info.length < self.total_frames:
            log(f"stream {info.name} has {info.length} frames; training on all of them")
            self.total_frames = info.length
        self.window = cfg.run.window or info.window
        if self.total_frames < self.window:
            raise ValueError(f"run.frames={self.total_frames} is shorter than one window of {self.window} frames")
        self.frame_shape = (info.height, info.width, 3)
        self._check_buffer_memory(stream_frames)  # an impossible buffer is refused before the autoencoder is fitted

        # --- frozen autoencoder (fitted on a warm-up prefix of the stream) -------------------------
        if resume and not ckpt.list_checkpoints(self.run_dir / "checkpoints"):
            # Stopped before its first checkpoint (e.g. killed while fitting the autoencoder): nothing was
            # trained that could be lost, so the run starts over, deterministically, from frame 0.
            log(f"{self.run_dir} has no checkpoint yet: starting the run from its first frame")
            resume = False
        self.generator = torch.Generator(device=self.device).manual_seed(self.world.rank_seed(cfg.run.seed))
        # The first chunk is read here, synchronously: the autoencoder is fitted on its warm-up prefix.
        first_state = self.stream.state_dict()
        first_frames = self.stream.read(max(cfg.autoencoder.warmup_frames, INGEST_CHUNK))
        with self.world.main_first():  # rank 0 fits and saves the autoencoder, the other ranks load it
            self.autoencoder = self._build_autoencoder(resume, first_frames)
        self.ingest = None  # the reader of every later chunk, started at the first one (fastdiff/ingest.py)
        self._chunk = self._chunk_from(first_state, first_frames)
        self._chunk_pos = 0
        self.latent_shape = (self.autoencoder.channels, info.height // self.autoencoder.factor,
                             info.width // self.autoencoder.factor)

        # --- model, EMA, optimizer, schedule ---------------------------------------------------------
        m = cfg.model
        self.model = VideoDiT(self.latent_shape[0], self.latent_shape[1], self.latent_shape[2], self.window,
                              width=m.width, depth=m.depth, heads=m.heads, patch=m.patch, mlp_ratio=m.mlp_ratio,
                              checkpoint_activations=m.checkpoint_activations).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        from fastdiff.optim import build_optimizer

        self.optimizer = build_optimizer(opt_name, self.model.parameters(), lr=cfg.optim.lr,
                                         betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                         weight_decay=cfg.optim.weight_decay, fused=cfg.run.step != "eager")
        self.optimizer_name = opt_name
        self.schedule = Schedule.make(cfg.diffusion.schedule, cfg.diffusion.timesteps, self.device)
        self.train_model = torch.compile(self.model, fullgraph=True) if cfg.run.compile else self.model
        self.train_model = self.world.wrap(self.model, self.train_model, cfg.run.compile)  # DDP under torchrun

        # --- replay buffer (or the offline bank / the distillation teacher) ----------------------------
        self.buffer = self._build_buffer(stream_frames)
        self.bank = self._build_bank(stream_spec, stream_seed, stream_frames) if cfg.replay.strategy == "offline" \
            else None
        self.distill = GenerativeDistillation(cfg.replay.teacher_every, cfg.replay.distill_steps,
                                              cfg.replay.distill_weight) if cfg.replay.strategy == "gen-distill" \
            else None
        live_frames = self.window + cfg.replay.live - 1
        self.ring = torch.zeros((live_frames, *self.latent_shape), device=self.device)
        self.ring_pixels = torch.zeros((live_frames, *self.frame_shape), dtype=torch.uint8, device=self.device)
        self.frames_device = torch.zeros((), dtype=torch.long, device=self.device)  # frames_seen, on the device

        # --- counters -------------------------------------------------------------------------------
        self.frames_seen = 0  # frames ingested
        self.steps = 0  # gradient steps taken
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.checkpoint_failures = 0
        self.wait_seconds = 0.0  # time spent waiting on the stream
        self._wait_before = 0.0
        self._tb = None
        if resume:
            self._load_checkpoint()
        self.fast = None if cfg.run.step == "eager" else fastpath.FastStep(self, graph=cfg.run.step == "graph")

    # ----------------------------------------------------------------------------------------------
    def _autocast_dtype(self):
        precision = self.cfg.run.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else None

    def _chunk_from(self, state: dict, frames: np.ndarray) -> Chunk:
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        return Chunk(state, pixels, encode_chunk(self.autoencoder.encode, pixels))

    def _build_autoencoder(self, resume: bool, first_frames: np.ndarray):
        ae_cfg = self.cfg.autoencoder
        if ae_cfg.latent == "none":
            return PixelSpace()
        ae = FrameAutoencoder(ae_cfg.channels, ae_cfg.factor, ae_cfg.hidden).to(self.device)
        path = self.run_dir / "autoencoder.pt"
        if resume or path.exists():
            if not path.exists():
                raise ckpt.CheckpointError(f"{path} is missing: cannot resume a latent run without its autoencoder")
            ae.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
            ae.requires_grad_(False).eval()
            return ae
        prefix = first_frames[: ae_cfg.warmup_frames]
        self.log(f"fitting the frame autoencoder on {len(prefix)} warm-up frames ({ae_cfg.fit_steps} steps)")
        gen = torch.Generator().manual_seed(self.cfg.run.seed + 1)
        mse = ae.fit(prefix, steps=ae_cfg.fit_steps, batch=ae_cfg.fit_batch, lr=ae_cfg.lr, generator=gen,
                     device=self.device)
        self.log(f"autoencoder frozen: reconstruction MSE {mse:.5f} (pixels in [-1, 1])")
        ckpt.atomic_torch_save(ae.state_dict(), path)
        return ae

    def _buffer_plan(self, stream_frames: int) -> tuple[int, tuple, torch.dtype] | None:
        """(capacity in windows, window shape, dtype) of the replay buffer, from the config alone.

        The paper's buffer holds a share of the stream's *frames* (5%: 5,000 windows of 10 frames for 1M
        frames of balls, 2,500 of 20 for the maze), so capacity = fraction * frames / window; `full` keeps
        every window."""
        r, ae = self.cfg.replay, self.cfg.autoencoder
        if r.strategy in ("none", "offline", "gen-distill"):
            return None
        if r.strategy == "full":
            capacity = max(stream_frames - self.window + 1, 1)
        else:
            capacity = r.windows or max(1, round(r.fraction * stream_frames / self.window))
        if r.storage == "pixel":
            return capacity, (self.window, *self.frame_shape), torch.uint8
        channels, factor = (3, 1) if ae.latent == "none" else (ae.channels, ae.factor)
        shape = (self.window, channels, self.frame_shape[0] // factor, self.frame_shape[1] // factor)
        return capacity, shape, torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def _check_buffer_memory(self, stream_frames: int) -> None:
        plan = self._buffer_plan(stream_frames)
        if plan is not None:
            capacity, shape, dtype = plan
            self._check_memory((capacity + 1) * math.prod(shape) * torch.empty((), dtype=dtype).element_size(),
                               "replay buffer")

    def _build_buffer(self, stream_frames: int) -> ReplayBuffer | None:
        plan = self._buffer_plan(stream_frames)
        if plan is None:
            return None
        self._check_buffer_memory(stream_frames)
        capacity, shape, dtype = plan
        mode = "full" if self.cfg.replay.strategy == "full" else "reservoir"
        return self.world.replay_buffer(self.cfg, capacity, shape, dtype=dtype, device=self.device, mode=mode)

    def _build_bank(self, stream_spec: str, stream_seed: int, stream_frames: int) -> StreamBank:
        """The offline baseline's i.i.d. source: a second reader of the same stream, read to the end."""
        frames = min(stream_frames, self.stream.info.length or stream_frames)  # the whole stream, not just the run
        storage_pixels = self.cfg.replay.storage == "pixel"
        dtype = torch.uint8 if storage_pixels else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        per_frame = math.prod(self.frame_shape if storage_pixels else self.latent_shape)
        self._check_memory(frames * per_frame * torch.empty((), dtype=dtype).element_size(),
                           "offline bank (the whole stream)")
        encode = (lambda px: px) if storage_pixels else self.autoencoder.encode
        with make_stream(stream_spec, split="train", seed=stream_seed, total_frames=stream_frames) as stream:
            return StreamBank.from_stream(stream, frames, self.window, encode, dtype=dtype,
                                          device=self.device, log=self.log)

    def _check_memory(self, nbytes: int, what: str) -> None:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            import os

            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if nbytes > free:
            raise MemoryError(
                f"{what} needs {nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on {self.device}; "
                "lower replay.fraction / replay.windows or use replay.storage=pixel"
            )

    def memory_estimate(self) -> dict[str, float]:
        """fastdiff/memory.py's estimate with this run's actual buffer and bank (MiB)."""
        from fastdiff import memory

        return memory.estimate(self.cfg, self.frame_shape[:2], self.window, self.device.type,
                               buffer_bytes=self.buffer.nbytes if self.buffer else 0,
                               bank_bytes=self.bank.nbytes if self.bank else 0)

    # --- ingest -----------------------------------------------------------------------------------
    def _next_frame(self) -> int | None:
        """Index of the next frame in the current chunk (a new chunk when it is used up); None at the end."""
        if self._chunk is not None and self._chunk_pos >= len(self._chunk):
            if self.ingest is None:
                reader = AsyncIngest if self.cfg.run.async_ingest else SyncIngest
                self.ingest = reader(self.stream, self.autoencoder.encode, self.device, chunk=INGEST_CHUNK)
            self._chunk = self.ingest.next_chunk()
            self._chunk_pos = 0
            self.wait_seconds = self._wait_before + self.ingest.wait_seconds
        if self._chunk is None:
            return None
        self._chunk_pos += 1
        return self._chunk_pos - 1

    @torch.no_grad()
    def _ingest(self, index: int) -> None:
        pixels, latent = self._chunk.pixels[index], self._chunk.latents[index]
        # in place: the captured step (fastdiff/fastpath.py) reads these very tensors on every replay
        self.ring[:-1] = self.ring[1:].clone()
        self.ring[-1] = latent.float()
        self.ring_pixels[:-1] = self.ring_pixels[1:].clone()
        self.ring_pixels[-1] = pixels
        self.frames_seen += 1
        self.frames_device += 1

    def _live_windows(self) -> torch.Tensor:
        k, n = self.window, self.cfg.replay.live
        return torch.stack([self.ring[i : i + k] for i in range(n)])  # newest window last

    # --- one online step --------------------------------------------------------------------------
    def _batch(self, live: torch.Tensor) -> torch.Tensor:
        r = self.cfg.replay
        if self.bank is not None:  # offline: every window i.i.d. from the whole stream
            drawn = self.bank.sample(r.live + r.replayed, self.generator)
            if r.storage == "pixel":
                with torch.no_grad():
                    drawn = self.autoencoder.encode(drawn.flatten(0, 1)).view(len(drawn), *live.shape[1:])
            return drawn.float()
        if self.distill is not None:
            return live  # the replayed windows are generated inside the loss
        if self.buffer is None:  # no replay: the batch is filled with the live window
            return live[-1:].expand(r.live + r.replayed, *live.shape[1:])
        if r.replayed == 0:
            return live
        fallback = self.ring_pixels[-self.window :] if r.storage == "pixel" else live[-1]
        replayed = self.buffer.sample(r.replayed, self.generator, fallback)
        if r.storage == "pixel":
            with torch.no_grad():
                replayed = self.autoencoder.encode(replayed.flatten(0, 1)).view(r.replayed, *live.shape[1:])
        return torch.cat([live, replayed.float()])

    def train_step(self, live: torch.Tensor) -> StepResult:
        self.model.train()
        batch = self._batch(live)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if self.distill is not None:
                loss = self.distill.loss(self.train_model, batch, self.cfg.replay.replayed, self.schedule,
                                         self.cfg.diffusion, self.generator)
            else:
                loss = training_loss(self.train_model, batch, self.schedule, self.cfg.diffusion, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        # the eager path syncs here, on purpose; the loss is the mean over ranks so that all skip or step together
        loss_value, norm_value = float(self.world.mean(loss.detach())), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.log(f"frame {self.frames_seen}: non-finite loss/gradient ({loss_value}, {norm_value}); "
                     f"step skipped ({self.skipped} so far)")
            if self.cfg.run.nan_policy == "stop":
                raise NonFiniteLoss(f"non-finite loss at frame {self.frames_seen} (run.nan_policy=stop)")
            return StepResult(loss_value, norm_value, True)
        self.optimizer.step()
        self.steps += 1
        self._update_ema()
        return StepResult(loss_value, norm_value, False)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.optim.ema
        if self.cfg.optim.ema_warmup:
            decay = min(decay, (1 + self.steps) / (10 + self.steps))
        ema_params, params = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    def _insert_live(self) -> None:
        if self.buffer is None:
            return
        start = self.frames_device - self.window  # a device value: the captured step replays it correctly
        window = self.ring_pixels[-self.window :] if self.cfg.replay.storage == "pixel" else self.ring[-self.window :]
        self.buffer.insert(window, start, self.generator)

    # --- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg.run
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from fastdiff.memory import describe

        self.log(describe(self.memory_estimate()))
        metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in the finally below)
        bar = self._progress()
        started, window_start, frames_at_start = time.perf_counter(), time.perf_counter(), self.frames_seen
        last = None
        try:
            while self.frames_seen < self.total_frames:
                frame = self._next_frame()  # an index into the ready chunk
                if frame is None:
                    self.log(f"stream ended after {self.frames_seen} frames")
                    break
                self._ingest(frame)
                if self.frames_seen < self.window + self.cfg.replay.live - 1:
                    continue  # not a full live window yet
                if self.fast is not None:
                    self.fast.step()  # no host sync; results are read below only when logging
                else:
                    last = self.train_step(self._live_windows())
                    self._insert_live()
                if self.distill is not None and self.distill.maybe_refresh(self.ema, self.frames_seen):
                    self.log(f"frame {self.frames_seen}: distillation teacher refreshed from the EMA model")
                if cfg.milestone_every and self.frames_seen % cfg.milestone_every == 0:
                    self.save_milestone()
                if self.frames_seen % cfg.log_every == 0:
                    if self.fast is not None:
                        last = self._sync_fast()
                    now = time.perf_counter()
                    fps = cfg.log_every / max(now - window_start, 1e-9)
                    window_start = now
                    self._log_metrics(metrics, last, fps)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last.loss:.4f}", fps=f"{fps:.1f}", buffer=self._fill_text())
                    elif self.frames_seen % (10 * cfg.log_every) == 0:  # no bar: a plain line now and then
                        self.log(f"frame {self.frames_seen}/{self.total_frames}  loss {last.loss:.4f}  "
                                 f"{fps:.1f} frames/s  buffer {self._fill_text()}  skipped {self.skipped}")
                if bar is not None:
                    bar.update(1)
                if self.frames_seen % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if cfg.sample_every and self.frames_seen % cfg.sample_every == 0:
                    self.write_samples(f"frame{self.frames_seen:08d}")
        finally:
            metrics.close()
            if bar is not None:
                bar.close()
            if self.ingest is not None:  # stop reading ahead; rewind the stream to the first frame not trained on
                rewind = self.ingest.close()
                if rewind is not None:
                    self.stream.load_state_dict(rewind)
                self.ingest = None
                self._wait_before = self.wait_seconds
        if self.fast is not None and self.fast.calls:  # the host's view of the last step and the counters
            last = self._sync_fast()
        self.save_checkpoint()
        self.write_samples("final")
        elapsed = time.perf_counter() - started
        summary = {"frames": self.frames_seen, "steps": self.steps, "skipped_steps": self.skipped,
                   "seconds": elapsed, "frames_per_second": (self.frames_seen - frames_at_start) / max(elapsed, 1e-9),
                   "stream_wait_seconds": self.wait_seconds, "last_loss": last.loss if last else None}
        if self.world.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self._tb is not None:
            self._tb.close()
        return summary

    def _sync_fast(self) -> StepResult:
        """Catch the host counters up with the device (the fast path's only sync, once per log interval)."""
        result, newly_skipped = self.fast.sync()
        if newly_skipped:
            self.log(f"frame {self.frames_seen}: {newly_skipped} step(s) skipped for a non-finite loss/gradient "
                     f"({self.skipped} so far)")
            if self.cfg.run.nan_policy == "stop":
                raise NonFiniteLoss(f"non-finite loss by frame {self.frames_seen} (run.nan_policy=stop)")
        return result

    def _fill_text(self) -> str:
        if self.buffer is None:
            return "off"
        return f"{int(self.buffer.filled())}/{self.buffer.capacity}"  # filled(): this rank's shard under DDP

    def _progress(self):
        if not self.cfg.run.progress or not self.world.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_frames, initial=self.frames_seen, unit="frame", dynamic_ncols=True,
                    desc=f"train {self.cfg.run.stream}")

    def _log_metrics(self, metrics_file, result: StepResult, fps: float) -> None:
        if not self.world.is_main:
            return
        row = {"frame": self.frames_seen, "step": self.steps, "loss": result.loss, "grad_norm": result.grad_norm,
               "skipped_steps": self.skipped, "frames_per_second": fps, "lr": self.cfg.optim.lr,
               "buffer": None if self.buffer is None else int(self.buffer.filled()),
               "stream_wait_seconds": self.wait_seconds, "time": time.time()}
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception as err:  # tensorboard is optional at run time
                self.log(f"tensorboard disabled: {err}")
                self._tb = False
        if self._tb:
            for key in ("loss", "grad_norm", "frames_per_second", "skipped_steps"):
                self._tb.add_scalar(f"train/{key}", row[key], self.frames_seen)

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.optimizer_name,
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "distill": None if self.distill is None else self.distill.state_dict(),
            "ring": self.ring.clone(),
            "ring_pixels": self.ring_pixels.clone(),
            # the chunk's starting state, its length and the position in it: resuming re-reads exactly that chunk
            "stream": {"chunk_state": self._chunk.state if self._chunk is not None else self.stream.state_dict(),
                       "chunk_len": len(self._chunk) if self._chunk is not None else 0, "skip": self._chunk_pos,
                       "info": self.stream.info.__dict__},
            "counters": {"frames_seen": self.frames_seen, "steps": self.steps, "skipped": self.skipped},
            "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def save_checkpoint(self) -> Path | None:
        if self.fast is not None:
            self._sync_fast()
        directory = self.run_dir / "checkpoints"
        state = self.world.gather_checkpoint(self.state_dict(), self.world.stream_specs(self.cfg))
        if state is None:  # not rank 0: its own part went to rank 0, which writes the file
            return None
        try:
            path = ckpt.save_checkpoint(state, directory, self.frames_seen, self.cfg.run.keep_checkpoints)
        except OSError as err:  # e.g. disk full: the previous checkpoint is untouched
            self.checkpoint_failures += 1
            self.log(f"checkpoint at frame {self.frames_seen} failed ({err}); the previous checkpoint is intact")
            if self.cfg.run.disk_full_policy == "stop":
                raise
            return None
        return path

    def save_milestone(self) -> Path | None:
        """The EMA weights at this frame, kept for good (milestones/): `fastdiff eval` turns them into curves."""
        if not self.world.is_main:
            return None
        state = {"config": self.cfg.to_dict(), "ema": self.ema.state_dict(),
                 "stream": {"info": self.stream.info.__dict__},
                 "counters": {"frames_seen": self.frames_seen, "steps": self.steps, "skipped": self.skipped}}
        path = self.run_dir / "milestones" / f"frame{self.frames_seen:010d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            ckpt.atomic_torch_save(state, path)
        except OSError as err:
            self.log(f"milestone at frame {self.frames_seen} not written ({err})")
            return None
        return path

    def _load_checkpoint(self) -> None:
        state, path = ckpt.load_latest(self.run_dir / "checkpoints", map_location=self.device, log=self.log)
        state = self.world.localize_checkpoint(state, self.world.stream_specs(self.cfg), self.device)
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
        except RuntimeError as err:
            raise ckpt.CheckpointError(f"{path} was written by a different model shape: {err}") from None
        saved_opt = state.get("optimizer_name", self.optimizer_name)
        opt_state = state["optimizer"]
        if saved_opt != self.optimizer_name:
            from fastdiff.optim import convert_state_dict

            self.log(f"converting optimizer state {saved_opt} -> {self.optimizer_name}")
            opt_state = convert_state_dict(opt_state, saved_opt, self.optimizer_name, list(self.model.parameters()))
        self.optimizer.load_state_dict(opt_state)
        if self.buffer is not None and state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
        if self.distill is not None and state.get("distill") is not None:
            self.distill.load_state_dict(state["distill"], self.ema)
        self.ring.copy_(state["ring"])
        self.ring_pixels.copy_(state["ring_pixels"])
        saved = state["stream"]
        self.stream.load_state_dict(saved["chunk_state"])
        frames = self.stream.read(max(saved.get("chunk_len", INGEST_CHUNK), saved["skip"]))
        self._chunk = self._chunk_from(saved["chunk_state"], frames) if len(frames) else None
        self._chunk_pos = saved["skip"]
        counters = state["counters"]
        self.frames_seen, self.steps, self.skipped = counters["frames_seen"], counters["steps"], counters["skipped"]
        self.frames_device.fill_(self.frames_seen)
        self.generator.set_state(state["rng"]["generator"].to("cpu") if self.device.type == "cpu"
                                 else state["rng"]["generator"].cpu())
        torch.set_rng_state(state["rng"]["torch"].cpu())
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.log(f"resumed from {path.name} at frame {self.frames_seen} ({self.steps} steps)")

    # --- samples ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, context_frames: int, total: int, seed: int = 0) -> np.ndarray:
        """Roll the EMA model out from the last `context_frames` live frames: uint8 (total, H, W, 3)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        context = self.ring[-context_frames:][None]
        clip_x0 = 1.0 if self.cfg.autoencoder.latent == "none" else None
        video = rollout(self.ema, context, total, self.window, self.schedule, self.cfg.diffusion,
                        generator=gen, clip_x0=clip_x0)
        return self.autoencoder.decode(video[0]).cpu().numpy()

    def write_samples(self, tag: str) -> Path | None:
        if self.frames_seen < self.window or not self.world.is_main:
            return None
        from fastdiff import media

        frames = self.generate(self.window // 2, self.cfg.run.sample_frames, seed=self.cfg.run.seed)
        out = self.run_dir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        scale = max(1, 128 // self.frame_shape[0])
        fps = self.stream.info.fps or 10
        media.save_png_strip(frames, out / f"{tag}.png", scale=scale)
        media.save_gif(frames, out / f"{tag}.gif", fps=fps, scale=scale)
        try:
            media.save_mp4(frames, out / f"{tag}.mp4", fps=fps, scale=scale)
        except Exception as err:  # ffmpeg missing is not worth losing a run over
            self.log(f"mp4 not written ({err})")
        return out / f"{tag}.png"


def new_run_dir(cfg: Config) -> Path:
    stream_slug = cfg.run.stream.replace(":", "_").replace("/", "_")
    name = cfg.run.name or f"{stream_slug}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.run.out) / name
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists; pass --resume {path} to continue it or choose another --name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_config(cfg: Config, run_dir: Path) -> None:
    data = cfg.to_dict()
    ckpt.atomic_write_bytes(run_dir / "config.json", lambda f: f.write(json.dumps(data, indent=2).encode()))
    lines = [f'preset = "{cfg.preset}"']
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {json.dumps(value)}")
    ckpt.atomic_write_bytes(run_dir / "config.toml", lambda f: f.write(("\n".join(lines) + "\n").encode()))


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free
