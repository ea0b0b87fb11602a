"""The online step: one gradient step per arriving frame, on the live window(s) + windows from the replay source.

:class:`OnlineStep` holds everything the step reads and writes: the model and its EMA, the optimizer, the
noise schedule, the replay buffer (or the offline bank, or the distillation teacher), the live ring of the
newest frames and the step's counters. Its public API is :meth:`OnlineStep.ingest` (one frame in),
:meth:`OnlineStep.step` (one gradient step) and :meth:`OnlineStep.result` (the host's view of the last step).

One body (:meth:`OnlineStep._body`) serves the three ``run.step`` modes:

- ``eager``: the reference. After backward the host reads the loss and the gradient norm (one sync per step)
  and skips a non-finite step itself, so any optimizer works, bitsandbytes' included.
- ``device``: the same body with no host sync. ``finite = isfinite(loss) & isfinite(grad_norm)`` stays on the
  device and reaches the optimizer as ``found_inf`` (torch's fused AdamW and fastdiff's fused 8-bit AdamW
  leave weights, moments and step counts untouched); the EMA moves by ``(1 - decay(step)) * finite``, the
  warm-up ``decay = min(ema, (1 + s) / (10 + s))`` computed from a device step counter; skips are counted on the
  device. The host catches up only when it asks (:meth:`result`, once per log interval).
- ``graph``: the device body captured once in a CUDA graph after a few warm-up steps (which also compile the
  model), then replayed per frame: batch assembly, noising, forward, loss, backward, clipping, optimizer, EMA and
  the reservoir insert are one launch. Frames reach it through the live ring, updated in place outside the graph.

Every tensor the body touches is created here, once, so that its storage stays put for the captured graph.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from fastdiff.augment import symmetry_augment
from fastdiff.config import DEVICE_SKIP_OPTIMIZERS, Config, live_ring_frames
from fastdiff.diffusion import Schedule, training_loss
from fastdiff.models.autoencoder import encode_frames
from fastdiff.optim import build_optimizer

WARMUP_STEPS = 3  # eager steps before capture: allocator pools settle, torch.compile compiles


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient under run.nan_policy=stop."""


class StepModeError(ValueError):
    """The configuration cannot take this run.step; the message says why."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool


def check_mode(cfg: Config, device: torch.device, optimizer: str) -> None:
    """Refuse, before any work, a run.step this machine or optimizer cannot take (the config's own combinations
    were checked by fastdiff.config.validate)."""
    mode = cfg.run.step
    if mode != "eager" and optimizer not in DEVICE_SKIP_OPTIMIZERS:
        raise StepModeError(f"run.step={mode} not supported with optim.name={optimizer}: it cannot skip a "
                            "non-finite step on the device")
    if mode == "graph" and device.type != "cuda":
        raise StepModeError(f"run.step=graph not supported because CUDA graphs need a CUDA device (run.device is "
                            f"{device}); run.step=device runs the same sync-free step without a graph")


def step_optimizer(cfg: Config, name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The step's optimizer over the model's parameters: capturable when the step is captured in a CUDA graph
    (torch's AdamW refuses capture otherwise: its step count would live on the host); Muon steps the matrices the
    model names as hidden (`hidden_matrices`)."""
    o = cfg.optim
    matrices = None
    if name == "muon":
        if not hasattr(model, "hidden_matrices"):
            raise StepModeError(f"optim.name=muon not supported with {type(model).__name__} because it does not name "
                                "its hidden matrices (hidden_matrices), the ones Muon steps")
        matrices = model.hidden_matrices()
    return build_optimizer(name, model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                           weight_decay=o.weight_decay, capturable=cfg.run.step == "graph", matrices=matrices)


class OnlineStep:
    """The online step of one process (see the module docstring)."""

    def __init__(self, cfg: Config, model: torch.nn.Module, *, optimizer_name: str, window: int,
                 latent_shape: tuple[int, int, int], frame_shape: tuple[int, int, int], device: torch.device,
                 generator: torch.Generator, autocast: torch.dtype | None, buffer=None, bank=None, distill=None,
                 autoencoder=None, world=None, total_frames: int, log=print):
        check_mode(cfg, device, optimizer_name)
        self.cfg, self.mode, self.log = cfg, cfg.run.step, log
        self.window, self.device, self.generator, self.autocast = window, device, generator, autocast
        self.buffer, self.bank, self.distill, self.autoencoder, self.world = buffer, bank, distill, autoencoder, world
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema_params = list(self.ema.parameters())
        self.optimizer_name = optimizer_name
        self.optimizer = step_optimizer(cfg, optimizer_name, model)
        self.schedule = Schedule.make(cfg.diffusion.schedule, cfg.diffusion.timesteps, device)
        train_model = torch.compile(model, fullgraph=True) if cfg.run.compile else model
        self.train_model = world.wrap(model, train_model, cfg.run.compile) if world is not None else train_model

        # --- the step's own state: every tensor the (captured) body reads or writes ------------------------------
        live_frames = live_ring_frames(cfg.replay, window)
        self.ring = torch.zeros((live_frames, *latent_shape), device=device)
        self.ring_pixels = torch.zeros((live_frames, *frame_shape), dtype=torch.uint8, device=device)
        self.frames = torch.zeros((), dtype=torch.long, device=device)  # frames ingested, on the device
        self.device_steps = torch.zeros((), device=device, dtype=torch.float64)
        self.device_skipped = torch.zeros((), device=device, dtype=torch.long)
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.found_inf = torch.zeros((), device=device)
        self.ema_decay = torch.full((), cfg.optim.ema, device=device, dtype=torch.float64)
        # The scheduled learning rate (warm-up, cool-down): a device tensor the sync-free step sets from its step
        # counter (a host float would be frozen into a captured graph); the eager step sets a host float, which every
        # optimizer takes. The cool-down ends at the run's last planned step: one per frame of `total_frames` (what
        # the trainer will read: run.frames, or fewer where the stream is shorter) once the ring is full.
        self.lr = self.planned = None
        if (cfg.optim.warmup or cfg.optim.cooldown) and self.mode != "eager":
            self.lr = torch.full((), cfg.optim.lr, device=device)
            self.planned = torch.zeros((), device=device, dtype=torch.float64)  # read by the captured step
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        self.plan(total_frames)

        # --- the host's view -------------------------------------------------------------------------------------
        self.frames_seen = 0  # frames ingested
        self.steps = 0  # gradient steps taken
        self.skipped = 0  # steps skipped for a non-finite loss or gradient
        self.calls = 0  # step() calls in this process
        self.graph: torch.cuda.CUDAGraph | None = None
        self._last = StepResult(float("nan"), float("nan"), False)

    # --- frames in ---------------------------------------------------------------------------------------------
    @property
    def live_frames(self) -> int:
        return self.ring.shape[0]

    @property
    def ready(self) -> bool:
        """True once the live ring holds a full batch of live windows: from then on every frame is a step."""
        return self.frames_seen >= self.live_frames

    @torch.no_grad()
    def ingest(self, pixels: torch.Tensor, latent: torch.Tensor) -> None:
        """One arriving frame: pixels (H, W, 3) uint8 and its latent (C, h, w), on the training device."""
        # in place: the captured step reads these very tensors on every replay
        self.ring[:-1] = self.ring[1:].clone()
        self.ring[-1] = latent.float()
        self.ring_pixels[:-1] = self.ring_pixels[1:].clone()
        self.ring_pixels[-1] = pixels
        self.frames_seen += 1
        self.frames += 1

    def live_windows(self) -> torch.Tensor:
        """The replay.live newest windows (live, K, C, h, w), newest last."""
        k, n = self.window, self.cfg.replay.live
        if n == 0:  # replay only: every window of the batch comes from the buffer
            return self.ring[-k:].unsqueeze(0)[:0]
        return torch.stack([self.ring[i : i + k] for i in range(n)])

    def batch(self, live: torch.Tensor) -> torch.Tensor:
        """The step's clean clips (B, K, C, h, w): the live windows and what the replay strategy adds."""
        r = self.cfg.replay
        if self.bank is not None:  # offline: every window i.i.d. from the whole stream
            drawn = self.bank.sample(r.live + r.replayed, self.generator)
            if r.storage == "pixel":
                drawn = encode_frames(self.autoencoder, drawn)
            return drawn.float()
        if self.distill is not None:
            return live  # the replayed windows are generated inside the loss
        if self.buffer is None:  # no replay: the batch is filled with the live window
            return live[-1:].expand(r.live + r.replayed, *live.shape[1:])
        if r.replayed == 0:
            return live
        fallback = self.ring_pixels[-self.window :] if r.storage == "pixel" else self.ring[-self.window :]
        replayed = self.buffer.sample(r.replayed, self.generator, fallback)
        if r.storage == "pixel":
            replayed = encode_frames(self.autoencoder, replayed)
        return torch.cat([live, replayed.float()])

    def _insert_live(self) -> None:
        if self.buffer is None:
            return
        start = self.frames - self.window  # a device value: the captured step replays it correctly
        window = self.ring_pixels[-self.window :] if self.cfg.replay.storage == "pixel" else self.ring[-self.window :]
        self.buffer.insert(window, start, self.generator)

    # --- the step ----------------------------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        # autocast's weight-cast cache must be off under capture (the cast copies would be graph-private)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None,
                            cache_enabled=self.mode != "graph"):
            if self.distill is not None:
                return self.distill.loss(self.train_model, batch, cfg.replay.replayed, self.schedule, cfg.diffusion,
                                         self.generator)
            if self.buffer is None or not self.buffer.priority:
                return training_loss(self.train_model, batch, self.schedule, cfg.diffusion, self.generator)
            # Prioritised replay: the replayed windows (the batch's last rows) score themselves by their loss.
            loss, per_window = training_loss(self.train_model, batch, self.schedule, cfg.diffusion, self.generator,
                                             per_window=True)
            self.buffer.update_scores(per_window[batch.shape[0] - len(self.buffer.last_drawn):])
            return loss

    def _body(self) -> None:
        """Batch -> loss -> backward -> clip -> optimizer -> EMA -> counters -> reservoir insert. Device work only,
        except in eager mode, whose host check is the one place it syncs."""
        self.model.train()
        loss = self._loss(symmetry_augment(self.batch(self.live_windows()), self.cfg.run.augment, self.generator))
        # The sync-free step zeroes the gradients in place: they keep their storage from step to step, which a
        # captured graph needs and which spares the 8-bit optimizer re-uploading its pointer table every step.
        self.optimizer.zero_grad(set_to_none=self.mode == "eager")
        loss.backward()
        self._schedule_lr()
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        if self.mode == "eager":
            finite = self._host_check(loss, grad_norm)
        else:
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            self.found_inf.copy_((~finite).float())
            self.optimizer.found_inf = self.found_inf
            self.optimizer.step()
            self.optimizer.found_inf = None
        self.device_steps.add_(finite.double())
        self._update_ema(finite)
        self.device_skipped.add_((~finite).long())
        self.loss.copy_(loss.detach())
        self.grad_norm.copy_(grad_norm)
        self._insert_live()

    def plan(self, total_frames: int) -> None:
        """Set the run's length in frames, where its cool-down ends: at construction, and again when a run with a
        time limit (run.minutes) finds that the rest of its frames would not fit."""
        self.planned_steps = max(total_frames - self.live_frames + 1, 1)
        if self.planned is not None:
            self.planned.fill_(self.planned_steps)

    def _schedule_lr(self) -> None:
        """lr = optim.lr * min(1, (s + 1) / warmup) * min(1, (planned - s) / (cooldown * planned)), with s the steps
        taken before this one and planned the run's steps: a linear warm-up from 0, then a linear cool-down to 0
        over the last `cooldown` share of the run."""
        o = self.cfg.optim
        if not (o.warmup or o.cooldown):
            return
        warmup = max(o.warmup, 1)
        if self.lr is None:
            factor = min(1.0, (self.steps + 1) / warmup)
            if o.cooldown:
                factor = factor * min(1.0, max(self.planned_steps - self.steps, 0) / (o.cooldown * self.planned_steps))
            for group in self.optimizer.param_groups:  # the sync-free step's arithmetic, in the same order
                group["lr"] = o.lr * factor
        else:  # the plan is a device tensor: a captured step reads the current one, not the one at capture
            factor = torch.clamp((self.device_steps + 1) / warmup, max=1.0)
            if o.cooldown:
                factor = factor * torch.clamp((self.planned - self.device_steps) / (o.cooldown * self.planned),
                                              min=0.0, max=1.0)
            self.lr.copy_(o.lr * factor)

    def _host_check(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """The eager step's decision: read loss and gradient norm on the host, step or skip. The loss is the mean
        over ranks, so that every rank skips or steps together (a rank that skipped alone would leave the replicas
        out of sync)."""
        loss_value = float(self.world.mean(loss.detach())) if self.world is not None else float(loss)
        norm_value = float(grad_norm)
        ok = math.isfinite(loss_value) and math.isfinite(norm_value)
        self._last = StepResult(loss_value, norm_value, not ok)
        if ok:
            self.optimizer.step()
            self.steps += 1
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.log(f"frame {self.frames_seen}: non-finite loss/gradient ({loss_value}, {norm_value}); "
                     f"step skipped ({self.skipped} so far)")
        return torch.tensor(ok, device=self.device)

    @torch.no_grad()
    def _update_ema(self, finite: torch.Tensor) -> None:
        decay = self.ema_decay
        if self.cfg.optim.ema_warmup:  # device_steps already counts this step
            decay = torch.minimum(decay, (1 + self.device_steps) / (10 + self.device_steps))
        weight = ((1.0 - decay) * finite.double()).float()
        # ema += weight * (param - ema). Not _foreach_lerp_: it has no tensor-weight overload, so a device weight
        # would be read back with .item(), a host sync every step and an error under graph capture.
        delta = torch._foreach_sub(self.params, self.ema_params)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(self.ema_params, delta)

    def step(self) -> None:
        """One gradient step for the newest frame. In the device and graph modes it returns at once; read the
        outcome with :meth:`result`. Raises NonFiniteLoss under run.nan_policy=stop (eager: at once)."""
        if not self.ready:
            raise RuntimeError(f"step() needs {self.live_frames} ingested frames, got {self.frames_seen}")
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.mode == "graph" and self.calls > WARMUP_STEPS:
            self._capture()
            self.graph.replay()
        else:
            self._body()
        if self.mode == "eager" and self._last.skipped and self.cfg.run.nan_policy == "stop":
            raise NonFiniteLoss(f"non-finite loss at frame {self.frames_seen} (run.nan_policy=stop)")
        if self.distill is not None and self.distill.maybe_refresh(self.ema, self.frames_seen):
            self.log(f"frame {self.frames_seen}: distillation teacher refreshed from the EMA model")

    def _capture(self) -> None:
        if self.world is not None:
            self.world.refuse_graph_capture()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        if hasattr(graph, "register_generator_state"):  # torch >= 2.6: a custom generator advances per replay
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # the ingest thread may pin memory meanwhile
            self._body()
        self.graph = graph
        self.log(f"step captured in a CUDA graph after {WARMUP_STEPS} eager warm-up steps")

    def result(self) -> StepResult:
        """The host's view of the last step, and the counters caught up (device and graph modes: one sync)."""
        if self.mode == "eager" or not self.calls:
            return self._last
        steps, skipped = int(self.device_steps.item()), int(self.device_skipped.item())
        newly_skipped = skipped - self.skipped
        self.steps, self.skipped = steps, skipped
        self._last = StepResult(float(self.loss), float(self.grad_norm), bool(self.found_inf.item()))
        if newly_skipped:
            self.log(f"frame {self.frames_seen}: {newly_skipped} step(s) skipped for a non-finite loss/gradient "
                     f"({self.skipped} so far)")
            if self.cfg.run.nan_policy == "stop":
                raise NonFiniteLoss(f"non-finite loss by frame {self.frames_seen} (run.nan_policy=stop)")
        return self._last

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self.result()  # the host counters, caught up
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "optimizer_name": self.optimizer_name,
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "distill": None if self.distill is None else self.distill.state_dict(),
            "ring": self.ring.clone(),
            "ring_pixels": self.ring_pixels.clone(),
            "counters": {"frames_seen": self.frames_seen, "steps": self.steps, "skipped": self.skipped},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict, log=print) -> None:
        """Load what :meth:`state_dict` saved (another optimizer's state is converted)."""
        from fastdiff.checkpoint import CheckpointError
        from fastdiff.optim import convert_state_dict

        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
        except RuntimeError as err:
            raise CheckpointError(f"the checkpoint was written by a different model shape: {err}") from None
        saved_opt = state.get("optimizer_name", self.optimizer_name)
        opt_state = state["optimizer"]
        if saved_opt != self.optimizer_name:
            log(f"converting optimizer state {saved_opt} -> {self.optimizer_name}")
            opt_state = convert_state_dict(opt_state, saved_opt, self.optimizer_name, list(self.model.parameters()))
        self.optimizer.load_state_dict(opt_state)
        if self.lr is not None:  # loading replaced each group's lr with the saved value: re-bind the schedule's tensor
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        if self.buffer is not None and state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
        if self.distill is not None and state.get("distill") is not None:
            self.distill.load_state_dict(state["distill"], self.ema)
        self.ring.copy_(state["ring"])
        self.ring_pixels.copy_(state["ring_pixels"])
        counters = state["counters"]
        self.frames_seen, self.steps, self.skipped = counters["frames_seen"], counters["steps"], counters["skipped"]
        self.frames.fill_(self.frames_seen)
        self.device_steps.fill_(float(self.steps))
        self.device_skipped.fill_(self.skipped)
        self.generator.set_state(state["generator"].cpu())
