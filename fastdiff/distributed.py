"""Data-parallel training on torch.distributed (launched with torchrun); the trainer's only seam to it.

Semantics (README, "More than one GPU"):

* One step per frame on every rank, in lockstep: each rank builds its own batch (live window(s) + windows
  replayed from its own buffer, its own RNG stream for replay draws, noise levels and noise), DDP averages
  the gradients, and every rank applies the same optimizer step. Effective batch = N x the per-rank batch.
* One stream (`run.stream`): every rank reads the same stream and takes the same live window. The replay
  reservoir of the single-GPU run (capacity C) is *sharded*, not copied (fastdiff/replay.py): its union over
  the ranks is exactly a single-GPU reservoir, so a checkpoint stores the global reservoir and any number of
  ranks can load it.
* Several streams (`run.streams`, one per rank): each rank keeps its own full buffer of its own stream. Such a
  checkpoint resumes only on as many ranks as it has streams (a stream's position and buffer cannot be split).

Without torchrun (WORLD_SIZE unset) `World()` is the single-process world and every hook is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from inspect import signature

import numpy as np
import torch
import torch.distributed as dist

STREAMS_SEPARATOR = ";"  # run.streams entries; not "," because video:a,b,c is one stream


class DistributedError(ValueError):
    """A distributed setup this trainer does not support, with the reason."""


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    # --- devices, seeds, streams ------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank: cuda -> cuda:LOCAL_RANK (torchrun sets it)."""
        if self.active and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def rank_seed(self, seed: int) -> int:
        """Rank 0 keeps run.seed (a 1-rank run equals a plain run); other ranks get independent streams."""
        return seed if self.rank == 0 else derive_seed(seed, self.rank)

    def stream_specs(self, cfg) -> list[str] | None:
        specs = parse_streams(cfg.run.streams)
        if specs and len(specs) != self.size:
            raise DistributedError(
                f"run.streams lists {len(specs)} streams for {self.size} rank(s): give one stream per rank "
                f"(torchrun --nproc-per-node {len(specs)}) or use run.stream for one stream shared by all ranks"
            )
        return specs

    def stream_spec(self, cfg) -> tuple[str, int]:
        """(spec, seed) of this rank's stream. Several streams: rank r reads the r-th with seed + r, so that
        listing one synthetic stream twice gives two different simulations."""
        specs = self.stream_specs(cfg)
        if not specs:
            return cfg.run.stream, cfg.run.seed
        return specs[self.rank], cfg.run.seed + self.rank

    def check(self, cfg) -> None:
        """Refuse combinations that do not work under DDP, before any work starts."""
        self.stream_specs(cfg)
        if graph_capture_requested(cfg):
            self.refuse_graph_capture()

    def refuse_graph_capture(self) -> None:
        """For the captured-graph fast path to call before capturing: DDP + capture is not supported (yet)."""
        if self.active:
            raise DistributedError(GRAPH_REFUSAL)

    # --- collectives (no-ops on one process) -------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. fits and saves the autoencoder), then the others (which load it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, fn):
        """fn() on rank 0 only; every rank returns its result, or raises its exception."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # re-raised below, on every rank, so that none waits forever
                error = err
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over ranks. The loss is averaged before the finite check so every rank skips or
        steps together (a rank that skipped alone would leave the replicas out of sync)."""
        if not self.active:
            return value
        value = value.detach().float().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.size

    # --- model ------------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, train_model: torch.nn.Module, compile_model: bool) -> torch.nn.Module:
        """The module the step calls: DDP around the model (compiled outside, as torch recommends) when there is
        more than one rank, else what the trainer built. `model` stays the plain module for EMA / checkpoints."""
        if not self.active:
            return train_model
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        # The DiT's buffers are constants: synced once at construction, no collective in every forward
        # (torch >= 2.13 names the switch forward_sync_buffers and deprecates broadcast_buffers).
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in signature(DDP).parameters
                          else {"broadcast_buffers": False})
        # static_graph: every parameter gets a gradient in every step (one fixed autograd graph), which lets DDP
        # skip the unused-parameter search and fix its buckets after the first step; it is also what activation
        # checkpointing under DDP needs. Left to DDP's default under torch.compile, which splits the graph itself.
        # gradient_as_bucket_view: gradients live in the all-reduce buckets, no copy in and out.
        ddp = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True, static_graph=not compile_model,
                  **no_buffer_sync)
        return torch.compile(ddp) if compile_model else ddp

    def gather_to_main(self, obj) -> list | None:
        """Every rank's `obj` (tensors moved to the CPU), in rank order, on rank 0; None on the other ranks."""
        if not self.active:
            return [obj]
        parts = [None] * self.size if self.is_main else None
        dist.gather_object(to_cpu(obj), parts, dst=0)
        return parts


# --- helpers ---------------------------------------------------------------------------------------
GRAPH_REFUSAL = (
    "the captured-graph fast path does not run under DDP yet: DDP all-reduces gradients from autograd hooks on "
    "its own stream with buckets it may rebuild after the first iterations, so a CUDA graph captured around "
    "backward + optimizer would replay stale or unsynchronised all-reduces. Run with more than one rank in eager "
    "mode (optionally run.compile=true), or with the fast path on one rank"
)


def graph_capture_requested(cfg) -> bool:
    """True when the config asks for the captured-graph step (the fast path's switch, whatever it is called)."""
    return getattr(cfg.run, "step", "eager") == "graph"


def parse_streams(text: str) -> list[str]:
    return [s.strip() for s in (text or "").split(STREAMS_SEPARATOR) if s.strip()]


def derive_seed(seed: int, *keys: int) -> int:
    """An independent 63-bit seed for (seed, keys...) (numpy's SeedSequence mixes them)."""
    words = [k % 2**32 for k in (seed, *keys)]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_cpu(obj):
    """Tensors to CPU before pickling across ranks (a CUDA tensor would unpickle onto the sender's GPU index)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


_WORLD: World | None = None


def init_from_env(device: str = "auto") -> World:
    """Join the torchrun process group (once per process); the single-process World without torchrun."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _WORLD = World()
        return _WORLD
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(shutdown)
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)
    return _WORLD


def current() -> World:
    """The world this process joined (init_from_env), or the process group a caller set up itself."""
    if _WORLD is not None:
        return _WORLD
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def shutdown() -> None:
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None
