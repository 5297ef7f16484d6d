"""The static description of one attention problem, and the tiles chosen for it.

A ``Problem`` is everything the kernels specialise on (shapes, mask, scale, softcap,
packed or batched); it is hashable so that jax.jit caches one compiled program per
problem. Tile sizes come from ``tiles.json`` (data, not code) and may be overridden per
call, which is how benchmarks/pallas_tune.py searches them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

from longflash.call import AttentionCall

# CUDA limits gridDim.y and gridDim.z to 65535; the (batch x heads) grid axis moves to x
# (limit 2^31 - 1) when it is larger than that.
GRID_YZ_MAX = 65535


def pad_dim(d: int) -> int:
    """Triton tiles are powers of two, and tl.dot needs every dimension >= 16."""
    return max(16, 1 << max(0, (d - 1).bit_length()))


@dataclass(frozen=True)
class Tile:
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Tiles:
    fwd: Tile
    dkdv: Tile
    dq: Tile


@dataclass(frozen=True)
class Problem:
    """Shapes and options of one call. Batched: q (B, Nq, Hq, Dqk). Varlen: q (Tq, Hq, Dqk)
    with B sequences of at most Nq rows (Nk keys)."""

    varlen: bool
    B: int
    Hq: int
    Hk: int
    Nq: int  # batched: the length; varlen: the longest sequence (grid extent)
    Nk: int
    Tq: int  # varlen: packed totals; batched: equal to Nq/Nk
    Tk: int
    Dqk: int
    Dv: int
    dtype: str
    scale: float
    softcap: float | None
    left: int | None  # window, causal folded in as right = 0; None = unbounded
    right: int | None
    interpret: bool

    @property
    def group(self) -> int:
        return self.Hq // self.Hk

    @property
    def dqk_pad(self) -> int:
        return pad_dim(self.Dqk)

    @property
    def dv_pad(self) -> int:
        return pad_dim(self.Dv)

    @property
    def empty(self) -> bool:
        return 0 in (self.B, self.Hq, self.Tq, self.Tk, self.Nq, self.Nk)


def problem_of(call: AttentionCall) -> Problem:
    left, right = call.window if call.window is not None else (None, None)
    varlen = call.varlen is not None
    return Problem(
        varlen=varlen,
        B=call.B,
        Hq=call.Hq,
        Hk=call.Hk,
        Nq=call.Nq,
        Nk=call.Nk,
        Tq=call.varlen.total_q if varlen else call.Nq,
        Tk=call.varlen.total_k if varlen else call.Nk,
        Dqk=call.Dqk,
        Dv=call.Dv,
        dtype=call.dtype,
        scale=float(call.scale),
        softcap=call.softcap,
        left=left,
        right=right,
        interpret=call.device != "cuda",
    )


@functools.cache
def table() -> dict:
    """tiles.json, parsed once."""
    text = resources.files("longflash_jax").joinpath("tiles.json").read_text()
    return json.loads(text)


def _fit(tile: Tile, nq: int, nk: int) -> Tile:
    # Short sequences get tiles no larger than the sequence (rounded to a power of two,
    # at least 16): a 128-row tile over 20 rows would only multiply masked work.
    bq = min(tile.block_q, pad_dim(nq))
    bk = min(tile.block_k, pad_dim(nk))
    return Tile(bq, bk, tile.num_warps, tile.num_stages)


def tiles_for(p: Problem, override: Tiles | None = None) -> Tiles:
    if override is None:
        data = table()
        if p.interpret:
            entry = data["interpret"]
        else:
            entry = data["cuda"][str(max(p.dqk_pad, p.dv_pad))]
        override = Tiles(**{name: Tile(**entry[name]) for name in ("fwd", "dkdv", "dq")})
    return Tiles(
        fwd=_fit(override.fwd, p.Nq, p.Nk),
        dkdv=_fit(override.dkdv, p.Nq, p.Nk),
        dq=_fit(override.dq, p.Nq, p.Nk),
    )
