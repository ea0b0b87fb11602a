"""How a fastdiff process uses its CPU host: how OpenMP threads wait, and whether freed memory goes back to the OS.

Both must be decided before the work starts (OpenMP's policy before torch loads), so `fastdiff.cli.main` calls
them once the arguments parse, before the command runs. Nothing here imports torch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

# Other processes' use of this process's cores, in cores, under which OpenMP threads spin instead of sleeping.
QUIET_CORES = 0.5
# How long the cores' use is sampled at start-up: 25 scheduler ticks a core at Linux's 100 Hz.
SAMPLE_SECONDS = 0.25


def cpu_ticks(cpus: set[int] | None, stat_path: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) scheduler ticks since boot summed over `cpus` (None: the whole machine), from /proc/stat's
    per-cpu lines; None where the file cannot be read or lists none of them (not Linux)."""
    try:
        with open(stat_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    busy = total = 0
    found = False
    for line in lines:
        name, *fields = line.split() or [""]
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
        found = True
    return (busy, total) if found else None


def usable_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity: a container or taskset gives fewer than the machine has);
    None where the platform does not say (not Linux)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:
        return None


def busy_cores(seconds: float = SAMPLE_SECONDS, stat_path: str = "/proc/stat", sleep=time.sleep) -> float | None:
    """Cores that other processes keep busy now, among those this process may run on (its affinity), sampled over
    `seconds` while this process sleeps; None where it cannot be measured."""
    cpus = usable_cpus()
    before = cpu_ticks(cpus, stat_path)
    if before is None:
        return None
    sleep(seconds)
    after = cpu_ticks(cpus, stat_path)
    if after is None or after[1] <= before[1]:
        return None
    cores = len(cpus) if cpus is not None else (os.cpu_count() or 1)
    return cores * (after[0] - before[0]) / (after[1] - before[1])


def openmp_wait_policy(busy_now=None) -> str:
    """How OpenMP threads wait for work, unless the user set OMP_WAIT_POLICY: spinning (ACTIVE) on a quiet machine,
    sleeping (PASSIVE) on a busy one. Measured on 2 cores with the tiny step at 2 threads: on an idle machine
    spinning waits take 75 ms a step against 101 ms for sleeping ones (which then gain nothing over 1 thread);
    with both cores busy, spinning threads take the cores the working ones need (2x the CPU and 1.7x the wall
    time). Quiet means other processes use under QUIET_CORES of this process's cores now. Not the 1-minute load
    average, which this chose from before: it still counts a job that ended a minute ago (an install, the
    previous run), and a default job started right after one ran with sleeping waits at 1.6x the time (400
    frames of `tiny` at 2 threads: 47 s against 29 s, 2026-12-07). Where /proc/stat is missing, the load
    average decides; where that is missing too, sleeping waits, the safe choice. `busy_now`: a callable in place
    of busy_cores (tests)."""
    now = (busy_now or busy_cores)()
    if now is None:
        try:
            now = os.getloadavg()[0]
        except OSError:
            return "PASSIVE"
    return "ACTIVE" if now < QUIET_CORES else "PASSIVE"


# glibc's malloc hands big blocks (its dynamic threshold starts at 128 KiB) to mmap and returns freed heap tops
# above its trim threshold to the OS; the training step frees and reallocates the same activations every step,
# so each one comes back as fresh pages the kernel must fault in and zero. Measured on 2 cores (2026-12-07): the
# latent default job faulted 30 million pages in 9.5 minutes; 400 frames after a 300-step autoencoder fit, 6.8-7.1
# million faults and 14-18 s of system time against 0.22 million and 2 s with these thresholds, 57-64 s of wall
# time against 52. A process keeps what it freed, up to TRIM_THRESHOLD: its peak, which it needed anyway.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, in this process (mallopt) and in the processes it starts
    (glibc reads MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at their start), unless the user set either.
    Returns whether this process's allocator took the setting (False: not glibc, or the user's own setting)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl has no tunable thresholds; macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
