"""Tuned kernel launch configs, persisted per GPU and loaded at run time with no re-tuning.

A config file lives at ``<profiles>/<gpu-slug>/<op>.json`` (format: profiles/README.md), where
``<profiles>`` is ``$FASTDIFF_PROFILES`` or the repository's ``profiles/`` folder and ``<gpu-slug>`` is
the device name lower-cased with runs of other characters turned into '-' (for example
``nvidia-h100-80gb-hbm3``). ``fastdiff tune`` writes the files; kernels call :func:`lookup` for a key
of their choosing (e.g. ``fwd|T_PAD=32|D=64|dtype=bfloat16``) and fall back to their own heuristics
when it returns None (untuned GPU, unknown key, unreadable file).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import itertools
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROFILES_ENV = "FASTDIFF_PROFILES"
FORMAT_VERSION = 1
_cache: dict[Path, tuple[float, dict]] = {}
_forced: dict[tuple[str, str], dict] = {}


def profiles_root() -> Path:
    env = os.environ.get(PROFILES_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "profiles"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device) -> str:
    """The name configs are filed under: the CUDA device name, or 'cpu' (the Triton interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def profile_path(op: str, gpu_name: str, root: Path | str | None = None) -> Path:
    return Path(root or profiles_root()) / slug(gpu_name) / f"{op}.json"


def load(op: str, gpu_name: str, root: Path | str | None = None) -> dict:
    """All tuned configs of ``op`` for this GPU ({key: config}); {} if none. Cached until the file changes."""
    path = profile_path(op, gpu_name, root)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    cached = _cache.get(path)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    try:
        data = json.loads(path.read_text())
        configs = data["configs"]
        if data.get("op") != op or not isinstance(configs, dict):
            raise ValueError(f"op {data.get('op')!r}, configs {type(configs).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"ignoring unreadable tuned-config file {path}: {err}; using default configs", stacklevel=2)
        configs = {}
    _cache[path] = (mtime, configs)
    return configs


def forced_config(op: str, key: str) -> dict | None:
    """The config :func:`forced` currently imposes on ``op``'s ``key`` (the AOT sweep, tests), or None."""
    return _forced.get((op, key))


def lookup(op: str, key: str, device, root: Path | str | None = None) -> dict | None:
    """The tuned config of ``op`` for ``key`` on ``device``'s GPU, or None (caller uses its heuristic)."""
    forced = forced_config(op, key)
    if forced is not None:
        return forced
    return load(op, device_name(device), root).get(key)


def save(op: str, configs: dict, gpu_name: str, root: Path | str | None = None, meta: dict | None = None) -> Path:
    """Merge ``configs`` into the GPU's file for ``op`` (new keys win) and write it atomically."""
    path = profile_path(op, gpu_name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {}
    if path.exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            merged = dict(json.loads(path.read_text())["configs"])
    merged.update(configs)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    data = {
        "format": FORMAT_VERSION,
        "op": op,
        "gpu": gpu_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        **(meta or {}),
        "configs": dict(sorted(merged.items())),
    }
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _cache.pop(path, None)
    return path


def grid(**axes) -> list[dict]:
    """Cartesian product of named candidate lists: grid(a=[1, 2], b=[3]) -> [{a:1,b:3}, {a:2,b:3}]."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


@contextlib.contextmanager
def forced(op: str, key: str, config: dict):
    """Make :func:`lookup` return ``config`` for (op, key) inside the block (used while sweeping)."""
    previous = _forced.get((op, key))
    _forced[(op, key)] = config
    try:
        yield
    finally:
        if previous is None:
            _forced.pop((op, key), None)
        else:
            _forced[(op, key)] = previous


def clear_cache() -> None:
    _cache.clear()


# --------------------------------------------------------------------------------------------------
# What the ahead-of-time compile sweep found per GPU arch and Triton version (fastdiff_kernels.aot writes
# fastdiff_kernels/aot_table.py from profiles/aot/*.json): configs to leave out of a tuning sweep on that
# arch (compile error, compile timeout, over the arch's shared memory) and replacements for heuristic
# defaults that spill or do not fit there.
# --------------------------------------------------------------------------------------------------


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device) -> int | None:
    """Compute capability as one number (sm_86 -> 86) for a CUDA device; None elsewhere (interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def triton_minor() -> str | None:
    """'3.6' for triton 3.6.0: the table is kept per Triton minor version (its compiler and ptxas)."""
    try:
        import triton
    except Exception:
        return None
    return ".".join(triton.__version__.split(".")[:2])


def config_id(cfg: dict, fields) -> str:
    """Canonical text of a config's launch fields: 'BLOCK_SEQ=2,num_stages=1,num_warps=4'."""
    return ",".join(f"{name}={int(cfg[name])}" for name in sorted(fields) if name in cfg)


def _aot_entries(op: str, key: str, arch: int | None, version: str | None) -> list[dict]:
    """Table entries for (op, key, arch): this Triton version's if the table has it, else every version's
    (newest first), so an unknown Triton version avoids whatever failed on any known one."""
    if arch is None:
        return []
    from fastdiff_kernels.aot_table import TABLE

    versions = [version] if version in TABLE else sorted(TABLE, key=lambda v: tuple(map(int, v.split("."))),
                                                         reverse=True)
    entries = []
    for v in versions:
        entry = TABLE[v].get(arch, {}).get(op, {}).get(key)
        if entry is not None:
            entries.append(entry)
    return entries


def aot_allowed(op: str, key: str, configs: list[dict], arch: int | None, fields,
                version: str | None = None) -> list[dict]:
    """``configs`` less those the AOT table rejects for ``arch`` (``version`` defaults to this Triton's)."""
    rejected = set()
    for entry in _aot_entries(op, key, arch, version or triton_minor()):
        rejected.update(entry.get("rejected", ()))
    return [cfg for cfg in configs if config_id(cfg, fields) not in rejected]


def aot_unlaunchable(op: str, key: str, arch: int | None, version: str | None = None) -> str | None:
    """Why no config of (op, key) can launch on ``arch`` (the AOT sweep compiled none that fits there), or None."""
    for entry in _aot_entries(op, key, arch, version or triton_minor()):
        if "no_default" in entry:
            return entry["no_default"]
    return None


def aot_default(op: str, key: str, arch: int | None, version: str | None = None) -> dict | None:
    """The AOT table's replacement default for (op, key) on ``arch``, or None (the heuristic stands)."""
    for entry in _aot_entries(op, key, arch, version or triton_minor()):
        if "default" in entry:
            return dict(entry["default"])
    return None


# --------------------------------------------------------------------------------------------------
# One kernel launch, as data: what a launcher runs and what the ahead-of-time sweep (fastdiff_kernels.aot)
# compiles, built by the same function in each kernel module, so the two can never disagree.
# --------------------------------------------------------------------------------------------------

# CUDA's grid limits: axis x up to 2^31 - 1 blocks, axes y and z up to 65,535.
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)


def check_grid(grid: tuple[int, ...]) -> None:
    """Raise ValueError for a grid CUDA would refuse at launch (an axis over its limit, or empty)."""
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"grid {grid} must have 1 to 3 axes")
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if not 0 <= size <= limit:
            raise ValueError(f"grid {grid}: axis {axis} has {size:,} programs, over CUDA's limit of {limit:,}")


@dataclass(frozen=True)
class Launch:
    """A Triton kernel, its grid, runtime arguments, constexprs and compile options.

    ``num_stages=None`` leaves Triton's default. Launchers call it (through ``torch.library.wrap_triton``
    when the kernel runs inside a ``triton_op``); the AOT sweep builds one on meta tensors and compiles it
    for a GPU arch without running it.
    """

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int | None = None

    def __post_init__(self):
        check_grid(self.grid)

    def options(self) -> dict:
        out = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            out["num_stages"] = self.num_stages
        return out

    def __call__(self, wrap: bool = True):
        kernel = torch.library.wrap_triton(self.kernel) if wrap else self.kernel
        return kernel[self.grid](*self.args, **self.constexprs, **self.options())


def sweep(op: str, key: str, candidates: list[dict], call, default: dict, log=print) -> dict | None:
    """Time `call` under every candidate config of `op`'s `key` (triton.testing.do_bench, GPU only) and return the
    fastest as {**config, "ms", "default_ms"}; a candidate that cannot launch (out of resources) is skipped and said
    so. None when none launched."""
    from triton.testing import do_bench

    best = None
    for cfg in candidates:
        try:
            with forced(op, key, cfg):
                ms = do_bench(call, warmup=10, rep=40)
        except Exception as err:  # out of resources for this config: skip it
            log(f"  {key} {cfg}: skipped ({type(err).__name__})")
            continue
        if best is None or ms < best["ms"]:
            best = {**cfg, "ms": round(ms, 5)}
    if best is not None:
        with forced(op, key, default):
            best["default_ms"] = round(do_bench(call, warmup=10, rep=40), 5)
    return best
