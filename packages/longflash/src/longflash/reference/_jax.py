"""Reference attention in jax.numpy: exact and blockwise paths, forward and backward.

Everything is traceable: shapes and tile counts are static, cu_seqlens may be tracers
(the mask is built from per-row key ranges computed with searchsorted), loops are
lax.map/scan/fori_loop, so the functions work under jit, vmap and inside the front-end's
custom_vjp. The layout is the torch module's: head-major rows r = token*G + group.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
from jax import lax

from longflash.call import AttentionCall

NEG_INF = float("-inf")
# XLA on GPU may run float32 matmuls in TF32 by default; the reference must not.
_PRECISION = lax.Precision.HIGHEST


@dataclass(frozen=True)
class _Problem:
    b: int
    nq: int
    nk: int
    hk: int
    g: int
    scale: float
    softcap: float | None
    masked: bool  # False: every row sees every key
    varlen: bool


def _mm(a, b):
    return jnp.matmul(a, b, precision=_PRECISION)


# -- entry points ----------------------------------------------------------------------
def forward(call: AttentionCall, q, k, v, path: str, settings):
    q4, k4, v4 = _batched(call, q, k, v)
    b, nq, hq, _ = q4.shape
    nk = k4.shape[1]
    if q4.size == 0 or nk == 0:
        out = jnp.zeros((b, nq, hq, v4.shape[-1]), q4.dtype)
        return _unbatched(call, out, jnp.full((b, hq, nq), NEG_INF, jnp.float32))
    p = _problem(call, q4, k4)
    lo, hi = _bounds(call, nq, nk)
    cd = _compute_dtype(q4.dtype)
    qh, kh, vh = (_heads_major(x, p.hk, cd) for x in (q4, k4, v4))
    if path == "exact":
        out_h, lse_h = _forward_exact(p, lo, hi, qh, kh, vh)
    else:
        out_h, lse_h = _forward_blockwise(p, lo, hi, qh, kh, vh, settings)
    out = _tokens_major(out_h, p.g).astype(q4.dtype)
    lse = _lse_out(lse_h, p)
    return _unbatched(call, out, lse)


def backward(call: AttentionCall, dout, q, k, v, out, lse, path: str, settings):
    q4, k4, v4 = _batched(call, q, k, v)
    nk = k4.shape[1]
    if q4.size == 0 or nk == 0:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    p = _problem(call, q4, k4)
    lo, hi = _bounds(call, p.nq, p.nk)
    cd = _compute_dtype(q4.dtype)
    qh, kh, vh = (_heads_major(x, p.hk, cd) for x in (q4, k4, v4))
    doh = _heads_major(_batched_one(call, dout), p.hk, cd)
    oh = _heads_major(_batched_one(call, out), p.hk, cd)
    # rowsum(dO * O): the softmax Jacobian term of dS = P * (dP - delta).
    delta = jnp.sum(doh * oh, axis=-1, keepdims=True)
    if cd == jnp.float64:
        # The float32 lse the protocol carries would cap float64 gradients at float32
        # accuracy: recompute it.
        if path == "exact":
            lse_h = _forward_exact(p, lo, hi, qh, kh, vh, with_out=False)[1]
        else:
            lse_h = _forward_blockwise(p, lo, hi, qh, kh, vh, settings, with_out=False)[1]
    else:
        lse_h = _lse_in(_batched_one(call, lse), p, cd)
    lse_h = _safe_lse(lse_h)
    if path == "exact":
        inv = _invisible(lo, hi, 0, p.nk) if p.masked else None
        dq, dk, dv = _grads_tile(p, qh, kh, vh, doh, lse_h, delta, inv)
    else:
        dq, dk, dv = _backward_blockwise(p, lo, hi, qh, kh, vh, doh, lse_h, delta, settings)
    dq = _tokens_major(dq * p.scale, p.g).astype(q4.dtype)
    dk = _tokens_major(dk * p.scale, 1).astype(k4.dtype)
    dv = _tokens_major(dv, 1).astype(v4.dtype)
    if call.varlen is not None:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return dq, dk, dv


# -- layout ----------------------------------------------------------------------------
def _compute_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _batched(call, q, k, v):
    if call.varlen is None:
        return q, k, v
    return q[None], k[None], v[None]


def _batched_one(call, x):
    return x if call.varlen is None else x[None]


def _unbatched(call, out, lse):
    if call.varlen is None:
        return out, lse
    return out[0], lse[0]


def _heads_major(x, hk: int, cd):
    """(b, n, h, d) -> (b, hk, n*g, d) in the compute dtype, row = token*g + group."""
    b, n, h, d = x.shape
    g = h // hk
    y = x.astype(cd).reshape(b, n, hk, g, d).transpose(0, 2, 1, 3, 4)
    return y.reshape(b, hk, n * g, d)


def _tokens_major(y, g: int):
    b, hk, rows, d = y.shape
    n = rows // g
    return y.reshape(b, hk, n, g, d).transpose(0, 2, 1, 3, 4).reshape(b, n, hk * g, d)


def _lse_out(lse_h, p: _Problem):
    lse = lse_h.reshape(p.b, p.hk, p.nq, p.g).transpose(0, 1, 3, 2)
    return lse.reshape(p.b, p.hk * p.g, p.nq).astype(jnp.float32)


def _lse_in(lse, p: _Problem, cd):
    lse = lse.reshape(p.b, p.hk, p.g, p.nq).transpose(0, 1, 3, 2)
    return lse.reshape(p.b, p.hk, p.nq * p.g).astype(cd)


def _safe_lse(lse_h):
    # Rows that see no key have lse = -inf and all scores -inf; subtracting 0 instead
    # keeps exp(s - lse) at exactly 0 there instead of NaN.
    return jnp.where(jnp.isneginf(lse_h), 0.0, lse_h)[..., None]


# -- the mask as one key range per query row ---------------------------------------------
def _problem(call: AttentionCall, q4, k4) -> _Problem:
    b, nq, hq, _ = q4.shape
    nk, hk = k4.shape[1], k4.shape[2]
    masked = call.window is not None or call.varlen is not None
    return _Problem(
        b, nq, nk, hk, hq // hk, call.scale, call.softcap, masked, call.varlen is not None
    )


def _bounds(call: AttentionCall, nq: int, nk: int):
    """Visible keys [lo[r], hi[r]) of each query row (packed indices for varlen), int32.
    Only jnp ops on cu_seqlens, so they may be tracers."""
    t = jnp.arange(nq, dtype=jnp.int32)
    if call.varlen is None:
        start_k = jnp.zeros_like(t)
        pos, len_q, len_k = t, jnp.full_like(t, nq), jnp.full_like(t, nk)
    else:
        cu_q = jnp.asarray(call.varlen.cu_seqlens_q, jnp.int32)
        cu_k = jnp.asarray(call.varlen.cu_seqlens_k, jnp.int32)
        # The last sequence starting at or before t holds t (searching right skips the
        # empty sequences that share its start).
        seq = jnp.clip(jnp.searchsorted(cu_q, t, side="right") - 1, 0, cu_q.shape[0] - 2)
        start_q, start_k = cu_q[seq], cu_k[seq]
        len_q, len_k = cu_q[seq + 1] - start_q, cu_k[seq + 1] - start_k
        pos = t - start_q
    diag = pos + (len_k - len_q)  # the key aligned with this query (bottom-right)
    left, right = call.window if call.window is not None else (None, None)
    cap = nq + nk  # a wider window is unbounded; capping keeps int32 from overflowing
    lo = jnp.zeros_like(t) if left is None else jnp.clip(diag - min(left, cap), 0, len_k)
    hi = len_k if right is None else jnp.clip(diag + min(right, cap) + 1, 0, len_k)
    return start_k + lo, start_k + hi


def _invisible(lo, hi, k0, nkeys: int):
    """(rows, nkeys) bool: True where a row cannot see key k0 + j (k0 may be traced)."""
    j = k0 + jnp.arange(nkeys, dtype=jnp.int32)
    return (j < lo[:, None]) | (j >= hi[:, None])


def _scores(p: _Problem, qt, kt, inv, keep_tanh: bool = False):
    """Scaled, softcapped, masked scores (b, hk, rows, keys); ``inv`` (tokens, keys) or
    None; also tanh(raw/softcap) when keep_tanh (for the backward)."""
    s = _mm(qt, jnp.swapaxes(kt, -1, -2)) * p.scale
    tanh = None
    if p.softcap is not None:
        tanh = jnp.tanh(s / p.softcap)
        s = tanh * p.softcap
    if inv is not None:
        b, hk, rows, keys = s.shape
        s = s.reshape(b, hk, rows // p.g, p.g, keys)
        s = jnp.where(inv[:, None, :], NEG_INF, s).reshape(b, hk, rows, keys)
    return s, (tanh if keep_tanh else None)


# -- forward ---------------------------------------------------------------------------
def _forward_exact(p: _Problem, lo, hi, qh, kh, vh, with_out: bool = True):
    """One softmax over the whole score matrix."""
    inv = _invisible(lo, hi, 0, p.nk) if p.masked else None
    s, _ = _scores(p, qh, kh, inv)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isneginf(m), 0.0, m)  # rows that see no key
    e = jnp.exp(s - m)
    rowsum = jnp.sum(e, axis=-1, keepdims=True)
    lse = jnp.where(rowsum == 0, NEG_INF, m + jnp.log(rowsum))[..., 0]
    if not with_out:
        return None, lse
    return _mm(e, vh) / jnp.where(rowsum == 0, 1.0, rowsum), lse


def _tiling(n: int, block: int) -> tuple[int, int]:
    """(tiles, tile size) covering n with the fewest tiles of at most ``block`` and the
    least padding (tile sizes need not be powers of two here)."""
    tiles = max(1, -(-n // block))
    return tiles, -(-n // tiles)


class _Tiles:
    """Padded operands and static tile geometry shared by forward and backward."""

    def __init__(self, p: _Problem, lo, hi, settings):
        self.nq_t, self.bq = _tiling(p.nq, settings.block_q)
        self.nk_t, self.bk = _tiling(p.nk, settings.block_k)
        self.pad_q = self.nq_t * self.bq - p.nq
        self.pad_k = self.nk_t * self.bk - p.nk
        # Padded query rows get an empty range (they see nothing and are cut off at the
        # end); padded keys lie beyond every hi, so the mask hides them.
        self.lo = jnp.pad(lo, (0, self.pad_q))
        self.hi = jnp.pad(hi, (0, self.pad_q))
        self.need_mask = p.masked or self.pad_k > 0
        self.p = p

    def rows(self, x, pad_value=0.0):
        """Pad a (b, hk, nq*g, ...) array along rows to whole query tiles."""
        widths = [(0, 0)] * x.ndim
        widths[2] = (0, self.pad_q * self.p.g)
        return jnp.pad(x, widths, constant_values=pad_value)

    def keys(self, x):
        widths = [(0, 0)] * x.ndim
        widths[2] = (0, self.pad_k)
        return jnp.pad(x, widths)

    def query_tile(self, i):
        """Row range of query tile i and the key tiles [first, last) it must visit."""
        bq, bk = self.bq, self.bk
        lo_t = lax.dynamic_slice_in_dim(self.lo, i * bq, bq)
        hi_t = lax.dynamic_slice_in_dim(self.hi, i * bq, bq)
        sees = lo_t < hi_t
        first = jnp.min(jnp.where(sees, lo_t, self.nk_t * bk)) // bk
        last = (jnp.max(jnp.where(sees, hi_t, 0)) + bk - 1) // bk
        last = jnp.where(jnp.any(sees), last, first)
        return lo_t, hi_t, sees, first, last

    def visit(self, lo_t, hi_t, sees, k0, compute, carry):
        """compute(carry) for key tile k0 unless no row sees a key in it.

        Per-row ranges are contiguous, so only varlen (a query tile spanning sequences)
        leaves invisible key tiles between first and last.
        """
        if not self.p.varlen:
            return compute(carry)
        visible = jnp.any(sees & (lo_t < k0 + self.bk) & (hi_t > k0))
        return lax.cond(visible, compute, lambda c: c, carry)


def _forward_blockwise(p: _Problem, lo, hi, qh, kh, vh, settings, with_out: bool = True):
    """Online softmax over tiles: a running max m, row sum and unnormalised output per
    row, rescaled by exp(m_old - m_new) whenever the max grows."""
    tl = _Tiles(p, lo, hi, settings)
    qp, kp, vp = tl.rows(qh), tl.keys(kh), tl.keys(vh)
    rows, bk, dv = tl.bq * p.g, tl.bk, vh.shape[-1]

    def q_tile(i):
        qt = lax.dynamic_slice_in_dim(qp, i * rows, rows, axis=2)
        lo_t, hi_t, sees, first, last = tl.query_tile(i)

        def k_tile(j, carry):
            k0 = j * bk

            def compute(carry):
                m, rowsum, acc = carry
                kt = lax.dynamic_slice_in_dim(kp, k0, bk, axis=2)
                inv = _invisible(lo_t, hi_t, k0, bk) if tl.need_mask else None
                s, _ = _scores(p, qt, kt, inv)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
                # A row with nothing visible yet keeps m = -inf; shifting by 0 instead
                # avoids exp(-inf - -inf) = NaN and leaves its terms at exactly 0.
                shift = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                e = jnp.exp(s - shift)
                alpha = jnp.exp(m - shift)
                rowsum = rowsum * alpha + jnp.sum(e, axis=-1, keepdims=True)
                if with_out:
                    vt = lax.dynamic_slice_in_dim(vp, k0, bk, axis=2)
                    acc = acc * alpha + _mm(e, vt)
                return m_new, rowsum, acc

            return tl.visit(lo_t, hi_t, sees, k0, compute, carry)

        init = (
            jnp.full((p.b, p.hk, rows, 1), NEG_INF, qh.dtype),
            jnp.zeros((p.b, p.hk, rows, 1), qh.dtype),
            jnp.zeros((p.b, p.hk, rows, dv if with_out else 0), qh.dtype),
        )
        m, rowsum, acc = lax.fori_loop(first, last, k_tile, init)
        lse = jnp.where(rowsum == 0, NEG_INF, m + jnp.log(rowsum))[..., 0]
        out = acc / jnp.where(rowsum == 0, 1.0, rowsum)
        return out, lse

    out, lse = lax.map(q_tile, jnp.arange(tl.nq_t))
    # (tiles, b, hk, rows, ...) -> (b, hk, tiles*rows, ...), cut to the real rows.
    lse = jnp.moveaxis(lse, 0, 2).reshape(p.b, p.hk, -1)[:, :, : p.nq * p.g]
    if not with_out:
        return None, lse
    out = jnp.moveaxis(out, 0, 2).reshape(p.b, p.hk, -1, dv)[:, :, : p.nq * p.g]
    return out, lse


# -- backward --------------------------------------------------------------------------
def _grads_tile(p: _Problem, qt, kt, vt, dot, lse_t, delta_t, inv):
    """Closed-form gradients of one tile (dq and dk still to be multiplied by scale):
    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), times
    1 - tanh^2 under softcap (d/dx c*tanh(x/c)), dQ = dS K, dK = dS^T Q."""
    s, tanh = _scores(p, qt, kt, inv, keep_tanh=True)
    prob = jnp.exp(s - lse_t)  # masked scores are -inf: exactly 0
    dv = _mm(jnp.swapaxes(prob, -1, -2), dot)
    ds = prob * (_mm(dot, jnp.swapaxes(vt, -1, -2)) - delta_t)
    if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
    return _mm(ds, kt), _mm(jnp.swapaxes(ds, -1, -2), qt), dv


def _backward_blockwise(p: _Problem, lo, hi, qh, kh, vh, doh, lse_h, delta, settings):
    """FlashAttention-2 backward: per tile, recompute P from the lse; dq accumulates per
    query tile, dk and dv in place per key tile, all in the compute dtype."""
    tl = _Tiles(p, lo, hi, settings)
    qp, dop, lsep, deltap = tl.rows(qh), tl.rows(doh), tl.rows(lse_h), tl.rows(delta)
    kp, vp = tl.keys(kh), tl.keys(vh)
    rows, bk = tl.bq * p.g, tl.bk

    def q_tile(carry, i):
        def rows_of(x):
            return lax.dynamic_slice_in_dim(x, i * rows, rows, axis=2)

        qt, dot, lse_t, delta_t = rows_of(qp), rows_of(dop), rows_of(lsep), rows_of(deltap)
        lo_t, hi_t, sees, first, last = tl.query_tile(i)

        def k_tile(j, carry):
            k0 = j * bk

            def compute(carry):
                dq_t, dk, dv = carry
                kt = lax.dynamic_slice_in_dim(kp, k0, bk, axis=2)
                vt = lax.dynamic_slice_in_dim(vp, k0, bk, axis=2)
                inv = _invisible(lo_t, hi_t, k0, bk) if tl.need_mask else None
                dq_p, dk_p, dv_p = _grads_tile(p, qt, kt, vt, dot, lse_t, delta_t, inv)
                dk = lax.dynamic_update_slice_in_dim(
                    dk, lax.dynamic_slice_in_dim(dk, k0, bk, axis=2) + dk_p, k0, axis=2
                )
                dv = lax.dynamic_update_slice_in_dim(
                    dv, lax.dynamic_slice_in_dim(dv, k0, bk, axis=2) + dv_p, k0, axis=2
                )
                return dq_t + dq_p, dk, dv

            return tl.visit(lo_t, hi_t, sees, k0, compute, carry)

        dk, dv = carry
        dq_t, dk, dv = lax.fori_loop(first, last, k_tile, (jnp.zeros_like(qt), dk, dv))
        return (dk, dv), dq_t

    (dk, dv), dq = lax.scan(q_tile, (jnp.zeros_like(kp), jnp.zeros_like(vp)), jnp.arange(tl.nq_t))
    dq = jnp.moveaxis(dq, 0, 2).reshape(p.b, p.hk, -1, qh.shape[-1])[:, :, : p.nq * p.g]
    return dq, dk[:, :, : p.nk], dv[:, :, : p.nk]
