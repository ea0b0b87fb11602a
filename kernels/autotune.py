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


def lookup(op: str, key: str, device, root: Path | str | None = None) -> dict | None:
    """The tuned config of ``op`` for ``key`` on ``device``'s GPU, or None (caller uses its heuristic)."""
    forced = _forced.get((op, key))
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
