"""Timing and peak-memory measurement of one callable, on CPU or CUDA.

Wall-clock timing of whole batched calls with ``time.perf_counter``, synchronising the CUDA device
around each call; summaries are median, quartiles and extremes over the repeats. Peak memory is
measured in separate, untimed calls: on CUDA the caching allocator's peak above what was allocated
before the call; on the CPU the peak of torch's allocations traced by the profiler, plus the
growth of the process's peak resident set as a coarse check on memory the profiler cannot see.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``len(times)`` repeats (after warm-up)."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile of the repeats (q in [0, 1])."""
        xs = sorted(self.times)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def q25(self) -> float:
        return self.quantile(0.25)

    @property
    def q75(self) -> float:
        return self.quantile(0.75)


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """One synchronised call: ``(seconds, result)``."""
    sync = synchronizer(device)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def repeat(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[Timing, object]:
    """``repeats`` synchronised calls (the caller has warmed up): their timing and the last result."""
    times = []
    result = None
    for _ in range(max(1, repeats)):
        result = None  # free the previous output before the next call
        seconds, result = time_call(fn, device)
        times.append(seconds)
    return Timing(tuple(times)), result


# ---------------------------------------------------------------------- memory
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"{field} not in {_STATUS}")
    return int(match.group(1))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines); Python exceptions still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _torch_cpu_peak(fn: Callable[[], object]) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn`` above its level before, from the
    profiler's allocation events (each event's own allocations, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for event in events:
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return int(peak)


def rss_growth(fn: Callable[[], object]) -> int | None:
    """Growth of the process's peak resident set during ``fn`` (``VmHWM`` reset through
    ``/proc/self/clear_refs``; Linux only). Coarse: memory the allocators reuse counts as zero, but
    it sees what the torch profiler cannot (malloc inside compiled code, numpy)."""
    try:
        _CLEAR_REFS.write_text("5")
        base = _status_kib("VmRSS")
        result = fn()
        grown = _status_kib("VmHWM") - base
    except OSError:
        return None
    del result
    return max(0, grown) * 1024


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes the call needed above what was allocated before it: on CUDA the caching allocator's
    peak, on the CPU torch's allocations traced by the profiler."""
    gc.collect(0)  # the young garbage only: a full collection costs a third of a second with torch loaded
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(peak)
    try:
        return _torch_cpu_peak(fn)
    except RuntimeError:  # profiler unavailable or already running
        return None


def limit_threads(threads: int):
    """Cap the BLAS and OpenMP thread pools of every library loaded so far (threadpoolctl, when installed;
    else None and only torch's own setting applies). The cap holds until the returned object is
    used as a context manager and exits, or for good when it is not."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads)


def python_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through Python's and numpy's allocators during ``fn`` (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return int(peak)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 27, repeats: int = 5) -> float:
    """Achievable memory bandwidth in GB/s: the best of ``repeats`` tensor copies (read + write)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(time_call(lambda: dst.copy_(src), device)[0] for _ in range(repeats))
    return 2 * nbytes / best / 1e9
