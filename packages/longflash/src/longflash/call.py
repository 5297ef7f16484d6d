"""AttentionCall: everything about one attention call except the arrays.

Backends read it in ``check()`` (which runs on every call, so it must stay cheap) and in
``forward``/``backward``. It is built by the front-ends after validation, so every field
is already normalised: ``scale`` is a float, ``window`` folds ``causal`` in, ``softcap``
is ``None`` or > 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

Window = tuple[int | None, int | None]


@dataclass(frozen=True, eq=False)
class Varlen:
    """Packed variable-length batch: prefix sums of sequence lengths (int32 arrays)."""

    cu_seqlens_q: Any
    cu_seqlens_k: Any
    total_q: int
    total_k: int


@dataclass(frozen=True)
class AttentionCall:
    """One attention call, arrays excluded.

    Shapes: q (B, Nq, Hq, Dqk), k (B, Nk, Hk, Dqk), v (B, Nk, Hk, Dv). For varlen calls
    B is the number of sequences and Nq/Nk are the longest sequence lengths
    (``max_seqlen_q``/``max_seqlen_k``; the packed totals when the caller gave none).
    """

    framework: str  # "torch" | "jax"
    device: str  # "cpu" | "cuda" | "rocm" | "tpu" | ...
    dtype: str  # "float16" | "bfloat16" | "float32" | "float64"
    B: int
    Nq: int
    Nk: int
    Hq: int
    Hk: int
    Dqk: int
    Dv: int
    causal: bool
    scale: float
    # (left, right) with None = unbounded on that side; causal folds in as right = 0.
    # None when the mask is neither causal nor windowed.
    window: Window | None = None
    softcap: float | None = None
    varlen: Varlen | None = None

    # -- derived, cheap -------------------------------------------------------------
    @property
    def group(self) -> int:
        """Query heads per key/value head (1 = MHA, Hq = MQA)."""
        return self.Hq // self.Hk

    @property
    def window_left(self) -> int | None:
        return None if self.window is None else self.window[0]

    @property
    def window_right(self) -> int | None:
        return None if self.window is None else self.window[1]

    @property
    def is_varlen(self) -> bool:
        return self.varlen is not None

    def replace(self, **changes: Any) -> AttentionCall:
        return dataclasses.replace(self, **changes)

    def flops(self, backward: bool = False) -> float:
        """Matrix-product FLOPs by the usual convention: 2·B·H·Nq·Nk·(Dqk+Dv) for the
        forward, halved when causal, 2.5x that for the backward."""
        f = 2.0 * self.B * self.Hq * self.Nq * self.Nk * (self.Dqk + self.Dv)
        if self.causal:
            f /= 2
        return f * 2.5 if backward else f


def normalize_window(causal: bool, window: Window | None) -> Window | None:
    """Fold ``causal`` into ``window`` (DESIGN §2: causal with a window means right = 0)."""
    if window is None:
        return (None, 0) if causal else None
    left, right = window
    if causal:
        right = 0
    if left is None and right is None:
        return None
    return (left, right)
