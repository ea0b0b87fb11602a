"""Host syncs and capture hazards, caught on any device (the CPU included).

`torch.cuda.set_sync_debug_mode("error")` exists only on a GPU, and a CUDA graph only fails on one. These two
dispatch modes see every aten op a block of code runs, on CPU tensors as on CUDA ones, so the suite can prove
on a CPU that the sync-free step stays sync-free and stays capturable:

- :class:`NoHostSync` raises :class:`HostSyncError` on every op that would make the host wait for a CUDA stream:
  a value read on the host (``.item()``, ``float()``, ``bool()``, ``int()``, ``if tensor:``, ``f"{t:.3f}"``, all
  through ``aten._local_scalar_dense``), ops whose output shape depends on the data (``nonzero``, ``torch.where``
  with one argument, boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave``
  without ``output_size``), comparisons answered on the host (``equal``, ``allclose``, ``is_nonzero``), a copy
  from a device to the host, and a tensor made from host data inside the block (``torch.tensor(...)``: a
  host-to-device copy every step, and a constant baked into a captured graph). What it cannot see: ``.tolist()``
  and ``.numpy()`` of CPU tensors read memory without dispatching; on CUDA they would go through a copy it sees.
- :class:`CaptureAudit` records what each step does so that two steps can be compared (:func:`replay_hazards`):
  a captured graph replays the first step's ops on the first step's storage with the first step's host values,
  so every later step must run the same ops, read its persistent inputs (parameters, optimizer state, the live
  ring, the replay buffer, counters) from the same storage, pass the same host scalars (a learning rate or an
  EMA decay computed on the host would be frozen at capture) and draw its randomness from the generator the
  graph registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# op -> why the host waits for the device there
SYNC_OPS = {
    aten._local_scalar_dense: "reads a tensor's value on the host (.item(), float(), bool(), int(), `if t:`)",
    aten.is_nonzero: "answers `bool(tensor)` on the host",
    aten.equal: "torch.equal answers on the host",
    aten.allclose: "torch.allclose answers on the host",
    aten.nonzero: "the output's size depends on the data (nonzero / one-argument torch.where)",
    aten.masked_select: "the output's size depends on the data",
    aten._unique: "the output's size depends on the data",
    aten._unique2: "the output's size depends on the data",
    aten.unique_dim: "the output's size depends on the data",
    aten.unique_consecutive: "the output's size depends on the data",
    aten.unique_dim_consecutive: "the output's size depends on the data",
    aten.bincount: "the output's size depends on the data (max of the input)",
}
HOST_DATA = "makes a tensor from host data (a host-to-device copy, a constant in a captured graph)"
RANDOM_OPS = {aten.rand, aten.randn, aten.randint, aten.randperm, aten.normal, aten.normal_, aten.uniform_,
              aten.bernoulli, aten.bernoulli_, aten.multinomial, aten.exponential_, aten.random_, aten.rand_like,
              aten.randn_like, aten.randint_like}


class HostSyncError(RuntimeError):
    """An op that synchronises the host with the device ran where none may."""


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


def sync_reason(func, args, kwargs) -> str | None:
    """Why `func(*args, **kwargs)` would make the host wait for the device, or None."""
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return SYNC_OPS[packet]
    if packet is aten.lift_fresh and args[0].numel() > 1:  # a 0-dim one is a Python scalar (`t[i] = 1.0`)
        return HOST_DATA
    if packet in (aten.index, aten.index_put, aten.index_put_) and _boolean_index(args):
        return "boolean-mask indexing (a nonzero inside: the output's size depends on the data)"
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size (the output's size depends on the data)"
    if packet in (aten._to_copy, aten.copy_):
        source = args[1] if packet is aten.copy_ else args[0]
        target_cpu = (args[0].device.type == "cpu") if packet is aten.copy_ else \
            (torch.device(kwargs["device"]).type == "cpu" if kwargs.get("device") is not None else False)
        if target_cpu and isinstance(source, torch.Tensor) and source.device.type != "cpu":
            return "copies a device tensor to the host"
    return None


class NoHostSync(TorchDispatchMode):
    """Raise HostSyncError on the first op in the block that would synchronise the host with a CUDA stream
    (see the module docstring), on any device: the CPU's `torch.cuda.set_sync_debug_mode("error")`.

    torch.compile refuses to run under a dispatch mode: wrap a compiled module with :func:`unchecked` so that it
    runs outside this one. fullgraph=True already guarantees that it holds no host sync (each would be a graph
    break, which fullgraph refuses), so nothing goes unchecked."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = sync_reason(func, args, kwargs)
        if why is not None:
            raise HostSyncError(f"{func} {why}")
        return func(*args, **kwargs)


def unchecked(module: torch.nn.Module):
    """`module`'s forward, run with the dispatch modes suspended (for a torch.compile'd module, see NoHostSync)."""
    from torch.utils._python_dispatch import _disable_current_modes

    def forward(*args, **kwargs):
        with _disable_current_modes():
            return module(*args, **kwargs)

    return forward


@dataclass
class OpRecord:
    name: str
    scalars: tuple  # the op's non-tensor arguments (host values a captured graph freezes)
    inputs: tuple  # storage addresses of the tensors it reads that the step did not make itself
    generator: str | None = None  # a random op's generator: "registered", "default" or "other"


@dataclass
class CaptureAudit(TorchDispatchMode):
    """Record every op of one or more steps; :meth:`new_step` starts the next step's record. `generator` is the
    one the step registers with its graph: a random op drawing from any other is recorded as such."""

    generator: torch.Generator | None = None
    steps: list[list[OpRecord]] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()
        self._made: set[int] = set()

    def new_step(self) -> None:
        self.steps.append([])
        self._made = set()  # storage made by this step: not a persistent input

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        generator = None
        if func.overloadpacket in RANDOM_OPS:
            gens = [v for v in leaves if isinstance(v, torch.Generator)]
            # the dispatcher hands over a new Python wrapper of the same generator: tell them apart by state
            generator = "default" if not gens else (
                "registered" if self.generator is not None and torch.equal(gens[0].get_state(),
                                                                            self.generator.get_state()) else "other")
        out = func(*args, **kwargs)
        if not self.steps:
            self.new_step()
        read = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        inputs = () if func.overloadpacket is aten.lift_fresh else tuple(  # lifted host data: compared by value
            t.untyped_storage().data_ptr() for t in leaves
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self._made)
        scalars = tuple(_scalar(v) for v in leaves if not isinstance(v, torch.Tensor | torch.Generator))
        if func.overloadpacket is aten.lift_fresh:  # host data: its values are what a graph would freeze
            scalars += tuple(args[0].reshape(-1).tolist())
        self.steps[-1].append(OpRecord(str(func), scalars, inputs, generator))
        lifted = func.overloadpacket is aten.lift_fresh  # host data made in the step: the step's own
        for t in tree_leaves(out):  # new storage only: a view or an in-place result is still its input's storage
            if isinstance(t, torch.Tensor) and (lifted or t.untyped_storage().data_ptr() not in read):
                self._made.add(t.untyped_storage().data_ptr())
        return out


def _scalar(value):
    if value is None or isinstance(value, bool | int | float | complex | str):
        return value
    if isinstance(value, torch.dtype | torch.device | torch.layout | torch.memory_format):
        return str(value)
    return type(value).__name__  # an opaque object (a profiler handle, say): only its kind can be compared


def replay_hazards(first: list[OpRecord], later: list[OpRecord]) -> list[str]:
    """What would go wrong if `first` were captured and replayed in place of `later`; [] when nothing would."""
    problems = []
    if [r.name for r in first] != [r.name for r in later]:
        names_a, names_b = [r.name for r in first], [r.name for r in later]
        at = next((i for i, (a, b) in enumerate(zip(names_a, names_b)) if a != b), min(len(names_a), len(names_b)))
        problems.append(f"the step runs other ops from op {at} on ({len(names_a)} vs {len(names_b)} ops): "
                        f"{names_a[at:at + 3]} vs {names_b[at:at + 3]} (a decision taken on the host)")
        return problems
    for i, (a, b) in enumerate(zip(first, later)):
        if a.scalars != b.scalars:
            problems.append(f"op {i} {a.name}: host values {a.scalars} then {b.scalars} (a graph would keep the first)")
        if a.inputs != b.inputs:
            problems.append(f"op {i} {a.name}: reads other storage in the later step (a tensor made or rebound outside "
                            "the step: a graph would read the old one)")
        if a.generator not in (None, "registered"):
            which = "the default generator" if a.generator == "default" else "another generator"
            problems.append(f"op {i} {a.name}: draws from {which}, not the step's registered generator")
    return problems
