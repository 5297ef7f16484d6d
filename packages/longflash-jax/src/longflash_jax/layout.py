"""How the kernels see their operands: block specs, grid, sequence bounds, edge loads.

Every kernel runs on a 2-D grid (tile index, batch x head). Its block of each operand is
the whole sequence of one head, (N, D) — Pallas' Triton lowering turns that into a base
pointer, and the kernel reads tiles from it with pl.ds at the rows it needs. This keeps
the (B, N, H, D) layout as given (no transposes) and lets batched and packed (varlen)
inputs share one kernel body: batched sequences start at row 0 with static lengths,
packed ones start at cu_seqlens[b] with lengths read from cu_seqlens in the kernel.

Head dims that are not a power of two are read and written through masks on a tile
padded to the next power of two (Triton tiles are powers of two): no copies in HBM, the
padding costs only the extra matmul columns (e.g. 96 -> 128: +33% FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longflash_jax.problem import GRID_YZ_MAX, Problem

# A block dimension of extent 1 that the kernel does not see (older jax: None).
SQ = getattr(pl, "squeezed", None)


class Grid(NamedTuple):
    shape: tuple[int, int]
    swap: bool  # True: (batch x heads) is grid axis 0

    def ids(self) -> tuple[Any, Any]:
        """(tile index, batch x head index) of this program."""
        a, b = pl.program_id(0), pl.program_id(1)
        return (b, a) if self.swap else (a, b)

    def unpack(self, i: Any, j: Any) -> tuple[Any, Any]:
        return (j, i) if self.swap else (i, j)


def make_grid(p: Problem, n_tiles: int, n_heads: int) -> Grid:
    bh = p.B * n_heads
    swap = not p.interpret and bh > GRID_YZ_MAX
    return Grid((bh, n_tiles) if swap else (n_tiles, bh), swap)


def seq_spec(
    p: Problem,
    grid: Grid,
    n: int,
    heads: int,
    dpad: int,
    group: int = 0,
    head_of: Callable[[Any], Any] | None = None,
) -> pl.BlockSpec:
    """All rows of one head of a (B, N, H, D) or packed (T, H, D) operand. With group > 0
    the operand is viewed as (..., H // group, group, D) and the block holds the whole
    group (the dK/dV kernel sums over it)."""
    head_of = head_of or (lambda bh: bh % heads)

    if p.varlen:
        shape = (n, SQ, group, dpad) if group else (n, SQ, dpad)

        def index(i, j):
            _, bh = grid.unpack(i, j)
            return (0, head_of(bh), 0, 0) if group else (0, head_of(bh), 0)
    else:
        shape = (SQ, n, SQ, group, dpad) if group else (SQ, n, SQ, dpad)

        def index(i, j):
            _, bh = grid.unpack(i, j)
            b = bh // heads
            return (b, 0, head_of(bh), 0, 0) if group else (b, 0, head_of(bh), 0)

    return pl.BlockSpec(shape, index)


def rowstat_spec(p: Problem, grid: Grid, n: int, heads: int, group: int = 0) -> pl.BlockSpec:
    """All rows of one head of a per-row statistic: (B, H, N), or (H, T) when packed;
    viewed as (..., H // group, group, N) when group > 0."""
    if p.varlen:
        shape = (SQ, group, n) if group else (SQ, n)

        def index(i, j):
            _, bh = grid.unpack(i, j)
            return (bh % heads, 0, 0) if group else (bh % heads, 0)
    else:
        shape = (SQ, SQ, group, n) if group else (SQ, SQ, n)

        def index(i, j):
            _, bh = grid.unpack(i, j)
            return (bh // heads, bh % heads, 0, 0) if group else (bh // heads, bh % heads, 0)

    return pl.BlockSpec(shape, index)


def cu_spec(p: Problem) -> pl.BlockSpec:
    return pl.BlockSpec((p.B + 1,), lambda i, j: (0,))


class Seq(NamedTuple):
    """Where this program's sequence starts in the q and k operands, and its lengths."""

    q0: Any
    k0: Any
    nq: Any
    nk: Any


def sequence(p: Problem, cu_refs: tuple[Any, ...], b: Any) -> Seq:
    if not p.varlen:
        return Seq(0, 0, p.Nq, p.Nk)
    cuq, cuk = cu_refs
    q0, k0 = cuq[b], cuk[b]
    return Seq(q0, k0, cuq[b + 1] - q0, cuk[b + 1] - k0)


def _i32(x: Any) -> Any:
    return lax.convert_element_type(x, jnp.int32)


def at(p: Problem, ref: Any, *idx: Any) -> Any:
    """``ref.at[idx]``, axes past ``idx`` taken whole.

    In interpret mode every start becomes an int32 scalar. Kernel indices are int32
    (program ids, cu_seqlens, iota), but a whole axis is a static start 0 that the
    interpreter makes int64 under ``jax_enable_x64``; its masked store (jax 0.10) then
    hands ``lax.dynamic_slice`` a mix of int32 and int64 starts, which it refuses. The
    Triton lowering takes the indices as they are (int32 offsets, static whole axes, also
    under x64) and does not lower unmasked loads from views with traced starts on every
    axis, so the GPU path keeps the plain view."""
    if not p.interpret:
        return ref.at[idx] if idx else ref
    out = [pl.ds(_i32(i.start), i.size) if isinstance(i, pl.Slice) else _i32(i) for i in idx]
    out += [pl.ds(_i32(0), n) for n in ref.shape[len(idx) :]]
    return ref.at[tuple(out)]


def iota(n: int) -> Any:
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _tile_mask(rows_ok: Any | None, d: int, dpad: int, shape: tuple[int, int]) -> Any:
    mask = None
    if rows_ok is not None:
        mask = rows_ok[:, None]
    if d != dpad:
        cols = (iota(dpad) < d)[None, :]
        mask = cols if mask is None else jnp.logical_and(mask, cols)
    return None if mask is None else jnp.broadcast_to(mask, shape)


def load_tile(ref: Any, rows_ok: Any | None, d: int) -> Any:
    """A (rows, dpad) tile; rows past the end and padded columns read as 0."""
    shape = ref.shape
    mask = _tile_mask(rows_ok, d, shape[-1], shape)
    if mask is None:
        return ref[...]
    return plgpu.load(ref, mask=mask, other=0.0)


def store_tile(ref: Any, value: Any, rows_ok: Any | None, d: int) -> None:
    mask = _tile_mask(rows_ok, d, ref.shape[-1], ref.shape)
    if mask is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=mask)


def load_rows(ref: Any, rows_ok: Any | None, other: float) -> Any:
    if rows_ok is None:
        return ref[...]
    return plgpu.load(ref, mask=rows_ok, other=other)


def store_rows(ref: Any, value: Any, rows_ok: Any | None) -> None:
    if rows_ok is None:
        ref[...] = value
    else:
        plgpu.store(ref, value, mask=rows_ok)


def out_struct(shape: tuple[int, ...], dtype: Any, like: tuple[Any, ...] = ()) -> Any:
    """An output's ShapeDtypeStruct. Inside shard_map with check_vma (the default),
    pallas_call needs to be told which mesh axes its outputs vary over: the union of the
    inputs' axes, which JAX computes itself for an empty sum over all of them (a value that
    is never materialised). The attribute's name differs across jax versions."""
    if not like:
        return jax.ShapeDtypeStruct(shape, dtype)
    probe = sum(jnp.sum(x.reshape(-1)[:0].astype(jnp.float32)) for x in like)
    aval = jax.typeof(probe) if hasattr(jax, "typeof") else jax.core.get_aval(probe)
    for attr in ("manual_axis_type", "vma"):
        axes = getattr(aval, attr, None)
        if axes is not None:
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{attr: axes})
            except TypeError:
                continue
    return jax.ShapeDtypeStruct(shape, dtype)


def compiler_params(num_warps: int, num_stages: int) -> Any:
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
