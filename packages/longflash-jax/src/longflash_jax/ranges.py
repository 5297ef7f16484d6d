"""Which tiles a block of rows can see, and the element mask for the tiles at the edges.

Query i sees key j iff i + off - left <= j <= i + off + right and j < Nk, with
off = Nk - Nq (bottom-right aligned; per sequence for varlen) and None meaning an
unbounded side. The kernels loop only over the tiles that some row of their block sees;
of those, the tiles that every valid row sees completely run without a mask, and only the
ones at the two ends of the range pay for the element mask.

The same arithmetic serves both directions. Forward and dQ own a block of queries and
scan keys: other = own + off + [-left, +right]. dK/dV owns a block of keys and scans
queries: other = own - off + [-right, +left].

All values are int32 scalars (traced inside the kernel) and non-negative where divided,
because lax.div truncates toward zero.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax


def _div(a: Any, b: int) -> Any:
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def _cdiv(a: Any, b: int) -> Any:
    return _div(jnp.asarray(a, jnp.int32) + (b - 1), b)


class BlockRange(NamedTuple):
    """Tiles [lo, a) and [b, hi) need the element mask; [a, b) are fully visible."""

    lo: Any
    a: Any
    b: Any
    hi: Any


def block_range(
    own0: Any,
    own_n: Any,
    other_n: Any,
    d: Any,
    before: int | None,
    after: int | None,
    own_block: int,
    other_block: int,
) -> BlockRange:
    """Tiles of the other axis seen by own rows [own0, own0 + own_block) ∩ [0, own_n),
    where own row x sees other rows [x + d - before, x + d + after] ∩ [0, other_n)."""
    own_last = jnp.minimum(own0 + own_block, own_n) - 1
    lo = 0 if before is None else jnp.maximum(0, own0 + d - before)
    hi = other_n if after is None else jnp.minimum(other_n, own_last + d + after + 1)
    # Seen by every valid own row: the tightest bounds over the block.
    full_lo = 0 if before is None else jnp.maximum(0, own_last + d - before)
    full_hi = other_n if after is None else jnp.minimum(other_n, own0 + d + after + 1)

    empty = jnp.logical_or(hi <= lo, own0 >= own_n)
    lo_t = _div(lo, other_block)
    hi_t = jnp.where(empty, lo_t, _cdiv(jnp.maximum(hi, 0), other_block))
    a = jnp.clip(_cdiv(full_lo, other_block), lo_t, hi_t)
    b = jnp.clip(_div(jnp.maximum(full_hi, 0), other_block), a, hi_t)
    return BlockRange(lo_t, a, b, hi_t)


def visible(
    rows: Any,
    cols: Any,
    nq: Any,
    nk: Any,
    left: int | None,
    right: int | None,
    check_rows: bool,
    check_cols: bool,
    keys_first: bool = False,
) -> Any:
    """Boolean (len(rows), len(cols)) mask: query rows[r] sees key cols[c]; with
    keys_first, the (len(cols), len(rows)) mask of the transposed score tile. Bounds checks
    are included only where the caller's tile can hold rows past the end."""
    i, j = (rows[None, :], cols[:, None]) if keys_first else (rows[:, None], cols[None, :])
    off = nk - nq
    conds = []
    if left is not None:
        conds.append(j >= i + (off - left))
    if right is not None:
        conds.append(j <= i + (off + right))
    if check_cols:
        conds.append(j < nk)
    if check_rows:
        conds.append(i < nq)
    if not conds:
        return None
    mask = conds[0]
    for c in conds[1:]:
        mask = jnp.logical_and(mask, c)
    shape = (cols.shape[0], rows.shape[0]) if keys_first else (rows.shape[0], cols.shape[0])
    return jnp.broadcast_to(mask, shape)
