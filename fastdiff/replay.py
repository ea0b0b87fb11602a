"""Replay buffer on the training device, reservoir-sampled over window starts (decision 6).

Vitter's algorithm R decided on the device: window n (0-based) goes to slot n while the buffer fills;
afterwards it replaces a uniformly drawn slot j < n+1 when j < capacity, else it is written to a scratch
slot that is never sampled. Inclusion probability is capacity / windows_seen for every window, and no
step needs `.item()`, so the insert can live inside a CUDA graph. Sampling is a device randint + gather.
"""

from __future__ import annotations

import torch


class ReplayBuffer:
    def __init__(self, capacity: int, window_shape: tuple[int, ...], *, dtype: torch.dtype, device,
                 mode: str = "reservoir"):
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        if mode not in ("reservoir", "full"):
            raise ValueError(f"unknown replay mode {mode!r}")
        self.capacity, self.mode = capacity, mode
        self.window_shape, self.dtype = tuple(window_shape), dtype
        # +1: the scratch slot that rejected inserts write to.
        self.windows = torch.zeros((capacity + 1, *window_shape), dtype=dtype, device=device)
        self.starts = torch.full((capacity + 1,), -1, dtype=torch.long, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)

    @property
    def device(self) -> torch.device:
        return self.windows.device

    @property
    def nbytes(self) -> int:
        return self.windows.numel() * self.windows.element_size()

    def filled(self) -> torch.Tensor:
        return torch.clamp(self.seen, max=self.capacity)

    def insert(self, window: torch.Tensor, start: torch.Tensor | int, generator: torch.Generator) -> None:
        """Offer one window (its first frame's stream index is `start`). No host synchronisation."""
        draw = torch.rand((), generator=generator, device=self.device, dtype=torch.float64)
        if self.mode == "full":  # keep everything seen (until the capacity, sized to the whole stream)
            slot = torch.clamp(self.seen, max=self.capacity)
        else:
            j = (draw * (self.seen + 1).double()).long()  # uniform in [0, seen]
            slot = torch.where(self.seen < self.capacity, self.seen, torch.where(j < self.capacity, j, self.capacity))
        slot = slot.view(1)
        self.windows.index_copy_(0, slot, window.to(self.dtype)[None])
        start_t = torch.as_tensor(start, device=self.device, dtype=torch.long).view(1)
        self.starts.index_copy_(0, slot, start_t)
        self.seen += 1

    def sample(self, count: int, generator: torch.Generator, fallback: torch.Tensor) -> torch.Tensor:
        """`count` windows drawn uniformly from the filled slots; `fallback` (one window) while empty."""
        filled = self.filled()
        draw = torch.rand(count, generator=generator, device=self.device, dtype=torch.float64)
        idx = (draw * filled.clamp(min=1).double()).long()
        picked = self.windows[idx]
        empty = (filled == 0).view(1, *([1] * len(self.window_shape)))
        return torch.where(empty, fallback.to(self.dtype)[None], picked)

    def state_dict(self) -> dict:
        n = int(self.filled())  # checkpointing is off the hot path: a sync here is fine
        return {"capacity": self.capacity, "mode": self.mode, "seen": self.seen.clone(),
                "windows": self.windows[:n].clone(), "starts": self.starts[:n].clone(),
                "window_shape": self.window_shape, "dtype": str(self.dtype)}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["window_shape"]) != self.window_shape or state["capacity"] != self.capacity:
            raise ValueError(
                f"replay buffer in checkpoint holds {state['capacity']} windows of {tuple(state['window_shape'])}, "
                f"this run expects {self.capacity} of {self.window_shape}"
            )
        n = state["windows"].shape[0]
        self.windows[:n].copy_(state["windows"])
        self.starts[:n].copy_(state["starts"])
        self.seen.copy_(state["seen"])
