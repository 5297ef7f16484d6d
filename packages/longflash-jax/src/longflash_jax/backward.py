# Computes: attention backward, dQ, dK, dV from dO, delta = rowsum(dO*O) and lse (2 passes).
# Tiles: dK/dV per block_k key tile over visible Q/dO tiles of its group; dQ per block_q Q tile.
# Target: NVIDIA GPUs via Pallas' Triton lowering (tuned for sm_90); the CPU via interpret mode.
"""Backward kernels: two passes, no atomics, deterministic.

dK/dV for a key tile: for each query head of the group and each visible query tile,
P^T = exp2(t^T - lse2), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta),
dK += dS^T Q. dQ for a query tile: dQ += dS K over visible key tiles. Scores are recomputed
in both (7 matmuls per score tile instead of 5) so that neither pass needs atomics or an
fp32 dQ buffer; the dK/dV pass sums the group inside the kernel, so K/V are never repeated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from longflash_jax import layout, ranges, scores
from longflash_jax.problem import Problem, Tile

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


def _ds(p: Problem, pr: Any, dp: Any, delta: Any, th: Any) -> Any:
    """d(loss)/d(raw score) without the final scale: P (dP - delta), times the softcap
    derivative 1 - tanh^2 when capped."""
    ds = pr * (dp - delta)
    if th is not None:
        ds = ds * (1.0 - th * th)
    return ds


def _dkdv_kernel(*refs: Any, p: Problem, t: Tile, grid: layout.Grid) -> None:
    cu_refs = refs[: 2 * p.varlen]
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref = refs[2 * p.varlen :]
    bq, bk, g = t.block_q, t.block_k, p.group
    tile, bh = grid.ids()
    seq = layout.sequence(p, cu_refs, bh // p.Hk)
    j0 = tile * bk
    cols = j0 + layout.iota(bk)
    check_rows = p.varlen or p.Nq % bq != 0
    check_keys = p.varlen or p.Nk % bk != 0
    keys_ok = cols < seq.nk if check_keys else None
    k = layout.load_tile(layout.at(p, k_ref, pl.ds(seq.k0 + j0, bk)), keys_ok, p.Dqk)
    v = layout.load_tile(layout.at(p, v_ref, pl.ds(seq.k0 + j0, bk)), keys_ok, p.Dv)
    # Query i sees key j iff j - off - right <= i <= j - off + left.
    rng = ranges.block_range(j0, seq.nk, seq.nq, seq.nq - seq.nk, p.right, p.left, bk, bq)

    def step(h: Any, masked: bool):
        def body(qt, carry):
            dk, dv = carry
            i0 = qt * bq
            rows = i0 + layout.iota(bq)
            rows_ok = rows < seq.nq if (masked and check_rows) else None
            at = pl.ds(seq.q0 + i0, bq)
            q = layout.load_tile(layout.at(p, q_ref, at, h), rows_ok, p.Dqk)
            do = layout.load_tile(layout.at(p, do_ref, at, h), rows_ok, p.Dv)
            # lse2 = +inf on rows past the end makes their P exactly 0.
            lse2 = layout.load_rows(layout.at(p, lse_ref, h, at), rows_ok, jnp.inf)
            delta = layout.load_rows(layout.at(p, dl_ref, h, at), rows_ok, 0.0)
            st, th = scores.logits(p, lax.dot_general(k, q, NT, preferred_element_type=jnp.float32))
            if masked:
                vis = ranges.visible(
                    rows,
                    cols,
                    seq.nq,
                    seq.nk,
                    p.left,
                    p.right,
                    check_rows=check_rows,
                    check_cols=False,
                    keys_first=True,
                )
                st = jnp.where(vis, st, -jnp.inf)
            pt = jnp.exp2(scores.times_c(p, st) - lse2[None, :])
            dv = dv + lax.dot_general(
                pt.astype(do.dtype), do, NN, preferred_element_type=jnp.float32
            )
            dpt = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
            dst = _ds(p, pt, dpt, delta[None, :], th)
            dk = dk + lax.dot_general(
                dst.astype(q.dtype), q, NN, preferred_element_type=jnp.float32
            )
            return dk, dv

        return body

    def over_head(h, carry):
        if p.right is not None:
            carry = lax.fori_loop(rng.lo, rng.a, step(h, True), carry)
        if p.Tq >= bq:  # else no tile can be full (and the unmasked load would not trace)
            carry = lax.fori_loop(rng.a, rng.b, step(h, False), carry)
        if p.left is not None or check_rows:
            carry = lax.fori_loop(rng.b, rng.hi, step(h, True), carry)
        return carry

    carry = (jnp.zeros((bk, p.dqk_pad), jnp.float32), jnp.zeros((bk, p.dv_pad), jnp.float32))
    # A traced head index even when g == 1: the interpreter cannot index a ref with a
    # Python int next to a dynamic slice.
    carry = over_head(jnp.int32(0), carry) if g == 1 else lax.fori_loop(0, g, over_head, carry)
    dk, dv = carry
    layout.store_tile(
        layout.at(p, dk_ref, pl.ds(seq.k0 + j0, bk)),
        (dk * p.scale).astype(dk_ref.dtype),
        keys_ok,
        p.Dqk,
    )
    layout.store_tile(
        layout.at(p, dv_ref, pl.ds(seq.k0 + j0, bk)), dv.astype(dv_ref.dtype), keys_ok, p.Dv
    )


def _dq_kernel(*refs: Any, p: Problem, t: Tile, grid: layout.Grid) -> None:
    cu_refs = refs[: 2 * p.varlen]
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref = refs[2 * p.varlen :]
    bq, bk = t.block_q, t.block_k
    tile, bh = grid.ids()
    n_tiles = pl.cdiv(p.Nq, bq)
    qt = (n_tiles - 1 - tile) if p.right is not None else tile
    seq = layout.sequence(p, cu_refs, bh // p.Hq)
    i0 = qt * bq
    rows = i0 + layout.iota(bq)
    check_rows = p.varlen or p.Nq % bq != 0
    check_keys = p.varlen or p.Nk % bk != 0
    rows_ok = rows < seq.nq if check_rows else None
    at = pl.ds(seq.q0 + i0, bq)
    q = layout.load_tile(layout.at(p, q_ref, at), rows_ok, p.Dqk)
    do = layout.load_tile(layout.at(p, do_ref, at), rows_ok, p.Dv)
    lse2 = layout.load_rows(layout.at(p, lse_ref, at), rows_ok, jnp.inf)
    delta = layout.load_rows(layout.at(p, dl_ref, at), rows_ok, 0.0)
    rng = ranges.block_range(i0, seq.nq, seq.nk, seq.nk - seq.nq, p.left, p.right, bq, bk)

    def step(masked: bool):
        def body(kt, dq):
            j0 = kt * bk
            keys_ok = (j0 + layout.iota(bk) < seq.nk) if (masked and check_keys) else None
            k = layout.load_tile(layout.at(p, k_ref, pl.ds(seq.k0 + j0, bk)), keys_ok, p.Dqk)
            v = layout.load_tile(layout.at(p, v_ref, pl.ds(seq.k0 + j0, bk)), keys_ok, p.Dv)
            s, th = scores.logits(p, lax.dot_general(q, k, NT, preferred_element_type=jnp.float32))
            if masked:
                vis = ranges.visible(
                    rows,
                    j0 + layout.iota(bk),
                    seq.nq,
                    seq.nk,
                    p.left,
                    p.right,
                    check_rows=False,
                    check_cols=check_keys,
                )
                s = jnp.where(vis, s, -jnp.inf)
            pr = jnp.exp2(scores.times_c(p, s) - lse2[:, None])
            dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
            ds = _ds(p, pr, dp, delta[:, None], th)
            return dq + lax.dot_general(
                ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32
            )

        return body

    dq = jnp.zeros((bq, p.dqk_pad), jnp.float32)
    if p.left is not None:
        dq = lax.fori_loop(rng.lo, rng.a, step(True), dq)
    if p.Tk >= bk:  # else no tile can be full (and the unmasked load would not trace)
        dq = lax.fori_loop(rng.a, rng.b, step(False), dq)
    if p.right is not None or check_keys:
        dq = lax.fori_loop(rng.b, rng.hi, step(True), dq)
    layout.store_tile(layout.at(p, dq_ref, at), (dq * p.scale).astype(dq_ref.dtype), rows_ok, p.Dqk)


def _params(p: Problem, t: Tile) -> Any:
    return None if p.interpret else layout.compiler_params(t.num_warps, t.num_stages)


def dkdv_call(p: Problem, t: Tile, like: tuple[Any, ...] = ()) -> Any:
    """pallas_call: (cu_q, cu_k,) q, k, v, do, lse2, delta -> dk, dv. q/do arrive viewed as
    (..., Hk, group, D) and lse2/delta as (..., Hk, group, N). ``like``: the inputs, whose
    shard_map mesh axes the outputs inherit."""
    grid = layout.make_grid(p, pl.cdiv(p.Nk, t.block_k), p.Hk)
    g = p.group
    in_specs = [
        layout.seq_spec(p, grid, p.Tq, p.Hk, p.dqk_pad, group=g),
        layout.seq_spec(p, grid, p.Tk, p.Hk, p.dqk_pad),
        layout.seq_spec(p, grid, p.Tk, p.Hk, p.dv_pad),
        layout.seq_spec(p, grid, p.Tq, p.Hk, p.dv_pad, group=g),
        layout.rowstat_spec(p, grid, p.Tq, p.Hk, group=g),
        layout.rowstat_spec(p, grid, p.Tq, p.Hk, group=g),
    ]
    out_specs = (
        layout.seq_spec(p, grid, p.Tk, p.Hk, p.dqk_pad),
        layout.seq_spec(p, grid, p.Tk, p.Hk, p.dv_pad),
    )
    dtype = jnp.dtype(p.dtype)
    lead = () if p.varlen else (p.B,)
    out_shape = (
        layout.out_struct(lead + (p.Tk, p.Hk, p.Dqk), dtype, like),
        layout.out_struct(lead + (p.Tk, p.Hk, p.Dv), dtype, like),
    )
    if p.varlen:
        in_specs = [layout.cu_spec(p), layout.cu_spec(p), *in_specs]
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, p=p, t=t, grid=grid),
        grid=grid.shape,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_params(p, t),
        interpret=p.interpret,
        name="longflash_bwd_dkdv",
    )


def dq_call(p: Problem, t: Tile, like: tuple[Any, ...] = ()) -> Any:
    """pallas_call: (cu_q, cu_k,) q, k, v, do, lse2, delta -> dq."""
    grid = layout.make_grid(p, pl.cdiv(p.Nq, t.block_q), p.Hq)
    g = p.group
    kv_head = lambda bh: bh % p.Hq // g
    in_specs = [
        layout.seq_spec(p, grid, p.Tq, p.Hq, p.dqk_pad),
        layout.seq_spec(p, grid, p.Tk, p.Hq, p.dqk_pad, head_of=kv_head),
        layout.seq_spec(p, grid, p.Tk, p.Hq, p.dv_pad, head_of=kv_head),
        layout.seq_spec(p, grid, p.Tq, p.Hq, p.dv_pad),
        layout.rowstat_spec(p, grid, p.Tq, p.Hq),
        layout.rowstat_spec(p, grid, p.Tq, p.Hq),
    ]
    lead = () if p.varlen else (p.B,)
    out_shape = layout.out_struct(lead + (p.Tq, p.Hq, p.Dqk), jnp.dtype(p.dtype), like)
    if p.varlen:
        in_specs = [layout.cu_spec(p), layout.cu_spec(p), *in_specs]
    return pl.pallas_call(
        functools.partial(_dq_kernel, p=p, t=t, grid=grid),
        grid=grid.shape,
        in_specs=in_specs,
        out_specs=layout.seq_spec(p, grid, p.Tq, p.Hq, p.dqk_pad),
        out_shape=out_shape,
        compiler_params=_params(p, t),
        interpret=p.interpret,
        name="longflash_bwd_dq",
    )
