"""The reference backend: exact softmax attention in plain PyTorch and jax.numpy.

It accepts every call the API can express (every dtype, mask, softcap, GQA/MQA,
Dqk != Dv, varlen) on any device its framework runs on, and it is the yardstick the
conformance suite measures kernels against. Scores are computed in float32 (float64 for
float64 inputs); outputs come back in the input dtype, lse always in float32.

Two paths compute the same function:

``exact``
    Materialises the (B, Hq, Nq, Nk) score matrix (for varlen: (Hq, Tq, Tk) over the
    packed tokens) and takes one softmax over it. Simple enough to trust by reading; used
    for tests and small inputs.
``blockwise``
    FlashAttention-2 style online softmax over tiles of ``block_q`` queries x ``block_k``
    keys (1024 x 1024 by default), keeping a running row max and sum in float32, so memory
    is O(N) beyond one tile of scores. Tiles that the mask makes fully invisible are never
    computed. The backward recomputes each tile's probabilities from the lse and
    accumulates dq, dk, dv in float32; it never builds an autograd graph. With PyTorch
    on one CPU thread, 64K tokens (B=1, H=4, D=64, bf16, causal) take about 42 s of CPU
    forward and 141 s forward+backward, peak RSS 1.2 GiB (benchmarks/reference_64k.py).

Choosing the path: ``auto`` (the default) takes ``exact`` while the score matrix has at
most ``EXACT_MAX_ELEMENTS`` = 2**26 elements (B*Hq*Nq*Nk, or Hq*Tq*Tk for varlen; 256 MiB
in float32, about 1 GiB peak in the exact backward) and ``blockwise`` above it. Force a
path with the environment variable ``LONGFLASH_REFERENCE_PATH=exact|blockwise|auto`` or,
in code (per thread/context, taking precedence over the variable)::

    with longflash.reference.force_path("blockwise", block_q=64, block_k=32):
        out = longflash.attention(q, k, v, backend="reference")

JAX picks the path and the tiles when it traces, so a function jitted earlier keeps the
path it was traced with.

Both frameworks describe the mask the same way: every query row r gets a half-open range
[lo[r], hi[r]) of visible key indices (packed key indices for varlen), which folds the
causal/window offset Nk - Nq (per sequence for varlen) and the sequence boundaries into
two integers per row. A row with lo >= hi sees no key: out 0, lse -inf, zero gradients.
Float64 inputs recompute the lse in float64 in the backward, because the float32 lse the
protocol carries would cap their gradients at float32 accuracy.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from longflash.call import AttentionCall

__all__ = [
    "EXACT_MAX_ELEMENTS",
    "PATH_ENV",
    "ReferenceBackend",
    "Settings",
    "backend",
    "choose_path",
    "force_path",
    "settings",
]

# 2**26 float32 scores = 256 MiB; the exact backward holds about five such matrices.
EXACT_MAX_ELEMENTS = 2**26
PATH_ENV = "LONGFLASH_REFERENCE_PATH"
# Large enough that one tile's matmuls run near the CPU's matmul rate, small enough that
# a tile of scores (Hq x 1024 x 1024 float32 = 32 MiB at Hq = 8) stays cheap.
DEFAULT_BLOCK_Q = 1024
DEFAULT_BLOCK_K = 1024

_PATHS = ("auto", "exact", "blockwise")


@dataclass(frozen=True)
class Settings:
    """How the reference computes a call: which path and which tile sizes."""

    path: str = "auto"
    block_q: int = DEFAULT_BLOCK_Q
    block_k: int = DEFAULT_BLOCK_K


_forced: contextvars.ContextVar[Settings | None] = contextvars.ContextVar(
    "longflash_reference_settings", default=None
)


@contextlib.contextmanager
def force_path(
    path: str, *, block_q: int | None = None, block_k: int | None = None
) -> Iterator[None]:
    """Run the reference with ``path`` ("exact", "blockwise" or "auto") inside the block,
    optionally with other tile sizes (small tiles exercise the tiling on small inputs)."""
    if path not in _PATHS:
        raise ValueError(f"path must be one of {', '.join(_PATHS)}, got {path!r}")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    outer = settings()
    token = _forced.set(Settings(path, block_q or outer.block_q, block_k or outer.block_k))
    try:
        yield
    finally:
        _forced.reset(token)


def settings() -> Settings:
    """The settings in force: the innermost force_path, else the environment variable."""
    forced = _forced.get()
    if forced is not None:
        return forced
    path = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if path not in _PATHS:
        raise ValueError(
            f"{PATH_ENV}={os.environ[PATH_ENV]!r}; expected one of {', '.join(_PATHS)}"
        )
    return Settings(path)


def choose_path(call: AttentionCall, path: str = "auto") -> str:
    """The path that runs ``call``: ``path`` unless it is "auto", else by score count."""
    if path != "auto":
        return path
    if call.varlen is not None:
        scores = call.Hq * call.varlen.total_q * call.varlen.total_k
    else:
        scores = call.B * call.Hq * call.Nq * call.Nk
    return "exact" if scores <= EXACT_MAX_ELEMENTS else "blockwise"


class ReferenceBackend:
    """Plain-framework attention for every call; slowest, never wrong."""

    name = "reference"
    frameworks = frozenset({"torch", "jax"})
    # Only framework ops run, so any device the framework drives works; these are the
    # device kinds the front-ends report for them.
    devices = frozenset({"cpu", "cuda", "rocm", "tpu"})
    dtypes = frozenset({"float16", "bfloat16", "float32", "float64"})
    priority = -100

    def available(self) -> tuple[bool, str]:
        return True, ""

    def check(self, call: AttentionCall) -> list[str]:
        reasons = []
        if call.framework not in self.frameworks:
            reasons.append(f"framework {call.framework} not supported")
        if call.device not in self.devices:
            reasons.append(
                f"device {call.device} not supported (supports: {', '.join(sorted(self.devices))})"
            )
        if call.dtype not in self.dtypes:
            reasons.append(f"dtype {call.dtype} not supported")
        return reasons

    def forward(self, call: AttentionCall, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
        s = settings()
        return _impl(call).forward(call, q, k, v, choose_path(call, s.path), s)

    def backward(
        self, call: AttentionCall, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
    ) -> tuple[Any, Any, Any]:
        s = settings()
        return _impl(call).backward(call, dout, q, k, v, out, lse, choose_path(call, s.path), s)


def _impl(call: AttentionCall) -> Any:
    # Imported here so that `import longflash` never imports a framework.
    if call.framework == "torch":
        from longflash.reference import _torch

        return _torch
    if call.framework == "jax":
        from longflash.reference import _jax

        return _jax
    raise ValueError(f"the reference backend has no {call.framework} implementation")


backend = ReferenceBackend()
