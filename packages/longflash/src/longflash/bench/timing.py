"""How long a call takes and how much memory it needs, without a framework.

The device timers (CUDA events) live with their framework's harness; this module holds
the policy they share (how many warm-up and timed runs), the statistics, a wall-clock
timer for the CPU and for JAX, and the host peak-memory probe.
"""

from __future__ import annotations

import ctypes
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TimingPolicy:
    """triton.testing.do_bench's rule: estimate one run, then warm up for ``warmup_ms``
    and time for ``rep_ms``, clamped to [min_reps, max_reps]. ``reps`` fixes the count
    (and caps the warm-up at as many runs)."""

    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int
    reps: int | None = None
    estimate_runs: int = 1

    def counts(self, estimate_ms: float) -> tuple[int, int]:
        est = max(estimate_ms, 1e-3)
        warmup = max(1, min(self.max_reps, int(self.warmup_ms / est)))
        if self.reps is not None:
            return min(warmup, self.reps), self.reps
        return warmup, max(self.min_reps, min(self.max_reps, int(self.rep_ms / est)))


# On a GPU "many runs": ~0.25 s of timed runs per measurement, at most 1000; at least 5
# for the slow peers (a score-materialising backward at 16K takes about a second).
GPU_POLICY = TimingPolicy(warmup_ms=50.0, rep_ms=250.0, min_reps=5, max_reps=1000, estimate_runs=3)
# On a CPU "a few runs": 3 for calls of 50 ms and more, up to 30 for short calls, whose
# single times scatter most when other processes share the cores.
CPU_POLICY = TimingPolicy(warmup_ms=20.0, rep_ms=150.0, min_reps=3, max_reps=30)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float  # spread of the middle half: a noisy measurement shows here
    reps: int
    warmup: int

    def to_json(self) -> dict:
        return {
            "ms": self.median_ms,
            "ms_min": self.min_ms,
            "ms_max": self.max_ms,
            "ms_iqr": self.iqr_ms,
            "reps": self.reps,
            "warmup": self.warmup,
        }


def summarize(times_ms: list[float], warmup: int) -> Timing:
    if not times_ms:
        raise ValueError("no timed runs")
    ts = sorted(times_ms)
    if len(ts) >= 4:
        q = statistics.quantiles(ts, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ts[-1] - ts[0]
    return Timing(statistics.median(ts), ts[0], ts[-1], iqr, len(ts), warmup)


def time_wallclock(
    fn: Callable[[], object], policy: TimingPolicy, sync: Callable[[object], object] = lambda r: r
) -> Timing:
    """Median wall-clock time of ``sync(fn())``. For the CPU, and for JAX where
    ``sync`` blocks until the result is ready (dispatch cost included, a few µs)."""

    def once() -> float:
        t0 = time.perf_counter()
        sync(fn())
        return (time.perf_counter() - t0) * 1e3

    est = [once() for _ in range(policy.estimate_runs)]
    warmup, reps = policy.counts(min(est))
    for _ in range(warmup - policy.estimate_runs):
        once()
    return summarize([once() for _ in range(reps)], warmup)


# -- host memory --------------------------------------------------------------------
class HostPeakMemory:
    """Peak resident memory of this process during a call, above what it held before.

    On Linux the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs
    before the call, so the figure is the call's own peak ("rss-peak"). Elsewhere only
    getrusage's lifetime maximum exists ("maxrss-delta"): a lower bound that reads 0 when
    the call stays under an earlier peak. Freed heap is returned to the system first
    (malloc_trim) so that reused free memory does not hide the call's allocations.
    """

    def __init__(self) -> None:
        self._libc = None
        if sys.platform.startswith("linux"):
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None
        self.method = "rss-peak" if self._can_reset() else "maxrss-delta"

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kb("VmHWM") is not None
        except OSError:
            return False

    def measure(self, fn: Callable[[], object]) -> int:
        if self._libc is not None:
            self._libc.malloc_trim(0)
        if self.method == "rss-peak":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base, base_anon = _status_kb("VmRSS") or 0, _status_kb("RssAnon") or 0
            result = fn()
            peak, anon = _status_kb("VmHWM") or 0, _status_kb("RssAnon") or 0
            del result
            # Under memory pressure the kernel may drop file pages (library code) from the
            # resident set during the call, which hides part of the peak; the growth of
            # anonymous memory still alive (the outputs) bounds it from below.
            return max(0, peak - base, anon - base_anon) * 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del result
        unit = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return max(0, after - before) * unit


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_host_memory() -> int | None:
    """MemAvailable in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 and math.isfinite(ms) else float("nan")
