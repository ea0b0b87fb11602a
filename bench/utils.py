"""What every benchmark in bench/ shares, written once: timing, the ceilings a share is taken of, the rows
files, the output-path rule, device naming, the common command line, and the check that no share claims
more than its ceiling.

Imported as ``utils`` from the benchmarks' own folder: ``python bench/bench_x.py`` puts bench/ first on
sys.path, and pytest (rootdir-relative "prepend" import of a folder without __init__.py) does the same
when it collects bench/bench_*.py. bench/ is deliberately not a package: a package would make pytest put
the checkout's root on sys.path, which conftest.py keeps off it (kernels/ would shadow Hugging Face's
``kernels``).

Timing. On CUDA, ``triton.testing.do_bench`` (warm-up, L2 flush, its own repetition count) gives the
quartiles. On a CPU, where other jobs share the cores, implementations compared side by side are timed
interleaved (A B A B ...) with perf_counter after a warm-up, and each reports its median and quartiles:
a load spike then hits every implementation alike instead of one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# rows whose key starts with this are a measured rate over a ceiling measured in the same run
SHARE_PREFIX = "share_of_"


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


def device_name(device) -> str:
    """The name rows are filed under: the CUDA device's name, or 'cpu'."""
    from fastdiff_kernels import autotune

    return autotune.device_name(torch.device(device))


def significant(value: float, digits: int = 4) -> float:
    """`value` to `digits` significant digits, for rates in rows: a slow row stays positive (round(x, 2) gave a
    CPU smoke row 0.0 GB/s on a busy machine)."""
    return float(f"{value:.{digits}g}")


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ timing


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and quartiles over the samples."""

    median: float
    q1: float
    q3: float
    samples: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, samples_ms: list[float]) -> Timing:
        if len(samples_ms) == 1:
            return cls(samples_ms[0], samples_ms[0], samples_ms[0], 1)
        q1, median, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
        return cls(median, q1, q3, len(samples_ms))

    def fields(self, prefix: str = "") -> dict:
        """Row fields: ms (median), iqr_ms, and how many samples they summarize."""
        return {f"{prefix}ms": round(self.median, 5), f"{prefix}iqr_ms": round(self.iqr, 5),
                f"{prefix}samples": self.samples}


def side_by_side(fns: dict[str, Callable[[], object]], device, repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time each no-argument function; on a CPU interleaved, ``repeats`` rounds after ``warmup`` rounds.

    Every function is run (and synchronized) as a whole per sample, so a function may be a whole
    training step; on CUDA each is handed to do_bench, which picks its own repetition count."""
    if is_cuda(device):
        from triton.testing import do_bench

        out = {}
        for name, fn in fns.items():
            q1, median, q3 = do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
            out[name] = Timing(float(median), float(q1), float(q3), 0)
        return out
    for _ in range(warmup):  # compilation, allocator growth, first-touch of the weights
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: Timing.of(s) for name, s in samples.items()}


def time_ms(fn: Callable[[], object], device, repeats: int = 5) -> float:
    """Median milliseconds of one function."""
    return side_by_side({"fn": fn}, device, repeats)["fn"].median


def _best_ms(fn: Callable[[], object], device, repeats: int, min_samples: int = 30,
             min_seconds: float = 0.1) -> float:
    """The fastest of the samples: what a ceiling is measured by (a ceiling is the best the device does).

    On a CPU it takes at least ``min_samples`` samples and ``min_seconds``, whatever ``repeats`` says: on a
    shared machine any one sample may be preempted, and a ceiling read too low would let an op claim more
    than the machine can do."""
    if is_cuda(device):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.05, 0.5])[0])
    fn()
    best, samples, started = float("inf"), 0, time.perf_counter()
    while samples < max(repeats, min_samples) or time.perf_counter() - started < min_seconds:
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) * 1e3)
        samples += 1
    return best


@contextlib.contextmanager
def trace_only_compile():
    """torch.compile with dynamo tracing (fullgraph still refuses a graph break) but no code generation: what a
    smoke run on a CPU compiles with, where inductor's code generation alone takes minutes on two cores."""
    compile_ = torch.compile

    def traced(model=None, **kwargs):
        return compile_(model, **{**kwargs, "backend": "eager"})

    torch.compile = traced
    try:
        yield
    finally:
        torch.compile = compile_


def smoke_compile(run) -> contextlib.AbstractContextManager:
    """trace_only_compile() for a --smoke run on a CPU, else torch.compile as it is."""
    return trace_only_compile() if run.smoke and not is_cuda(run.device) else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- ceilings


def copy_bandwidth_gbs(device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Measured device copy bandwidth (read + write bytes / time): the ceiling a memory-bound op can reach.

    ``nbytes`` should be about the traffic of the op it is a ceiling for: on a CPU a working set that fits
    in cache copies many times faster than one that streams from DRAM, and a tiny op compared with a
    DRAM-sized copy would claim more than the machine can do."""
    if nbytes is None:
        nbytes = (512 << 20) if is_cuda(device) else (16 << 20)
    numel = max(1024, nbytes // 2 // 4)  # source and destination together move nbytes of fp32
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def matmul_ceiling_tflops(device, shapes: list[tuple[int, int, int]], dtypes: list[torch.dtype],
                          repeats: int = 5) -> tuple[float, str]:
    """The best dense matmul rate over the given (m, k, n) shapes and dtypes, measured now: the ceiling the
    model's FLOP rate is a share of. Pass the shapes and dtypes the model runs (and a large square one):
    a rate measured on other shapes is no ceiling for these."""
    best, label = 0.0, ""
    for m, k, n in shapes:
        for dtype in dtypes:
            a = torch.randn(m, k, device=device).to(dtype)
            b = torch.randn(k, n, device=device).to(dtype)
            ms = _best_ms(lambda a=a, b=b: a @ b, device, repeats)
            rate = 2.0 * m * k * n / (ms * 1e-3) / 1e12
            if rate > best:
                best, label = rate, f"{str(dtype).removeprefix('torch.')} {m}x{k}x{n}"
    return best, label


def share_violations(rows: list[dict], limit: float = 1.0) -> list[str]:
    """Every ``share_of_*`` value above ``limit`` (a rate above its ceiling), as 'row i: key=value' lines."""
    return [f"row {i} ({row.get('impl') or row.get('config') or row.get('op')}): {key}={value}"
            for i, row in enumerate(rows) for key, value in row.items()
            if key.startswith(SHARE_PREFIX) and isinstance(value, int | float) and value > limit]


# ------------------------------------------------------------------------------------------------- rows


def write_rows(rows: list[dict], out_path) -> None:
    """Rows as JSON at out_path (suffix .json) and as CSV beside it."""
    out_path = Path(out_path).with_suffix(".json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rows, indent=1) + "\n")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(out_path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def default_out_path(device, name: str) -> Path | None:
    """Where rows go without --out: $FASTDIFF_BENCH_OUT/<name>.json, else profiles/<gpu>/<name>.json on a GPU;
    on a CPU nowhere (CPU rows are smoke checks, not numbers to keep)."""
    env = os.environ.get("FASTDIFF_BENCH_OUT")
    if env:
        return Path(env) / f"{name}.json"
    if is_cuda(device):
        from fastdiff_kernels import autotune

        return autotune.profiles_root() / autotune.slug(device_name(device)) / f"{name}.json"
    return None


# ---------------------------------------------------------------------------------------- command line


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes (``fastdiff bench`` passes them alike to all of them)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--out", default=None, help="rows file FILE.json (a .csv is written beside it); default: "
                                               "profiles/<gpu>/ on a GPU, none on a CPU")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks every code path runs, in seconds")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per measurement")
    return p


@dataclass(frozen=True)
class Run:
    """A benchmark's resolved command line."""

    device: torch.device
    out: Path | None
    smoke: bool
    repeats: int


def resolve(args: argparse.Namespace, name: str, repeats: int = 5, smoke_repeats: int = 1) -> Run:
    """The run a benchmark's flags ask for. A smoke run on a CPU takes one intra-op thread: its ops are tiny, a
    second thread only spin-waits for the first, and on a shared machine a descheduled peer thread makes every
    op wait (ten times slower under load)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)
    out = Path(args.out) if args.out else default_out_path(device, name)
    reps = args.repeats or (smoke_repeats if args.smoke else repeats)
    return Run(device, out, bool(args.smoke), reps)
