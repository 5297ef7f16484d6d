# Shared device helpers: the visible band of a block, element masks, scores (scale, softcap).
# Tiles: a (R x C) block of rows against columns; no IO here besides masked tile loads.
# Target: any GPU Triton supports, and the interpreter (TRITON_INTERPRET=1) on the CPU.
"""Device helpers shared by the forward and backward kernels.

Masks are bands: row r (of R rows) sees column c (of C columns) iff
``r + off - lo_w <= c <= r + off + hi_w`` with ``off = C - R`` and ``c < C``. The forward and
the dQ kernel use rows = queries, columns = keys, (lo_w, hi_w) = (left, right); the dK/dV
kernel uses rows = keys, columns = queries, off negated and the two sides swapped.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def band_blocks(
    r0,
    R: tl.constexpr,
    len_r,
    len_c,
    lo_w,
    hi_w,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    C: tl.constexpr,
):
    """Column blocks (of C) that rows [r0, r0 + R) can see, split as
    masked [c0, c1), mask-free [c1, c2), masked [c2, c3); offsets are multiples of C.

    Mask-free means every valid row of the block sees every column of the column block and
    the column block lies inside len_c, so the loop over it needs no element mask and no
    bounds check. Everything is clamped to >= 0 before dividing: Triton's integer division
    truncates on the GPU and floors in the interpreter, and must not meet a negative.
    """
    off = len_c - len_r
    r_last = tl.minimum(r0 + R, len_r) - 1
    lo = 0
    hi = len_c
    free_lo = 0
    free_hi = len_c
    if HAS_LO:
        lo = tl.maximum(r0 + off - lo_w, 0)
        free_lo = tl.maximum(r_last + off - lo_w, 0)
    if HAS_HI:
        hi = tl.maximum(tl.minimum(r_last + off + hi_w + 1, len_c), 0)
        free_hi = tl.minimum(tl.maximum(r0 + off + hi_w + 1, 0), len_c)
    j0 = lo // C
    j3 = (hi + C - 1) // C
    j1 = tl.minimum(tl.maximum(j0, (free_lo + C - 1) // C), j3)
    j2 = tl.minimum(tl.maximum(j1, free_hi // C), j3)
    return j0 * C, j1 * C, j2 * C, j3 * C


@triton.jit
def band_mask(r, c, len_c, off, lo_w, hi_w, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr):
    """Visibility of (r, c) pairs; r and c broadcast against each other."""
    m = c < len_c
    if HAS_LO:
        m = m & (c >= r + off - lo_w)
    if HAS_HI:
        m = m & (c <= r + off + hi_w)
    return m


@triton.jit
def tanh(x):
    # One exp2 (MUFU) and one reciprocal; absolute error ~1e-7, which softcap multiplies by
    # c. libdevice's tanh would also do, but the interpreter cannot run libdevice calls.
    return 1.0 - 2.0 / (1.0 + tl.exp2(x * (2.0 * LOG2E)))


@triton.jit
def scores(qk, qk_scale, cap2, SOFTCAP: tl.constexpr):
    """Scores in base-2 units (log2 e folded in) and, with softcap, tanh for the backward.

    Without softcap qk_scale = scale * log2(e). With softcap qk_scale = scale / c and
    cap2 = c * log2(e), so that x = cap2 * tanh(qk * qk_scale) = log2(e) * c * tanh(s / c).
    """
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        return t * cap2, t
    else:
        return qk * qk_scale, qk


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter's bf16 dot is wrong in Triton 3.6 (it multiplies the raw bits);
    # products of 16-bit floats are exact in fp32, so upcasting there changes nothing.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def load_tile(
    ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, BCOLS: tl.constexpr, CHECK_ROWS: tl.constexpr
):
    """Load a (rows x cols) tile; rows >= n_rows and cols >= N_COLS read as 0. The masks
    are built only when needed so that the mask-free loops load without predicates."""
    if CHECK_ROWS:
        if N_COLS == BCOLS:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(
                ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0
            )
    else:
        if N_COLS == BCOLS:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
