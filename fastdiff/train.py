"""The online trainer: one gradient step per arriving frame, live window(s) + replayed windows.

Reads top to bottom: set up (stream, autoencoder fitted on a warm-up prefix, the online step) -> for every
frame: ingest, step (:meth:`OnlineTrainer.advance`) -> log, checkpoint, milestone, sample. The step itself,
its three modes and its state live in fastdiff/step.py; the components are built in fastdiff/build.py.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from fastdiff import build, config, distributed, ops
from fastdiff import checkpoint as ckpt
from fastdiff.config import Config
from fastdiff.diffusion import rollout
from fastdiff.ingest import FrameFeed
from fastdiff.models.autoencoder import rollout_space
from fastdiff.replay import merge_shards, resize_reservoir
from fastdiff.step import OnlineStep, StepResult, check_mode
from fastdiff.strategies import GenerativeDistillation, StreamBank
from fastdiff.streams import make_stream, parse_stream_options

# run.minutes: frames trained in this process before the pace is trusted to plan the run's end
PACE_FRAMES = 100
# run.minutes: the recent pace is measured over about this many frames. A CPU slows under sustained load (the
# latent default job on 2 idle cores: 11 frames/s at its start, 8.3 at its end, and the sample's model calls 1.33x
# slower than when they were timed at frame 100), so the plan follows the recent pace, not only the mean.
RECENT_FRAMES = 250
# run.minutes: the final sample is timed again, once, when the training left in the plan falls to this share of the
# training done, and the plan keeps the slower of the two timings. A shared CPU's speed drifts (this box: the pixel
# model trained at 10 frames/s, then at 5 ten minutes later), so a timing taken nearer the end catches a machine
# that slowed since the first; keeping a faster second timing instead let a pixel default job plan 191 s for a
# sample that took 248 (its first timing: 244 s), and it ran 57 s past its limit.
RETIME_SHARE = 0.5


class OnlineTrainer:
    """One run: `resume` continues the run in `run_dir` from its newest readable checkpoint. Its replay buffer keeps
    the capacity the run was created with (written into its config.json) whatever `run.frames` says now, unless
    `resize_buffer` asks for `replay.windows` (fastdiff/replay.py: resize_reservoir says how it stays uniform)."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume: bool = False, resize_buffer: bool = False, log=print,
                 started: float | None = None):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        # run.minutes counts from `started` (time.monotonic(); the CLI passes its process's start), else from now
        self.clock = time.monotonic  # run.minutes' clock (a test may set its own)
        self.deadline = None
        if cfg.run.minutes > 0:
            self.deadline = (self.clock() if started is None else started) + 60 * cfg.run.minutes
        self.world = distributed.current()  # one process unless launched with torchrun
        self.world.check(cfg)
        if not self.world.is_main:
            self.log = lambda *_, **__: None  # rank 0 speaks for every rank
        self.device = self.world.device(build.pick_device(cfg.run.device))
        threads = build.cpu_threads(cfg.run.threads)
        if threads is not None:
            torch.set_num_threads(threads)
        ops.use_kernels(cfg.run.kernels)
        torch.manual_seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        random.seed(cfg.run.seed)

        if resume and not ckpt.list_checkpoints(self.run_dir / "checkpoints"):
            # Stopped before its first checkpoint (e.g. killed while fitting the autoencoder): nothing was
            # trained that could be lost, so the run starts over, deterministically, from frame 0.
            log(f"{self.run_dir} has no checkpoint yet: starting the run from its first frame")
            resume = False
        saved = None
        if resume:
            if self.world.is_main:
                ckpt.remove_interrupted_writes(self.run_dir / "checkpoints")
            saved = ckpt.load_latest(self.run_dir / "checkpoints", map_location=self.device, log=self.log)

        # --- the stream ---------------------------------------------------------------------------------------
        self.total_frames = cfg.run.frames
        stream_frames = cfg.run.stream_frames or self.total_frames  # the stream's nominal length (balls-c drifts)
        self.streams = self.world.stream_specs(cfg)  # several streams under torchrun: one per rank
        stream_spec, stream_seed = self.world.stream_spec(cfg)
        self.stream = make_stream(stream_spec, split="train", seed=stream_seed, total_frames=stream_frames,
                                  **parse_stream_options(cfg.run.stream_options))
        info = self.stream.info
        if info.length is not None and info.length < self.total_frames:
            log(f"stream {info.name} has {info.length} frames; training on all of them")
            self.total_frames = info.length
        self.window = cfg.run.window or info.window
        if self.total_frames < self.window:
            raise ValueError(f"run.frames={self.total_frames} is shorter than one window of {self.window} frames")
        if cfg.diffusion.rollout_observed >= self.window:
            raise ValueError(f"diffusion.rollout_observed={cfg.diffusion.rollout_observed} not supported because it "
                             f"leaves no frame to generate in the stream's window of {self.window} frames")
        self.frame_shape = (info.height, info.width, 3)
        buffer_plan = self._buffer_plan(stream_frames, saved[0] if saved else None, resize_buffer)
        if buffer_plan is not None:  # an impossible buffer is refused before the autoencoder is fitted
            build.check_memory(build.buffer_bytes(buffer_plan), "replay buffer", self.device)
        optimizer_name = config.optimizer_name(cfg, self.device.type)
        check_mode(cfg, self.device, optimizer_name)  # so is a step it cannot take
        if not resume:  # what the run is created with, kept in its config.json: the stream's length, the capacity
            cfg.run.stream_frames = stream_frames
            if buffer_plan is not None and cfg.replay.strategy != "full":
                cfg.replay.windows = buffer_plan[0]

        # --- the frozen autoencoder, fitted on a warm-up prefix of the stream ---------------------------------
        generator = torch.Generator(device=self.device).manual_seed(self.world.rank_seed(cfg.run.seed))
        self.feed = FrameFeed(self.stream, None, self.device, async_read=cfg.run.async_ingest)
        first_frames = self.feed.read_first(cfg.autoencoder.warmup_frames)
        autocast = build.autocast_dtype(cfg.run.precision, self.device)  # the autoencoder's fit and the step's
        with self.world.main_first():  # rank 0 fits and saves the autoencoder, the other ranks load it
            self.autoencoder = self._fitted_autoencoder(resume, first_frames, autocast)
        self.feed.autoencoder = self.autoencoder
        self.feed.encode_first()
        self.latent_shape = build.latent_shape(cfg.autoencoder, self.frame_shape[:2])

        # --- the online step: model, EMA, optimizer, schedule, replay, live ring --------------------------------
        self.step = OnlineStep(
            cfg, build.model(cfg.model, self.latent_shape, self.window, self.device, cfg.diffusion),
            optimizer_name=optimizer_name,
            window=self.window, latent_shape=self.latent_shape, frame_shape=self.frame_shape, device=self.device,
            total_frames=self.total_frames, generator=generator,
            autocast=autocast,
            buffer=self._replay_buffer(buffer_plan),
            bank=self._offline_bank(stream_spec, stream_seed, stream_frames) if cfg.replay.strategy == "offline"
            else None,
            distill=GenerativeDistillation(cfg.replay.teacher_every, cfg.replay.distill_steps,
                                           cfg.replay.distill_weight) if cfg.replay.strategy == "gen-distill" else None,
            autoencoder=self.autoencoder, world=self.world, log=self.log)
        self.frame_limit = self.total_frames  # what run.minutes may shorten the run from, never exceed
        self.final_sample_seconds: float | None = None  # run.minutes: the final sample's estimated time
        self.final_sample_timings: list[tuple[int, float]] = []  # run.minutes: (frames seen, seconds) of each timing
        self.final_sample_pace: float | None = None  # run.minutes: the recent seconds a frame when it was estimated
        self.final_sample_planned: float | None = None  # run.minutes: the estimate at the recent pace, last planned
        # run.minutes: (clock less the time off pace, frames) at recent checks
        self.pace_marks: deque[tuple[float, int]] = deque()
        self.off_pace_seconds = 0.0
        self.checkpoint_failures = 0
        self._tb = None
        self.resumed_at: int | None = None  # the checkpoint's frame, when this process resumed the run
        self.interrupted = False
        if saved is not None:
            self.load_checkpoint(*saved)
        elif self.world.is_main:
            write_config(cfg, self.run_dir)  # with the resolved stream length and buffer capacity

    # --- set-up helpers ------------------------------------------------------------------------------------------
    def _fitted_autoencoder(self, resume: bool, first_frames: np.ndarray, autocast: torch.dtype | None):
        ae_cfg = self.cfg.autoencoder
        path = self.run_dir / "autoencoder.pt"
        if ae_cfg.latent == "none":
            return build.autoencoder(ae_cfg, self.device)
        if resume or path.exists():
            if not path.exists():
                raise ckpt.CheckpointError(f"{path} is missing: cannot resume a latent run without its autoencoder")
            return build.load_autoencoder(ae_cfg, path, self.device)
        if ae_cfg.load:
            if not Path(ae_cfg.load).is_file():
                raise ValueError(f"autoencoder.load: {ae_cfg.load} is not a file (an earlier run's autoencoder.pt)")
            try:
                ae = build.load_autoencoder(ae_cfg, ae_cfg.load, self.device)
            except RuntimeError as error:  # another width, channel count or colour code
                raise ValueError(f"autoencoder.load: {ae_cfg.load} does not fit this run's autoencoder settings "
                                 f"(hidden, channels, factor, colour): {error}") from error
            self.log(f"autoencoder loaded from {ae_cfg.load} (not fitted)")
            ckpt.atomic_torch_save(ae.state_dict(), path)
            return ae
        ae = build.autoencoder(ae_cfg, self.device)
        prefix = first_frames[: ae_cfg.warmup_frames]
        self.log(f"fitting the frame autoencoder on {len(prefix)} warm-up frames ({ae_cfg.fit_steps} steps)")
        gen = torch.Generator().manual_seed(self.cfg.run.seed + 1)
        from tqdm import tqdm

        with tqdm(total=ae_cfg.fit_steps, unit="step", desc="autoencoder fit", leave=False,
                  disable=None if self.cfg.run.progress and self.world.is_main else True) as bar:
            def progress(step, loss):
                bar.update(step + 1 - bar.n)
                bar.set_postfix(loss=f"{loss:.4f}")

            mse = ae.fit(prefix, steps=ae_cfg.fit_steps, batch=ae_cfg.fit_batch, lr=ae_cfg.lr, generator=gen,
                         device=self.device, progress=progress, autocast=autocast)
        self.log(f"autoencoder frozen: reconstruction MSE {mse:.5f} (pixels in [-1, 1])")
        ckpt.atomic_torch_save(ae.state_dict(), path)
        return ae

    def _buffer_plan(self, stream_frames: int, saved: dict | None, resize: bool):
        """The replay buffer's (capacity, window shape, dtype). On resume the capacity is the checkpoint's unless a
        resize is asked for; `full` replay follows the run's length (it keeps every window, so growing is exact)."""
        length = max(stream_frames, self.total_frames) if self.cfg.replay.strategy == "full" else stream_frames
        plan = build.buffer_plan(self.cfg, self.window, self.frame_shape, length, self.device)
        saved_buffer = saved.get("buffer") if saved else None
        if plan is None or saved_buffer is None or saved_buffer["capacity"] == plan[0]:
            return plan
        if resize or self.cfg.replay.strategy == "full" and plan[0] > saved_buffer["capacity"]:
            self.log(f"replay buffer resized from {saved_buffer['capacity']} to {plan[0]} windows")
            return plan
        self.log(f"replay buffer keeps the {saved_buffer['capacity']} windows the run was created with "
                 f"(--resize-buffer N changes it)")
        return (saved_buffer["capacity"], *plan[1:])

    def _replay_buffer(self, plan):
        """The reservoir; under torchrun with one shared stream, this rank's shard of it."""
        if plan is None:
            return None
        shared = self.world.active and not self.streams
        shard = (self.world.rank, self.world.size) if shared else (0, 1)
        seed = distributed.derive_seed(self.cfg.run.seed, -1) if shared else None  # alike on every rank
        return build.replay_buffer(self.cfg.replay, plan, self.device, shard=shard, insert_seed=seed)

    def _offline_bank(self, stream_spec: str, stream_seed: int, stream_frames: int) -> StreamBank:
        """The offline baseline's i.i.d. source: a second reader of the same stream, read to the end."""
        frames = min(stream_frames, self.stream.info.length or stream_frames)  # the whole stream, not just the run
        build.check_memory(build.bank_bytes(self.cfg, frames, self.frame_shape, self.device),
                           "offline bank (the whole stream)", self.device)
        pixels = self.cfg.replay.storage == "pixel"
        dtype = torch.uint8 if pixels else build.storage_dtype(self.device)
        with make_stream(stream_spec, split="train", seed=stream_seed, total_frames=stream_frames,
                         **parse_stream_options(self.cfg.run.stream_options)) as stream:
            return StreamBank.from_stream(stream, frames, self.window, None if pixels else self.autoencoder,
                                          dtype=dtype, device=self.device, log=self.log)

    def memory_estimate(self) -> dict[str, float]:
        """fastdiff/memory.py's estimate with this run's actual buffer and bank (MiB)."""
        from fastdiff import memory

        buffer, bank = self.step.buffer, self.step.bank
        return memory.estimate(self.cfg, self.frame_shape[:2], self.window, self.device.type,
                               buffer_bytes=buffer.nbytes if buffer else 0, bank_bytes=bank.nbytes if bank else 0)

    # --- counters (the step's, as the host last saw them) --------------------------------------------------------
    @property
    def frames_seen(self) -> int:
        return self.step.frames_seen

    @property
    def steps(self) -> int:
        return self.step.steps

    @property
    def skipped(self) -> int:
        return self.step.skipped

    # --- the loop ------------------------------------------------------------------------------------------------
    def advance(self) -> bool:
        """Ingest the next frame of the stream and, once the live window is full, take its gradient step.
        False when the stream has ended."""
        frame = self.feed.next()
        if frame is None:
            return False
        self.step.ingest(*frame)
        if self.step.ready:
            self.step.step()  # device / graph: no host sync; results are read when logging
        return True

    def train(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from fastdiff.memory import describe

        self.log(describe(self.memory_estimate()))
        metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (closed in the finally below)
        bar = self._progress()
        started, frames_at_start = time.perf_counter(), self.frames_seen
        if self.resumed_at is None:  # a checkpoint before the first step: from here on a kill loses at most the
            self.save_checkpoint()  # steps since the newest checkpoint, and never the autoencoder's fit
        try:
            with StopOnSignal(self.log) as stop:
                self._loop(metrics, bar, stop)
        finally:
            metrics.close()
            if bar is not None:
                bar.close()
            self.feed.close()  # stop reading ahead; rewind the stream to the first frame not trained on
        self.interrupted = stop.signal is not None
        last = self.step.result()  # the host's view of the last step and the counters
        self.save_checkpoint()
        if self.interrupted:
            self.log(f"stopped by {stop.signal} at frame {self.frames_seen}: checkpoint written; continue with\n"
                     f"  fastdiff train --resume {self.run_dir}")
        elapsed = time.perf_counter() - started
        summary = {"frames": self.frames_seen, "steps": self.steps, "skipped_steps": self.skipped,
                   "seconds": elapsed, "frames_per_second": (self.frames_seen - frames_at_start) / max(elapsed, 1e-9),
                   "stream_wait_seconds": self.feed.wait_seconds,
                   "last_loss": last.loss if self.step.calls else None, "interrupted": self.interrupted}
        if not self.interrupted:  # an extended run keeps the earlier final samples: the tag names the frame
            from fastdiff import evaluate

            tag = f"final-frame{self.frames_seen:08d}"
            final = self.final_heldout_sample(tag)
            if final is not None:
                summary["final_sample"] = final
                self.log(evaluate.describe_final_sample(final))
            else:
                path = self.write_samples(tag)
                if path is not None:
                    self.log(f"final sample: {path}")
        if self.deadline is not None:  # what the time limit did: the frames it allowed, the time it planned for
            summary["time_limit"] = {"minutes": self.cfg.run.minutes, "frame_limit": self.frame_limit,
                                     "shortened": self.total_frames < self.frame_limit,
                                     "final_sample_estimate_seconds": self.final_sample_seconds,
                                     "final_sample_timings": self.final_sample_timings,
                                     "final_sample_planned_seconds": self.final_sample_planned,
                                     "seconds_left": round(self.deadline - self.clock(), 1)}
        if self.world.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self._tb is not None:
            self._tb.close()
        return summary

    def _loop(self, metrics, bar, stop) -> None:
        """Frame by frame until the run's length, the stream's end or a signal: step, log, checkpoint, sample."""
        cfg = self.cfg.run
        window_start = time.perf_counter()
        paced_from = (self.clock(), self.frames_seen)  # run.minutes: the pace is measured from here
        self.pace_marks = deque([(paced_from[0] - self.off_pace_seconds, self.frames_seen)])
        while self.frames_seen < self.total_frames and stop.signal is None:
            if not self.advance():
                self.log(f"stream ended after {self.frames_seen} frames")
                break
            if not self.step.ready:
                continue  # not a full live window yet
            if cfg.milestone_every and self.frames_seen % cfg.milestone_every == 0:
                with self._off_pace():
                    self.save_milestone()
                    self._score_milestone(metrics)
            if self.deadline is not None and self.frames_seen % cfg.log_every == 0:
                self._fit_to_deadline(*paced_from)
            if self.frames_seen % cfg.log_every == 0:
                last = self.step.result()
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
                with self._off_pace():
                    self.save_checkpoint()
            if cfg.sample_every and self.frames_seen % cfg.sample_every == 0:
                with self._off_pace():
                    self.write_samples(f"frame{self.frames_seen:08d}")

    @contextmanager
    def _off_pace(self):
        """run.minutes: time spent here (checkpoints, samples, milestones) is left out of the recent pace, which
        gauges the machine's speed; the mean pace keeps it, as those recur over the run."""
        started = self.clock()
        try:
            yield
        finally:
            self.off_pace_seconds += self.clock() - started

    def _fit_to_deadline(self, since: float, frames_then: int) -> None:
        """run.minutes: plan the run's last frame so that the rest of training and the final sample end by the
        deadline, between now and the frame limit. Frames go at the slower of the pace since `since` (checkpoints
        and samples included) and the training pace over the last RECENT_FRAMES (without them: a milestone's sample
        is not the machine slowing); the final sample's estimate grows as the recent pace slows from where it was
        when the sample was timed. The cool-down is replanned with it. Rank 0 decides for every rank."""
        now = self.clock()
        marks = self.pace_marks
        marks.append((now - self.off_pace_seconds, self.frames_seen))
        while len(marks) > 2 and self.frames_seen - marks[1][1] >= RECENT_FRAMES:
            marks.popleft()
        trained = self.frames_seen - frames_then
        if trained < PACE_FRAMES:
            return
        recent = (marks[-1][0] - marks[0][0]) / max(self.frames_seen - marks[0][1], 1)
        first = self.final_sample_seconds is None
        if first or self._sample_timing_due(now, since):
            with self._off_pace():
                seconds = self.world.run_on_main(self.estimate_final_sample_seconds)
            self.final_sample_timings.append((self.frames_seen, seconds))
            if not first:
                self.log(f"run.minutes={self.cfg.run.minutes:g}: the final sample timed again at frame "
                         f"{self.frames_seen}: {seconds:.0f} s (planned: {self.final_sample_planned:.0f} s)")
            if first or seconds > self.final_sample_planned:  # the slower timing plans
                self.final_sample_seconds, self.final_sample_pace = seconds, recent
            now = self.clock()
        # the sample's calls slow down with the training steps, the plan's frames go at the slower of the mean
        # and the recent pace
        sample_seconds = self.final_sample_seconds * max(1.0, recent / self.final_sample_pace)
        self.final_sample_planned = sample_seconds
        pace = max((now - since) / trained, recent)
        fits = self.frames_seen + int((self.deadline - now - sample_seconds) / pace)
        total = self.world.broadcast_object(min(max(fits, self.frames_seen), self.frame_limit))
        if total == self.total_frames:
            return
        if abs(total - self.total_frames) >= 0.02 * self.frame_limit or total == self.frames_seen:
            self.log(f"run.minutes={self.cfg.run.minutes:g}: at {1 / pace:.1f} frames/s, leaving "
                     f"{sample_seconds:.0f} s for the final sample, the run ends at frame {total} "
                     f"(run.frames={self.frame_limit})")
        self.total_frames = total
        self.step.plan(total)

    def _sample_timing_due(self, now: float, since: float) -> bool:
        """run.minutes: whether to time the final sample again (once, RETIME_SHARE). Rank 0 decides for every rank,
        as the timing is a collective call."""
        if len(self.final_sample_timings) != 1:
            return False
        training_left = self.deadline - now - self.final_sample_planned
        return self.world.broadcast_object(training_left <= RETIME_SHARE * (now - since))

    @torch.no_grad()
    def estimate_final_sample_seconds(self) -> float:
        """What the run's final sample will take: its model calls (diffusion.rollout_model_calls) times a call of
        the EMA model on the sample's batch, timed here. The sampler's own arithmetic, the decoding and the scoring
        are small beside the calls (a latent default job's sample: 113 of its 122 s in the rollout, 3 in the floors
        and the forecast). A machine that slows down after this timing is the caller's to follow
        (_fit_to_deadline), and the rest is tiny's margin (9.5 of the default job's 10 minutes)."""
        from fastdiff import evaluate
        from fastdiff.diffusion import observed_frames, rollout_model_calls

        if self.final_is_heldout():
            videos, context, total = evaluate.final_sample_size(self.cfg.run.final_clips)
        else:  # write_samples: one video from half a window of live frames
            videos, context, total = 1, self.sample_context(), self.cfg.run.sample_frames
        batch = min(videos, evaluate.EvalOptions.batch)
        calls = rollout_model_calls(self.cfg.diffusion, self.window, context, total) * -(-videos // batch)
        if self.cfg.diffusion.history_guidance:  # each call predicts with and without the history
            batch *= 2
        x = torch.randn(batch, self.window, *self.latent_shape, device=self.device)
        observed = (torch.arange(self.window, device=self.device) < observed_frames(self.cfg.diffusion, self.window))
        observed = observed.expand(batch, -1)
        t = torch.full((batch, self.window), self.step.schedule.timesteps // 2, device=self.device).masked_fill(
            observed, 0)
        seconds = []
        for _ in range(4):  # the first call warms the allocator and any lazy initialisation up
            started = time.perf_counter()
            self.step.ema(x, t.float(), observed)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds.append(time.perf_counter() - started)
        # the median of the other three: a call's time varies by 10-40% from one moment to the next on a CPU (a
        # latent default job: one call read 0.43 s where the sample's calls took 0.30 s each). A machine that
        # slows down later is the caller's to follow; the slowest of three, tried with the caller's scaling,
        # read 0.56 s where the pixel default job's calls took 0.41 s, and the job ended two minutes early.
        return calls * statistics.median(seconds[1:])

    def _fill_text(self) -> str:
        buffer = self.step.buffer
        if buffer is None:
            return "off"
        return f"{int(buffer.filled())}/{buffer.capacity}"  # filled(): this rank's shard under DDP

    def _progress(self):
        if not self.cfg.run.progress or not self.world.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_frames, initial=self.frames_seen, unit="frame", dynamic_ncols=True,
                    desc=f"train {self.cfg.run.stream}")

    def _log_metrics(self, metrics_file, result: StepResult, fps: float) -> None:
        if not self.world.is_main:
            return
        buffer = self.step.buffer
        row = {"frame": self.frames_seen, "step": self.steps, "loss": result.loss, "grad_norm": result.grad_norm,
               "skipped_steps": self.skipped, "frames_per_second": fps,
               "lr": float(self.step.optimizer.param_groups[0]["lr"]),
               "buffer": None if buffer is None else int(buffer.filled()),
               "stream_wait_seconds": self.feed.wait_seconds, "time": time.time()}
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed run's TensorBoard drops what an earlier process logged past the checkpoint
                purge = None if self.resumed_at is None else self.resumed_at + 1
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
            except Exception as err:  # tensorboard is optional at run time
                self.log(f"tensorboard disabled: {err}")
                self._tb = False
        if self._tb:
            for key in ("loss", "grad_norm", "frames_per_second", "skipped_steps"):
                self._tb.add_scalar(f"train/{key}", row[key], self.frames_seen)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's view of the run: the step's state, the stream position, the config and the RNGs."""
        state = self.step.state_dict()
        generator = state.pop("generator")
        return {"config": self.cfg.to_dict(), **state, "stream": self.feed.state_dict(), "device": self.device.type,
                "rng": {"generator": generator, "torch": torch.get_rng_state(),
                        "numpy": np.random.get_state(), "python": random.getstate()}}

    def save_checkpoint(self) -> Path | None:
        state = gather_checkpoint(self.state_dict(), self.world, self.streams)
        if state is None:  # not rank 0: its own part went to rank 0, which writes the file
            return None
        try:
            return ckpt.save_checkpoint(state, self.run_dir / "checkpoints", self.frames_seen,
                                        self.cfg.run.keep_checkpoints)
        except OSError as err:  # e.g. disk full: the previous checkpoint is untouched
            self.checkpoint_failures += 1
            self.log(f"checkpoint at frame {self.frames_seen} failed ({err}); the previous checkpoint is intact")
            if self.cfg.run.disk_full_policy == "stop":
                raise
            return None

    def load_checkpoint(self, state: dict, path: Path) -> None:
        """Continue from `state` (read from `path`): on any device, whichever one the run was saved on."""
        state = rank_view(state, self.world, self.streams, self.device)
        state = self._moved_here(state)
        buffer = self.step.buffer
        if buffer is not None and state["buffer"] is not None and state["buffer"]["capacity"] != buffer.capacity:
            state["buffer"] = resize_reservoir(state["buffer"], buffer.capacity, self.step.generator)
        try:
            self.step.load_state_dict({**state, "generator": state["rng"]["generator"]}, log=self.log)
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(f"{path}: {err}") from None
        self.feed.load_state_dict(state["stream"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.resumed_at = self.frames_seen
        if self.world.is_main:
            dropped = drop_rows_after(self.run_dir / "metrics.jsonl", self.frames_seen)
            if dropped:
                self.log(f"metrics.jsonl: {dropped} row(s) past frame {self.frames_seen} dropped (they are trained "
                         "again now)")
        self.log(f"resumed from {path.name} at frame {self.frames_seen} ({self.steps} steps)")

    def _moved_here(self, state: dict) -> dict:
        """A checkpoint written on another kind of device (a GPU run on a laptop, or the reverse): tensors were
        mapped by torch.load; the training generator's state is device-specific (a CUDA generator's is a seed and
        an offset, a CPU one's the Mersenne twister), so it is re-derived, deterministically, from the run's seed,
        this rank and the frame. Buffer and optimizer dtypes are converted as they are copied in."""
        saved_on = state.get("device", self.device.type)
        mine = self.step.generator.get_state()
        generator = state["rng"]["generator"]
        if saved_on == self.device.type and generator.numel() == mine.numel():
            return state
        seed = distributed.derive_seed(self.cfg.run.seed, self.world.rank, state["counters"]["frames_seen"])
        self.log(f"checkpoint written on {saved_on}, resumed on {self.device.type}: its random stream goes on from a "
                 f"generator re-derived from (run.seed, rank, frame {state['counters']['frames_seen']})")
        fresh = torch.Generator(device=self.device).manual_seed(seed).get_state()
        return {**state, "rng": {**state["rng"], "generator": fresh}}

    def save_milestone(self) -> Path | None:
        """The EMA weights at this frame, kept for good (milestones/): `fastdiff eval` turns them into curves."""
        if not self.world.is_main:
            return None
        state = {"config": self.cfg.to_dict(), "ema": self.step.ema.state_dict(),
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

    def _score_milestone(self, metrics_file) -> None:
        """The EMA model on a few fixed held-out clips (balls streams): held-out loss, minADE, ColorKL, the two-ball
        rate of 45 generated frames, into metrics.jsonl (a row with "milestone") and TensorBoard. One sample per
        clip, 10 DDIM steps, 4 noise levels: a few seconds, so that learning shows while it happens. Also the
        one-call forecast error on FORECAST_WINDOWS windows (evaluate.forecast_videos), the smooth curve of the
        dynamics learned where the few rollouts' numbers are noisy."""
        from fastdiff import evaluate

        if not self.cfg.run.milestone_clips or not self.world.is_main or not evaluate.is_balls_stream(self.cfg.run):
            return
        started = time.perf_counter()
        run = self.as_loaded_run()
        opts = evaluate.EvalOptions(clips=self.cfg.run.milestone_clips, samples=1, sample_steps=10, levels=4,
                                    seed=self.cfg.run.seed)
        if getattr(self, "_milestone_clips", None) is None:  # the same clips at every milestone
            self._milestone_clips = evaluate.evaluation_clips(run, opts.clips, opts.length)
        if getattr(self, "_forecast_clips", None) is None:  # more windows than clips: a forecast is one model call
            self._forecast_clips = evaluate.evaluation_clips(run, evaluate.FORECAST_WINDOWS, self.window)
        scores = evaluate.evaluate(run, self._milestone_clips, opts, floors=False, forecast_clips=self._forecast_clips)
        keys = ("loss", "minADE", "ColorKL", "colour_accuracy", "ball_count_ok", "forecast_error")
        row = {"frame": self.frames_seen, "step": self.steps, **{f"heldout_{k}": scores.get(k) for k in keys},
               "milestone_seconds": round(time.perf_counter() - started, 2), "time": time.time()}
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if self._tb:
            for key in keys:
                value = row[f"heldout_{key}"]
                if value is not None and value == value:  # NaN (no colour change seen): nothing to plot
                    self._tb.add_scalar(f"heldout/{key}", value, self.frames_seen)

    def final_heldout_sample(self, tag: str) -> dict | None:
        """Balls streams: the final EMA model's sample of held-out clips scored next to the floors
        (fastdiff.evaluate.final_sample). None where there is nothing to score (another stream, final_clips 0)."""
        from fastdiff import evaluate

        if not self.final_is_heldout() or not self.world.is_main or self.steps == 0:
            return None
        return evaluate.final_sample(self.as_loaded_run(), self.cfg.run.final_clips, self.run_dir / "samples", tag,
                                     seed=self.cfg.run.seed)

    def final_is_heldout(self) -> bool:
        """Whether the final sample continues held-out clips and is scored (balls streams, run.final_clips > 0)."""
        from fastdiff import evaluate

        return bool(self.cfg.run.final_clips) and evaluate.is_balls_stream(self.cfg.run)

    def as_loaded_run(self):
        """This run as fastdiff.sampling's LoadedRun (the EMA model), for evaluation while it trains."""
        from fastdiff.sampling import LoadedRun

        return LoadedRun(self.cfg, self.run_dir, self.device, self.autoencoder, self.step.ema, self.step.schedule,
                         self.window, self.frame_shape, self.stream.info.fps or 10.0, self.frames_seen)

    # --- samples -------------------------------------------------------------------------------------------------
    def sample_context(self) -> int:
        """Live frames a periodic sample continues: half a window."""
        return self.window // 2

    @torch.no_grad()
    def generate(self, context_frames: int, total: int, seed: int = 0) -> np.ndarray:
        """Roll the EMA model out from the last `context_frames` live frames: uint8 (total, H, W, 3)."""
        step = self.step
        gen = torch.Generator(device=self.device).manual_seed(seed)
        context = step.ring[-context_frames:][None]
        video = rollout(step.ema, context, total, self.window, step.schedule, self.cfg.diffusion, generator=gen,
                        **rollout_space(self.autoencoder, self.cfg.diffusion.sample_reencode))
        return self.autoencoder.decode(video[0]).cpu().numpy()

    def write_samples(self, tag: str) -> Path | None:
        if self.frames_seen < self.window or not self.world.is_main:
            return None
        from fastdiff import media

        frames = self.generate(self.sample_context(), self.cfg.run.sample_frames, seed=self.cfg.run.seed)
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


class StopOnSignal:
    """SIGINT / SIGTERM while training: the first asks the loop to stop after the current step (the trainer then
    writes a checkpoint and says how to resume); a second one stops at once (KeyboardInterrupt), as usual.
    Signal handlers belong to the main thread: elsewhere (a trainer run from a thread) this does nothing."""

    def __init__(self, log):
        self.log, self.signal, self._previous = log, None, {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.signal is not None:  # the second one: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        self.log(f"\n{self.signal}: finishing this step, then writing a checkpoint (again to stop at once)")

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def drop_rows_after(metrics: Path, frame: int) -> int:
    """Rewrite metrics.jsonl without the rows logged after `frame` (a resumed run trains those frames again);
    returns how many were dropped. Atomic: a kill midway leaves the old file."""
    if not metrics.exists():
        return 0
    lines = metrics.read_text().splitlines()
    keep = [line for line in lines if line.strip() and json.loads(line).get("frame", 0) <= frame]
    if len(keep) == len(lines):
        return 0
    ckpt.atomic_write_bytes(metrics, lambda f: f.write("".join(line + "\n" for line in keep).encode()))
    return len(lines) - len(keep)


def gather_checkpoint(state: dict, world: distributed.World, streams: list[str]) -> dict | None:
    """One checkpoint for every rank, on rank 0 (None elsewhere): each rank sends its own part (RNG stream; with one
    stream per rank also its stream position, live frames and buffer; with one shared stream its reservoir shard,
    merged here into the global reservoir, so that any number of ranks can resume it)."""
    if not world.active:
        return state
    mine = {"generator": state["rng"]["generator"], "buffer": state["buffer"]}
    if streams:
        mine.update(stream=state["stream"], ring=state["ring"], ring_pixels=state["ring_pixels"])
    parts = world.gather_to_main(mine)
    if parts is None:
        return None
    if not streams and state["buffer"] is not None:
        state["buffer"] = merge_shards([p["buffer"] for p in parts])
    state["distributed"] = {"world_size": world.size, "streams": streams, "ranks": parts}
    return state


def rank_view(state: dict, world: distributed.World, streams: list[str] | None, device) -> dict:
    """A loaded checkpoint rewritten into this rank's view (any number of ranks for one shared stream)."""
    saved = state.get("distributed")
    if saved is None:  # written by one process: every rank starts from it, with its own RNG stream
        saved = {"world_size": 1, "streams": None, "ranks": [{"generator": state["rng"]["generator"]}]}
    if (saved["streams"] or []) != (streams or []):
        raise distributed.DistributedError(
            f"this run trained on {saved['streams'] or 'one shared stream'} over {saved['world_size']} rank(s); "
            "resume it with the same run.streams, one rank per stream (a stream's position and replay buffer "
            "belong to one rank and cannot be split or merged)")
    ranks = saved["ranks"]
    if world.rank < len(ranks):  # the same rank existed: continue its RNG stream
        generator = ranks[world.rank]["generator"]
    else:  # a new rank: a fresh stream, derived from where the run stands
        seed = distributed.derive_seed(state["config"]["run"]["seed"], world.rank, state["counters"]["frames_seen"])
        generator = torch.Generator(device=device).manual_seed(seed).get_state()  # CUDA and CPU states differ
    state = {**state, "rng": {**state["rng"], "generator": generator}}
    if saved["streams"]:
        mine = ranks[world.rank]
        state.update(stream=mine["stream"], ring=mine["ring"].to(device), buffer=mine["buffer"],
                     ring_pixels=mine["ring_pixels"].to(device))
    return state


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
