"""The fast path: the whole online step decided on the device, then captured in one CUDA graph.

`run.step` picks how the trainer steps:

- ``eager``: the reference (fastdiff/train.py ``train_step``). It reads the loss on the host every step to
  decide whether to skip a non-finite one.
- ``device``: the same step with no host sync. Every decision stays on the device:
  ``finite = isfinite(loss) & isfinite(grad_norm)``; the optimizer skips through ``found_inf``
  (torch's fused AdamW and fastdiff's fused 8-bit AdamW both honour it); the EMA moves by
  ``(1 - decay(step)) * finite`` with the warm-up ``decay = min(ema, (1 + s) / (10 + s))`` computed from
  a device step counter; skipped steps are counted on the device. Host counters catch up only when the
  trainer logs or checkpoints (one sync per ``log_every`` frames, not per step).
- ``graph``: the ``device`` step captured once in a CUDA graph after a few eager warm-up steps (which
  also compile the model), then replayed per frame: batch assembly from the replay buffer, noising,
  forward, loss, backward, clipping, optimizer, EMA and the reservoir insert are one launch. Frames enter
  through the trainer's static ring buffer, updated in place outside the graph.

Requirements and refusals (a clear error, before any work): the device and graph steps need an optimizer
that can skip on the device (``adamw`` fused, ``adamw8bit-fused``; bitsandbytes cannot, it synchronises
per parameter); graph capture needs CUDA, one process (no DDP), and a strategy whose step has fixed
shapes and modules (not ``gen-distill``, whose teacher is replaced on refresh).
"""

from __future__ import annotations

import torch

from fastdiff.diffusion import training_loss

STEP_MODES = ("eager", "device", "graph")
DEVICE_SKIP_OPTIMIZERS = ("adamw", "adamw8bit-fused")
WARMUP_STEPS = 3  # eager steps before capture: allocator pools settle, torch.compile compiles


class FastPathError(ValueError):
    """The configuration cannot take the fast path; the message says why."""


def check(cfg, device: torch.device, optimizer_name: str) -> None:
    mode = cfg.run.step
    if mode == "eager":
        return
    if optimizer_name not in DEVICE_SKIP_OPTIMIZERS:
        raise FastPathError(
            f"run.step={mode} with optim.name={optimizer_name} not supported because that optimizer cannot skip a "
            "non-finite step on the device (bitsandbytes' 8-bit step synchronises per parameter); use "
            "optim.name=adamw8bit-fused (same 8-bit state) or adamw")
    if mode == "graph":
        if device.type != "cuda":
            raise FastPathError(f"run.step=graph not supported because CUDA graphs need a CUDA device (run.device is "
                                f"{device}); run.step=device runs the same sync-free step without a graph")
        if cfg.replay.strategy == "gen-distill":
            raise FastPathError("run.step=graph with replay.strategy=gen-distill not supported because the teacher is "
                                "replaced on every refresh, which a captured graph cannot see; use run.step=device")
        if cfg.run.nan_policy == "stop":
            raise FastPathError("run.step=graph with run.nan_policy=stop not supported because stopping at once "
                                "needs a host sync every step; use nan_policy=skip (skips are counted and reported)")


class FastStep:
    """One online step with no host sync; captured as a CUDA graph when `graph` is true."""

    def __init__(self, trainer, *, graph: bool):
        if graph:
            trainer.world.refuse_graph_capture()
        self.trainer = trainer
        self.graph_wanted = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        device = trainer.device
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.ema_params = list(trainer.ema.parameters())
        self.device_steps = torch.full((), float(trainer.steps), device=device, dtype=torch.float64)
        self.device_skipped = torch.full((), trainer.skipped, device=device, dtype=torch.long)
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.found_inf = torch.zeros((), device=device)
        self.calls = 0

    # --- the step body: device work only ------------------------------------------------------------
    def _body(self, zero_grad: bool) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        t.model.train()
        batch = t._batch(t._live_windows())
        # autocast's weight-cast cache must be off under capture (the cast copies would be graph-private)
        with torch.autocast(t.device.type, dtype=t.autocast_dtype or torch.float32,
                            enabled=t.autocast_dtype is not None, cache_enabled=not self.graph_wanted):
            if t.distill is not None:
                loss = t.distill.loss(t.train_model, batch, cfg.replay.replayed, t.schedule, cfg.diffusion,
                                      t.generator)
            else:
                loss = training_loss(t.train_model, batch, t.schedule, cfg.diffusion, t.generator)
        if zero_grad:
            t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        self.found_inf.copy_((~finite).float())
        t.optimizer.found_inf = self.found_inf
        t.optimizer.step()
        t.optimizer.found_inf = None
        self.device_steps.add_(finite.double())
        self._update_ema(finite)
        self.device_skipped.add_((~finite).long())
        self.loss.copy_(loss.detach())
        self.grad_norm.copy_(grad_norm)
        t._insert_live()

    @torch.no_grad()
    def _update_ema(self, finite: torch.Tensor) -> None:
        cfg = self.trainer.cfg.optim
        decay = torch.full((), cfg.ema, device=self.device_steps.device, dtype=torch.float64)
        if cfg.ema_warmup:
            decay = torch.minimum(decay, (1 + self.device_steps) / (10 + self.device_steps))
        weight = ((1.0 - decay) * finite.double()).float()
        torch._foreach_lerp_(self.ema_params, self.params, weight)

    # --- stepping ----------------------------------------------------------------------------------------
    def step(self) -> None:
        """One step for the newest frame. Returns at once; read results with :meth:`sync`."""
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return
        if self.graph_wanted and self.calls > WARMUP_STEPS:
            self._capture()
            self.graph.replay()
            return
        self._body(zero_grad=True)

    def _capture(self) -> None:
        t = self.trainer
        torch.cuda.synchronize(t.device)
        graph = torch.cuda.CUDAGraph()
        if hasattr(graph, "register_generator_state"):  # torch >= 2.6: a custom generator advances per replay
            graph.register_generator_state(t.generator)
        t.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates the grads in the graph's pool
        with torch.cuda.graph(graph):
            self._body(zero_grad=False)
        self.graph = graph
        t.log(f"step captured in a CUDA graph after {WARMUP_STEPS} eager warm-up steps")

    def sync(self):
        """Host view of the last step and the counters (one sync): the trainer calls it to log or checkpoint."""
        from fastdiff.train import StepResult

        t = self.trainer
        steps, skipped = int(self.device_steps.item()), int(self.device_skipped.item())
        newly_skipped = skipped - t.skipped
        t.steps, t.skipped = steps, skipped
        result = StepResult(float(self.loss), float(self.grad_norm), bool(self.found_inf.item()))
        return result, newly_skipped
