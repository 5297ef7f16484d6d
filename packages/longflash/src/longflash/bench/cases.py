"""Benchmark cases: one attention shape, dtype, mask and direction each, and the grids
that `longflash bench` runs by default."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from longflash.call import AttentionCall

DIRECTIONS = ("fwd", "bwd")


@dataclass(frozen=True)
class Grid:
    """A device's default cases; every field can be overridden from the command line."""

    head_dims: tuple[int, ...]
    seqlens: tuple[int, ...]
    long_seqlens: tuple[int, ...]  # appended by --long
    batch_tokens: int  # batch = max(1, batch_tokens // N)
    heads: int | None  # fixed query heads, or None: model_width // head_dim
    model_width: int | None
    dtype: str


# The GPU grid of DESIGN §7. B·N is held fixed (the same tokens per batch at every length,
# so the work grows linearly in N) and heads·head_dim = 2048, the width of a ~1B-parameter
# model: the convention of published attention benchmarks, so figures compare directly.
GPU_GRID = Grid(
    head_dims=(64, 128, 256),
    seqlens=(1024, 2048, 4096, 8192, 16384),
    long_seqlens=(32768, 65536, 131072),
    batch_tokens=16 * 1024,
    heads=None,
    model_width=2048,
    dtype="bfloat16",
)
# Sized for about a minute on two idle cores with the default contenders.
CPU_GRID = Grid(
    head_dims=(64,),
    seqlens=(256, 512, 1024, 2048),
    long_seqlens=(4096, 8192, 16384),
    batch_tokens=2048,
    heads=4,
    model_width=None,
    dtype="float32",
)
# --quick: a few seconds, for tests and CI.
QUICK_GRID = Grid(
    head_dims=(32,),
    seqlens=(128, 256),
    long_seqlens=(),
    batch_tokens=256,
    heads=2,
    model_width=None,
    dtype="float32",
)


@dataclass(frozen=True)
class Case:
    """One timed configuration. Layout (B, N, H, D) as in longflash.attention."""

    direction: str  # "fwd" | "bwd"
    causal: bool
    dtype: str  # "bfloat16" | "float16" | "float32"
    B: int
    Nq: int
    Nk: int
    Hq: int
    Hk: int
    Dqk: int
    Dv: int

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.Hq % self.Hk:
            raise ValueError(f"Hq ({self.Hq}) must be a multiple of Hk ({self.Hk})")

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.Dqk)

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hk

    @property
    def key(self) -> str:
        """A stable id, used to join measurements and ratios in the JSON."""
        mask = "causal" if self.causal else "full"
        return (
            f"{self.direction}-{mask}-{self.dtype}-b{self.B}-nq{self.Nq}-nk{self.Nk}"
            f"-hq{self.Hq}-hk{self.Hk}-d{self.Dqk}-dv{self.Dv}"
        )

    @property
    def label(self) -> str:
        mask = " causal" if self.causal else ""
        heads = f"H{self.Hq}" if not self.gqa else f"H{self.Hq}/{self.Hk}"
        d = f"d{self.Dqk}" if self.Dqk == self.Dv else f"d{self.Dqk}/{self.Dv}"
        n = _k(self.Nq) if self.Nq == self.Nk else f"{_k(self.Nq)}x{_k(self.Nk)}"
        return f"{self.direction}{mask} {d} N{n} B{self.B} {heads} {short_dtype(self.dtype)}"

    def flops(self) -> float:
        """Matrix-product FLOPs by the usual convention (AttentionCall.flops):
        4·B·Hq·Nq·Nk·(Dqk+Dv)/2 forward, halved when causal, 2.5x for the backward."""
        call = AttentionCall(
            framework="none",
            device="none",
            dtype=self.dtype,
            B=self.B,
            Nq=self.Nq,
            Nk=self.Nk,
            Hq=self.Hq,
            Hk=self.Hk,
            Dqk=self.Dqk,
            Dv=self.Dv,
            causal=self.causal,
            scale=self.scale,
        )
        return call.flops(backward=self.direction == "bwd")

    def to_json(self) -> dict:
        d = asdict(self)
        d["key"] = self.key
        d["label"] = self.label
        d["flops"] = self.flops()
        return d


def attention_flops(
    B: int,
    H: int,
    Nq: int,
    Nk: int,
    Dqk: int,
    Dv: int | None = None,
    *,
    causal: bool = False,
    direction: str = "fwd",
) -> float:
    """FLOPs of one attention call by the convention of DESIGN §7."""
    Dv = Dqk if Dv is None else Dv
    return Case(direction, causal, "float32", B, Nq, Nk, H, H, Dqk, Dv).flops()


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def short_dtype(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}.get(
        dtype, dtype
    )


DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "float16": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "float32": "float32",
}


def parse_dtype(name: str) -> str:
    try:
        return DTYPE_ALIASES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of bf16, fp16, fp32") from None


def build_cases(
    *,
    head_dims: Sequence[int],
    seqlens: Sequence[int],
    batch_tokens: int,
    heads: int | None,
    kv_heads: int | None,
    model_width: int | None,
    causal: Iterable[bool],
    directions: Iterable[str],
    dtypes: Iterable[str],
) -> list[Case]:
    """The cross product, batch = max(1, batch_tokens // N) and, unless ``heads`` is
    given, heads = model_width // head_dim.

    Ordered so that each (direction, mask, dtype, head dim) sweep over N runs together.
    """
    cases = []
    causal, directions, dtypes = list(causal), list(directions), list(dtypes)
    for direction in directions:
        for c in causal:
            for dtype in dtypes:
                for d in head_dims:
                    if heads is not None:
                        h = heads
                    elif model_width is not None:
                        h = max(1, model_width // d)
                    else:
                        raise ValueError("give heads or model_width")
                    hk = h if kv_heads is None else kv_heads
                    for n in seqlens:
                        b = max(1, batch_tokens // n)
                        cases.append(Case(direction, c, dtype, b, n, n, h, hk, d, d))
    return cases
