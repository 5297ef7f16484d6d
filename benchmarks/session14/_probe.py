"""Shared by the session-14 probes: the SM clock and board power sampled in the background, and
the bench grid's inputs (B = 16K / N, H = 2048 / D, bf16, bnhd plus a bhnd copy for SDPA)."""

from __future__ import annotations

import statistics
import subprocess
import threading
import time

import torch


class ClockSampler:
    """nvidia-smi's SM clock (MHz) and power (W) every ~20 ms, on a daemon thread; with
    reasons=True also the active clock-event (throttle) reasons, as a hex string."""

    def __init__(self, period_s: float = 0.02, reasons: bool = False) -> None:
        self.samples: list[tuple] = []  # (time, clock, power[, reasons])
        self._period = period_s
        self._fields = "clocks.sm,power.draw" + (",clocks_event_reasons.active" if reasons else "")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        query = ["nvidia-smi", f"--query-gpu={self._fields}", "--format=csv,noheader,nounits"]
        while True:
            r = subprocess.run(query, capture_output=True, text=True)
            try:
                clock, power, *reasons = (x.strip() for x in r.stdout.strip().split(","))
                self.samples.append((time.time(), int(clock), float(power), *reasons))
            except ValueError:
                pass
            time.sleep(self._period)

    def window(self, start: float, end: float) -> list[tuple]:
        return [s for s in self.samples if start <= s[0] <= end]

    def median_clock(self, start: float, end: float) -> float | None:
        clocks = [s[1] for s in self.window(start, end)]
        return statistics.median(clocks) if clocks else None


def grid_inputs(d: int, n: int, seed: int = 0):
    """q, k, v (B, N, H, D) and their (B, H, N, D) copies at the bench grid's shape."""
    b, h = max(1, 16384 // n), 2048 // d
    torch.manual_seed(seed)
    q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return (q, k, v), (qt, kt, vt), b, h


def sdpa(backend, qt, kt, vt, causal: bool):
    """A no-argument call of torch SDPA forced to one backend (FLASH_ATTENTION, CUDNN_ATTENTION)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return call


def api(q, k, v, causal: bool):
    """A no-argument call of longflash.attention on the cuda backend."""
    import longflash

    return lambda: longflash.attention(q, k, v, causal=causal, backend="cuda")
