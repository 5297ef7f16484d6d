"""What the harnesses share: contenders, measurements, and how a failure is recorded.

A contender is a forward function over (q, k, v) plus how it wants its inputs laid out;
the framework's harness derives the timed forward, the timed backward, the memory run and
the correctness check from it, so every contender is measured the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from longflash.bench.cases import Case
from longflash.bench.timing import Timing, TimingPolicy, available_host_memory, tflops
from longflash.call import AttentionCall, normalize_window
from longflash.registry import REGISTRY

KINDS = ("longflash", "peer")

# Relative Frobenius error of the output on sampled rows, against a float64 (CPU) or
# float32 (GPU) evaluation of the same rows. These catch a broken kernel, not a slightly
# inaccurate one: the conformance suite owns the tight tolerances.
CHECK_TOLERANCE = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 4e-2}
CHECK_ROWS = 64


class Skip(Exception):
    """A contender declines a case (unsupported shape, dtype, feature, or device)."""


@dataclass
class Contender:
    name: str
    kind: str  # "longflash" | "peer"
    description: str
    # (case) -> fn(q, k, v) -> out, in ``layout``; raises Skip to decline the case.
    make: Callable[[Case], Callable[..., Any]]
    layout: str = "bnhd"  # "bnhd" (longflash, jax) or "bhnd" (SDPA, FlexAttention)
    # Entered around every call, forward and backward (backend or path forcing).
    context: Callable[[], AbstractContextManager] = contextlib.nullcontext
    # Materialises the B·H·Nq·Nk score matrix: on the CPU it is skipped when that
    # cannot fit in memory, rather than letting the kernel's OOM killer end the run.
    dense: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class Measurement:
    case: Case
    contender: str
    kind: str
    status: str  # "ok" | "skipped" | "incorrect"
    reason: str = ""
    timing: Timing | None = None
    peak_mem_bytes: int | None = None
    max_rel_err: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ms(self) -> float | None:
        return self.timing.median_ms if self.timing else None

    @property
    def tflops(self) -> float | None:
        return tflops(self.case.flops(), self.timing.median_ms) if self.timing else None

    def to_json(self, matmul_tflops: float | None = None) -> dict:
        d: dict[str, Any] = {
            "case": self.case.key,
            "contender": self.contender,
            "kind": self.kind,
            "status": self.status,
            "reason": self.reason,
            "flops": self.case.flops(),
            "tflops": self.tflops,
            "peak_mem_bytes": self.peak_mem_bytes,
            "max_rel_err": self.max_rel_err,
            "fraction_of_matmul": (
                self.tflops / matmul_tflops if self.tflops and matmul_tflops else None
            ),
        }
        d.update(self.timing.to_json() if self.timing else {"ms": None})
        d.update(self.extra)
        return d


class Harness(Protocol):
    """One framework on one device: builds contenders and measures them."""

    framework: str
    device: str
    timing_method: str
    memory_method: str
    policy: TimingPolicy

    def contenders(
        self, backends: list[str] | None, peers: list[str] | None
    ) -> list[Contender]: ...

    def measure(self, case: Case, contender: Contender) -> Measurement: ...

    def ceilings(self, quick: bool) -> dict: ...

    def device_info(self) -> dict: ...


def skipped(case: Case, c: Contender, reason: str) -> Measurement:
    return Measurement(case, c.name, c.kind, "skipped", reason=reason)


def describe_error(exc: BaseException) -> str:
    """One readable line for a contender that raised: out of memory, unsupported, or the
    exception's first line."""
    name = type(exc).__name__
    msg = str(exc).strip()
    first = msg.splitlines()[0] if msg else ""
    low = msg.lower()
    if (
        "out of memory" in low
        or name in ("OutOfMemoryError", "MemoryError")
        or ("resource_exhausted" in low)
    ):
        return f"out of memory ({name}: {first[:200]})" if first else "out of memory"
    if isinstance(exc, Skip):
        return msg
    if name == "UnsupportedError":
        return f"unsupported: {' '.join(msg.split())[:400]}"
    return f"{name}: {first[:300]}"


def dense_bytes(case: Case) -> int:
    """Host memory a score-matrix implementation needs: the scores and probabilities in
    fp32, twice more for their gradients in the backward."""
    copies = 2 if case.direction == "fwd" else 4
    return copies * 4 * case.B * case.Hq * case.Nq * case.Nk


def sample_rows(n: int, count: int = CHECK_ROWS) -> list[int]:
    """Query rows to check: spread over the sequence, always the first and the last (the
    last sees every key; the first sees one under a causal mask)."""
    if n <= count:
        return list(range(n))
    step = (n - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


def dense_skip_reason(case: Case, c: Contender, device: str) -> str | None:
    """Why a score-materialising contender must not run this case on the host, if so."""
    if device != "cpu" or not c.dense:
        return None
    need, have = dense_bytes(case), available_host_memory()
    if have is None or need <= 0.8 * have:
        return None
    return f"needs ~{need / 2**30:.1f} GiB for the score matrix; {have / 2**30:.1f} GiB available"


# -- LongFlash backends as contenders ----------------------------------------------------------
def longflash_contenders(
    framework: str, device: str, requested: list[str] | None
) -> list[Contender]:
    """Each requested backend (default: every available one for the framework) called
    through longflash.attention; the reference once per forced path."""
    import longflash

    if requested is not None:
        for name in requested:
            REGISTRY.get(name)  # an unknown name: ValueError listing the registered ones
        names = list(requested)
    else:
        # On a GPU the reference is the test oracle, not a contender: its exact path is
        # the naive peer and its blockwise path a Python loop. --backends names it.
        names = [
            b.name
            for b in longflash.backends()
            if b.available
            and framework in b.frameworks
            and not (b.name == "reference" and device != "cpu")
        ]

    out = []
    for name in names:

        def make(case: Case, name: str = name) -> Callable[..., Any]:
            call = AttentionCall(
                framework=framework,
                device=device,
                dtype=case.dtype,
                B=case.B,
                Nq=case.Nq,
                Nk=case.Nk,
                Hq=case.Hq,
                Hk=case.Hk,
                Dqk=case.Dqk,
                Dv=case.Dv,
                causal=case.causal,
                scale=case.scale,
                window=normalize_window(case.causal, None),
            )
            reasons = REGISTRY.reasons(REGISTRY.get(name), call)
            if reasons:
                raise Skip("; ".join(reasons))
            causal = case.causal
            return lambda q, k, v: longflash.attention(q, k, v, causal=causal, backend=name)

        paths = _reference_paths() if name == "reference" else []
        if not paths:
            out.append(Contender(name, "longflash", f"longflash backend {name!r}", make))
            continue
        from longflash import reference

        # JAX fixes the path when it traces; entering the context around every call
        # covers the first one, which traces, and PyTorch's every call.
        out.extend(
            Contender(
                f"reference:{p}",
                "longflash",
                f"longflash reference backend, {p} path",
                make,
                context=lambda p=p: reference.force_path(p),
                dense=p == "exact",
            )
            for p in paths
        )
    return out


def _reference_paths() -> list[str]:
    """The reference backend's forceable paths, if it offers them."""
    from longflash import reference

    if not hasattr(reference, "force_path"):
        return []
    return list(getattr(reference, "PATHS", ("exact", "blockwise")))
