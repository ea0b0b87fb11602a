"""Replay buffer on the training device, reservoir-sampled over window starts.

Vitter's algorithm R decided on the device: window n (0-based) goes to slot n while the buffer fills;
afterwards it replaces a uniformly drawn slot j < n+1 when j < capacity, else it is written to a scratch
slot that is never sampled. Inclusion probability is capacity / windows_seen for every window, and no
step needs `.item()`, so the insert can live inside a CUDA graph. Sampling is a device randint + gather.

Sharded over data-parallel ranks (``shard=(rank, world)``, fastdiff/distributed.py): the buffer is rank r's
share of one global reservoir of `capacity` windows, global slot j living in local slot j // world on rank
j % world. Every rank draws the same global slot from an insert generator seeded alike on all ranks (no
communication) and only the owner writes it, so the shards together are exactly a one-process reservoir of
the stream, and a checkpoint holds that global reservoir (:func:`merge_shards`) whatever the number of ranks.

Prioritised replay (``priority`` = alpha > 0, ``replay.priority``): which windows the buffer *holds* is still
the uniform reservoir, but which it *replays* is drawn with probability proportional to score^alpha, a window's
score being its training loss smoothed over its replays (:meth:`ReplayBuffer.update_scores`). Why: the events a
stream shows rarely (two balls colliding) are the ones a short run learns last, and their windows' loss stays
high; measured on the default job's model, held-out windows with a ball-ball contact have 1.6x the loss of the
others. The live windows keep the stream's own distribution in every batch, so there is no importance weight. A
new window starts at the mean score of the windows held (as likely as an average one) until its first replay.
Sampling is an inverse-CDF search on the device (cumsum + searchsorted): no host synchronisation.
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, window_shape: tuple[int, ...], *, dtype: torch.dtype, device,
                 mode: str = "reservoir", shard: tuple[int, int] = (0, 1), insert_seed: int | None = None,
                 priority: float = 0.0):
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        if mode not in ("reservoir", "full"):
            raise ValueError(f"unknown replay mode {mode!r}")
        if not priority >= 0:
            raise ValueError(f"replay priority (alpha) must be >= 0, got {priority}")
        rank, world = shard
        if world > 1 and insert_seed is None:
            raise ValueError("a sharded reservoir needs insert_seed, the same on every rank")
        if capacity < world:
            raise ValueError(f"the replay buffer holds {capacity} windows, fewer than the {world} ranks it is split "
                             "over; raise replay.windows or replay.fraction")
        self.capacity, self.mode, self.priority = capacity, mode, float(priority)  # capacity: of the global reservoir
        self.rank, self.world = rank, world
        self.window_shape, self.dtype = tuple(window_shape), dtype
        self.local_capacity = len(range(rank, capacity, world))
        # +1: the scratch slot that rejected (or other ranks') inserts write to.
        self.windows = torch.zeros((self.local_capacity + 1, *window_shape), dtype=dtype, device=device)
        self.starts = torch.full((self.local_capacity + 1,), -1, dtype=torch.long, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        # Prioritised replay: each slot's smoothed loss, and the slots the last sample() drew (update_scores).
        self.scores = torch.zeros(self.local_capacity + 1, dtype=torch.float32, device=device)
        self.last_drawn = torch.zeros(0, dtype=torch.long, device=device)
        # Sharded: the slot draw must be the same on every rank, so it has its own generator.
        self.insert_generator = (torch.Generator(device=device).manual_seed(insert_seed)
                                 if insert_seed is not None else None)

    @property
    def device(self) -> torch.device:
        return self.windows.device

    @property
    def nbytes(self) -> int:
        return self.windows.numel() * self.windows.element_size()

    def filled(self) -> torch.Tensor:
        """Windows held by this rank (a device scalar)."""
        total = torch.clamp(self.seen, max=self.capacity)  # global slots in use: 0 .. total-1
        if self.world == 1:
            return total
        return torch.clamp(torch.div(total - self.rank + self.world - 1, self.world, rounding_mode="floor"), min=0)

    def insert(self, window: torch.Tensor, start: torch.Tensor | int, generator: torch.Generator | None) -> None:
        """Offer one window (its first frame's stream index is `start`). No host synchronisation. A sharded
        buffer draws from its own insert generator instead of `generator`."""
        draw = torch.rand((), generator=self.insert_generator or generator, device=self.device, dtype=torch.float64)
        cap = self.capacity
        if self.mode == "full":  # keep everything seen (until the capacity, sized to the whole stream)
            j = torch.clamp(self.seen, max=cap)
        else:
            uniform = (draw * (self.seen + 1).double()).long()  # in [0, seen]
            j = torch.where(self.seen < cap, self.seen, uniform)
        if self.world == 1:
            slot = torch.where(j < cap, j, cap)
        else:
            mine = (j < cap) & (j % self.world == self.rank)
            slot = torch.where(mine, torch.div(j, self.world, rounding_mode="floor"), self.local_capacity)
        slot = slot.view(1)
        if self.priority:
            self.scores.index_copy_(0, slot, self._mean_score().view(1))
        self.windows.index_copy_(0, slot, window.to(self.dtype)[None])
        start_t = torch.as_tensor(start, device=self.device, dtype=torch.long).view(1)
        self.starts.index_copy_(0, slot, start_t)
        self.seen += 1

    def _held(self, filled: torch.Tensor | None = None) -> torch.Tensor:
        """(local_capacity,) bool: the slots that hold a window (`filled`: this rank's count, if already known)."""
        return torch.arange(self.local_capacity, device=self.device) < (self.filled() if filled is None else filled)

    def _mean_score(self) -> torch.Tensor:
        """The mean score of the windows held; 1 while none is (any positive prior does: only ratios matter)."""
        held = self._held()
        total = torch.where(held, self.scores[:-1], 0.0).sum()
        count = held.sum()
        return torch.where(count > 0, total / count.clamp(min=1), 1.0)

    def sample(self, count: int, generator: torch.Generator, fallback: torch.Tensor) -> torch.Tensor:
        """`count` windows drawn from the filled slots, uniformly or (priority > 0) by score^priority; `fallback`
        (one window) while empty."""
        filled = self.filled()
        draw = torch.rand(count, generator=generator, device=self.device, dtype=torch.float64)
        if self.priority:
            weight = torch.where(self._held(filled), self.scores[:-1].double().clamp(min=0) ** self.priority, 0.0)
            cumulative = weight.cumsum(0)
            idx = torch.searchsorted(cumulative, draw * cumulative[-1], right=True)
            idx = torch.minimum(idx, (filled - 1).clamp(min=0))  # draw * total rounding onto the last edge
            self.last_drawn = idx
        else:
            idx = (draw * filled.clamp(min=1).double()).long()
        picked = self.windows[idx]
        empty = (filled == 0).view(1, *([1] * len(self.window_shape)))
        return torch.where(empty, fallback.to(self.dtype)[None], picked)

    def update_scores(self, losses: torch.Tensor, smoothing: float = 0.5) -> None:
        """Blend the training losses (count,) of the windows the last sample() drew into their scores:
        score <- (1 - smoothing) score + smoothing loss. One loss is a noisy measure of a window (it depends on the
        noise levels drawn), so a score averages over its replays. No-op without priorities. No host sync."""
        if not self.priority or len(self.last_drawn) == 0:
            return
        if losses.shape != self.last_drawn.shape:
            raise ValueError(f"update_scores: {tuple(losses.shape)} losses for {len(self.last_drawn)} drawn windows")
        old = self.scores[self.last_drawn]
        blended = torch.where(torch.isfinite(losses), old + smoothing * (losses.float() - old), old)
        self.scores.index_copy_(0, self.last_drawn, blended)

    def state_dict(self) -> dict:
        """This rank's windows in local slot order; :func:`merge_shards` makes the global reservoir of them."""
        n = int(self.filled())  # checkpointing is off the hot path: a sync here is fine
        state = {"capacity": self.capacity, "mode": self.mode, "seen": self.seen.clone(),
                 "windows": self.windows[:n].clone(), "starts": self.starts[:n].clone(),
                 "scores": self.scores[:n].clone(), "window_shape": self.window_shape, "dtype": str(self.dtype)}
        if self.world > 1:
            state.update(shard=(self.rank, self.world), insert_generator=self.insert_generator.get_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a global reservoir (one process's state_dict, or merge_shards of a sharded run's): this rank keeps
        the slots j with j % world == rank."""
        if tuple(state["window_shape"]) != self.window_shape or state["capacity"] != self.capacity:
            raise ValueError(
                f"replay buffer in checkpoint holds {state['capacity']} windows of {tuple(state['window_shape'])}, "
                f"this run expects {self.capacity} of {self.window_shape}"
            )
        windows, starts = state["windows"][self.rank :: self.world], state["starts"][self.rank :: self.world]
        n = windows.shape[0]
        self.windows[:n].copy_(windows)
        self.starts[:n].copy_(starts)
        # A checkpoint from before prioritised replay has no scores: every window held starts equal.
        scores = state.get("scores")
        self.scores[:n].copy_(scores[self.rank :: self.world] if scores is not None else torch.ones(n))
        self.seen.copy_(state["seen"])
        if self.insert_generator is not None and state.get("insert_generator") is not None:
            self.insert_generator.set_state(state["insert_generator"].cpu())


def merge_shards(shards: list[dict]) -> dict:
    """The global reservoir from every rank's state_dict, in global slot order: the layout of a one-process
    ReplayBuffer.state_dict, so that one process (or any other number of ranks) loads it."""
    world = len(shards)
    first = shards[0]
    if any(s.get("shard", (r, world)) != (r, world) for r, s in enumerate(shards)):
        raise ValueError("replay shards are out of order or from different world sizes")
    total = sum(s["windows"].shape[0] for s in shards)
    windows = first["windows"].new_empty((total, *first["windows"].shape[1:]))
    starts = first["starts"].new_empty((total,))
    scores = torch.ones(total)
    for r, s in enumerate(shards):
        windows[r::world] = s["windows"]
        starts[r::world] = s["starts"]
        if s.get("scores") is not None:
            scores[r::world] = s["scores"].cpu()
    return {**first, "windows": windows, "starts": starts, "scores": scores, "shard": None}


def resize_reservoir(state: dict, capacity: int, generator: torch.Generator) -> dict:
    """A global reservoir state resized to `capacity` windows (an explicit choice on resume, --resize-buffer).

    Shrinking keeps a uniform random subset of the stored windows: still a uniform sample of every window seen,
    and algorithm R goes on with inclusion probability capacity / seen. Growing keeps every stored window. While
    the buffer had not yet filled (seen <= stored) it held every window seen, so growing is exact too; once it
    had, the windows it dropped are gone, and the reservoir restarts its count at the stored windows (they stand
    for the past), filling the new slots with the next windows of the stream: the past then weighs as many
    windows as were stored, not as were seen."""
    n = state["windows"].shape[0]
    seen = int(state["seen"])
    if capacity == state["capacity"]:
        return state
    if capacity < n:  # shrink: a uniform subset, in slot order
        keep = torch.randperm(n, generator=generator, device=generator.device)[:capacity].sort().values
        keep = keep.to(state["windows"].device)
        scores = state.get("scores")
        return {**state, "capacity": capacity, "windows": state["windows"][keep], "starts": state["starts"][keep],
                "scores": None if scores is None else scores[keep.to(scores.device)]}
    return {**state, "capacity": capacity, "seen": torch.as_tensor(min(seen, n)).to(state["seen"])}
