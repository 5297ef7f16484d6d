"""The suite's cases: shapes and options, without arrays.

A :class:`Case` is everything one conformance check needs besides the dtype, the
framework and the device. Lists are grouped the way the suite's test methods are, so
that a failure report says at once which feature broke. Lengths are chosen to be
multiples of no tile size (1, 17, 113, 1000, 1500); at least one case per group that
matters exceeds 1024 tokens so that every multi-tile path runs even on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Memory layouts a torch case can give its inputs (JAX arrays have no strides).
#: contiguous: as allocated; transposed: (B, H, N, D) storage viewed as (B, N, H, D);
#: sliced_heads: every other head of a tensor with twice the heads; padded_dim: the
#: first D of D+8 columns (unit stride, odd row stride); strided_dim: every other element
#: of the last axis (stride 2); expanded_batch: k and v broadcast over the batch
#: (stride 0). The storage around a view is filled with NaN, so a misread shows.
LAYOUTS = (
    "contiguous",
    "transposed",
    "sliced_heads",
    "padded_dim",
    "strided_dim",
    "expanded_batch",
)


@dataclass(frozen=True)
class Case:
    """One attention call's shapes and options.

    ``seqlens`` makes it a varlen case: one (Nq_b, Nk_b) pair per sequence; B, Nq and Nk
    are then derived. ``q_shift``/``k_shift`` add a constant to the first feature of q
    and k, giving scores far above the float32 exp range (about 88) while most of the
    shift's product is the same for all keys of a row and cancels in the softmax.
    """

    name: str
    B: int = 2
    Nq: int = 113
    Nk: int = 113
    Hq: int = 2
    Hk: int = 2
    Dqk: int = 64
    Dv: int | None = None
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    scale: float | None = None
    seqlens: tuple[tuple[int, int], ...] | None = None
    pass_max_seqlen: bool = True
    layout: str = "contiguous"
    q_shift: float = 0.0
    k_shift: float = 0.0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}")
        if self.seqlens is not None:
            object.__setattr__(self, "B", len(self.seqlens))
            object.__setattr__(self, "Nq", max((a for a, _ in self.seqlens), default=0))
            object.__setattr__(self, "Nk", max((b for _, b in self.seqlens), default=0))

    @property
    def dv(self) -> int:
        return self.Dqk if self.Dv is None else self.Dv

    @property
    def varlen(self) -> bool:
        return self.seqlens is not None

    @property
    def cu_seqlens(self) -> tuple[list[int], list[int]]:
        assert self.seqlens is not None
        cq, ck = [0], [0]
        for a, b in self.seqlens:
            cq.append(cq[-1] + a)
            ck.append(ck[-1] + b)
        return cq, ck

    @property
    def scores(self) -> int:
        """Number of (query, key, head) scores: the oracle's work."""
        if self.seqlens is not None:
            return self.Hq * sum(a * b for a, b in self.seqlens)
        return self.B * self.Hq * self.Nq * self.Nk

    def kwargs(self) -> dict[str, Any]:
        """The options as longflash.attention keyword arguments."""
        return dict(causal=self.causal, scale=self.scale, window=self.window, softcap=self.softcap)

    def describe(self) -> str:
        parts = [f"{self.name}:"]
        if self.varlen:
            parts.append(f"varlen seqlens={list(self.seqlens)}")
        else:
            parts.append(f"B={self.B} Nq={self.Nq} Nk={self.Nk}")
        parts.append(f"Hq={self.Hq} Hk={self.Hk} Dqk={self.Dqk} Dv={self.dv}")
        for key in ("causal", "window", "softcap", "scale"):
            val = getattr(self, key)
            if val not in (None, False):
                parts.append(f"{key}={val}")
        if self.layout != "contiguous":
            parts.append(f"layout={self.layout}")
        if self.q_shift or self.k_shift:
            parts.append(f"shift q+{self.q_shift} k+{self.k_shift}")
        return " ".join(parts)


def _head_dims(accelerator: bool) -> list[int]:
    # 96 is not a power of two; 128 and 256 only where kernels are fast enough for them
    return [32, 64, 96] + ([128, 256] if accelerator else [])


def head_dim_cases(accelerator: bool) -> list[Case]:
    out = []
    for d in _head_dims(accelerator):
        out.append(Case(f"d{d}", Dqk=d))
        out.append(Case(f"d{d}-causal", Dqk=d, causal=True))
    return out


def length_cases(accelerator: bool) -> list[Case]:
    return [
        Case("n1", Nq=1, Nk=1),
        Case("n17-causal", Nq=17, Nk=17, causal=True),
        Case("nq17-nk113", Nq=17, Nk=113),
        Case("nq113-nk17", Nq=113, Nk=17),
        Case("nq17-nk113-causal", Nq=17, Nk=113, causal=True),
        Case("nq113-nk17-causal", Nq=113, Nk=17, causal=True),
        Case("nq1-nk200-causal", Nq=1, Nk=200, causal=True),
        Case("b3-h3-n40", B=3, Nq=40, Nk=40, Hq=3, Hk=3),
        Case("n1000-causal", B=1, Nq=1000, Nk=1000, causal=True),
        Case("n1500", B=1, Nq=1500, Nk=1500, Hq=2, Hk=1),
        Case("nq1100-nk1500-causal", B=1, Nq=1100, Nk=1500, causal=True),
    ]


def mask_cases(accelerator: bool) -> list[Case]:
    return [
        Case("win-left16", window=(16, None)),
        Case("win-right16", window=(None, 16)),
        Case("win-8-4", window=(8, 4)),
        Case("win-0-0", window=(0, 0)),
        Case("win-left0", window=(0, None)),
        Case("win-500-500", window=(500, 500)),
        Case("causal-win32", causal=True, window=(32, None)),
        Case("causal-overrides-right", causal=True, window=(10, 5)),
        Case("win-8-4-nq50-nk113", Nq=50, Nk=113, window=(8, 4)),
        Case("win-8-4-nq113-nk50", Nq=113, Nk=50, window=(8, 4)),
        Case("causal-win16-nq60-nk100", Nq=60, Nk=100, causal=True, window=(16, None)),
        Case("causal-win100-n1300", B=1, Nq=1300, Nk=1300, causal=True, window=(100, None)),
    ]


def softcap_scale_cases(accelerator: bool) -> list[Case]:
    return [
        Case("softcap2", softcap=2.0),
        Case("softcap2-causal", softcap=2.0, causal=True),
        Case("softcap30-win", softcap=30.0, window=(20, 20)),
        Case("softcap1-scale1", softcap=1.0, scale=1.0),
        Case("scale0.5", scale=0.5),
        Case("scale0.05-causal", scale=0.05, causal=True),
        # Scores of 100 to 190 (128 + 8·N(0,1) per row, spread ±8 within a row): exp
        # overflows float32 unless the row max is subtracted. The shift sits on one
        # feature of q and of k. Its part in dq cancels exactly (rows of dS sum to 0)
        # but not after a 16-bit kernel rounds dS: the error grows with the k shift
        # relative to k's spread, so it is kept at 16 (bfloat16 dq error ~1e-2).
        Case("large-logits", q_shift=16.0, k_shift=16.0, scale=0.5),
        Case(
            "large-logits-causal-softcap",
            q_shift=16.0,
            k_shift=16.0,
            scale=0.5,
            causal=True,
            softcap=200.0,
        ),
    ]


def gqa_cases(accelerator: bool) -> list[Case]:
    return [
        Case("gqa-6-2", Hq=6, Hk=2),
        Case("gqa-6-2-causal", Hq=6, Hk=2, causal=True),
        Case("gqa-8-2-win", Hq=8, Hk=2, window=(16, 16)),
        Case("mqa-4-1", Hq=4, Hk=1),
        Case("mqa-4-1-causal-softcap", Hq=4, Hk=1, causal=True, softcap=5.0),
        Case("mqa-3-1-nq50-nk80-causal", Hq=3, Hk=1, Nq=50, Nk=80, causal=True),
    ]


def dv_cases(accelerator: bool) -> list[Case]:
    out = [
        Case("dqk64-dv32", Dqk=64, Dv=32),
        Case("dqk32-dv64-causal", Dqk=32, Dv=64, causal=True),
        Case("dqk96-dv64-gqa", Dqk=96, Dv=64, Hq=4, Hk=2),
    ]
    if accelerator:
        out.append(Case("dqk192-dv128-causal", Dqk=192, Dv=128, causal=True))
    return out


_MIXED = ((3, 10), (10, 3), (0, 7), (7, 0), (1, 1), (50, 64), (64, 50))


def varlen_cases(accelerator: bool) -> list[Case]:
    basic = ((5, 5), (0, 0), (1, 1), (100, 100), (17, 17))
    return [
        Case("varlen", seqlens=basic),
        Case("varlen-causal", seqlens=basic, causal=True),
        Case("varlen-nomax-causal", seqlens=basic, causal=True, pass_max_seqlen=False),
        Case("varlen-qk-differ", seqlens=_MIXED),
        Case("varlen-qk-differ-causal", seqlens=_MIXED, causal=True),
        Case("varlen-qk-differ-win", seqlens=_MIXED, window=(4, 2)),
        Case(
            "varlen-gqa-softcap-causal",
            seqlens=((30, 40), (1, 1), (60, 60)),
            Hq=4,
            Hk=1,
            causal=True,
            softcap=5.0,
        ),
        Case("varlen-dv32", seqlens=((20, 30), (33, 33)), Dv=32),
        Case("varlen-long-causal", seqlens=((700, 700), (1, 1), (600, 650)), causal=True),
        Case("varlen-no-queries", seqlens=((0, 5), (0, 3))),
        Case("varlen-one-seq", seqlens=((77, 77),), causal=True),
    ]


def no_key_cases(accelerator: bool) -> list[Case]:
    return [
        Case("causal-nq64-nk16", Nq=64, Nk=16, causal=True),
        Case("causal-win4-nq50-nk30", Nq=50, Nk=30, causal=True, window=(4, None)),
        Case("win-right3-nq40-nk20", Nq=40, Nk=20, window=(None, 3)),
        Case("win-0-0-nq30-nk10", Nq=30, Nk=10, window=(0, 0)),
        Case("gqa-softcap-causal-nq70-nk30", Nq=70, Nk=30, Hq=4, Hk=2, causal=True, softcap=3.0),
        Case("nk0", Nq=5, Nk=0),
        Case("nq0", Nq=0, Nk=10),
    ]


def layout_cases(accelerator: bool) -> list[Case]:
    """Non-contiguous inputs (torch only)."""
    return [
        Case("transposed-gqa-causal", Hq=4, Hk=2, causal=True, layout="transposed"),
        Case("sliced-heads", layout="sliced_heads"),
        Case("padded-headdim-win", window=(10, 10), layout="padded_dim"),
        Case("strided-headdim", Dqk=32, layout="strided_dim"),
        Case("expanded-batch-mqa", Hq=2, Hk=1, layout="expanded_batch"),
        Case("varlen-transposed-causal", seqlens=_MIXED, causal=True, layout="transposed"),
        Case("varlen-sliced-heads", seqlens=((40, 40), (9, 20)), layout="sliced_heads"),
    ]


def long_cases(accelerator: bool) -> list[Case]:
    """Long sequences, checked against the blockwise oracle on the device."""
    k = 1024
    return [
        Case("long-8k-gqa-causal", B=1, Nq=8 * k, Nk=8 * k, Hq=8, Hk=2, Dqk=128, causal=True),
        Case("long-32k-softcap", B=1, Nq=32 * k, Nk=32 * k, Hq=4, Hk=4, Dqk=64, softcap=30.0),
        Case("long-16k-d256", B=1, Nq=16 * k, Nk=16 * k, Hq=2, Hk=2, Dqk=256),
        Case("long-128k", B=1, Nq=128 * k, Nk=128 * k, Hq=2, Hk=2, Dqk=128),
        Case("long-128k-mqa-causal", B=1, Nq=128 * k, Nk=128 * k, Hq=2, Hk=1, Dqk=128, causal=True),
        Case(
            "long-128k-sliding",
            B=1,
            Nq=128 * k,
            Nk=128 * k,
            Hq=2,
            Hk=1,
            Dqk=128,
            causal=True,
            window=(8 * k, None),
        ),
        Case(
            "long-nq1000-nk128k-causal", B=1, Nq=1000, Nk=128 * k, Hq=4, Hk=1, Dqk=128, causal=True
        ),
        Case(
            "long-varlen-causal",
            seqlens=((64 * k, 64 * k), (1, 1), (0, 0), (50_000, 50_000), (15_999, 16_100)),
            Hq=4,
            Hk=2,
            Dqk=128,
            causal=True,
        ),
    ]


GROUPS = {
    "head_dims": head_dim_cases,
    "lengths": length_cases,
    "masks": mask_cases,
    "softcap_scale": softcap_scale_cases,
    "gqa": gqa_cases,
    "dv": dv_cases,
    "varlen": varlen_cases,
    "no_key_rows": no_key_cases,
    "layouts": layout_cases,
    "long": long_cases,
}
