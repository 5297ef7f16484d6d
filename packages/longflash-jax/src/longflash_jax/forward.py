# Computes: attention forward, out = softmax(mask(softcap(scale*QK^T)))V and lse (natural log).
# Tiles: block_q x D of Q per program, K/V tiles streamed over visible keys (K/V once per Q tile).
# Target: NVIDIA GPUs via Pallas' Triton lowering (tuned for sm_90); the CPU via interpret mode.
"""Forward kernel: online softmax in fp32 on exp2, masks only on edge tiles."""

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


def _kernel(*refs: Any, p: Problem, t: Tile, grid: layout.Grid) -> None:
    cu_refs, (q_ref, k_ref, v_ref, o_ref, lse_ref) = refs[: 2 * p.varlen], refs[2 * p.varlen :]
    bq, bk = t.block_q, t.block_k
    causal_like = p.right is not None
    tile, bh = grid.ids()
    n_tiles = pl.cdiv(p.Nq, bq)
    # Under a right bound the last query tiles see the most keys: start them first.
    qt = (n_tiles - 1 - tile) if causal_like else tile
    seq = layout.sequence(p, cu_refs, bh // p.Hq)
    i0 = qt * bq
    rows = i0 + layout.iota(bq)
    check_rows = p.varlen or p.Nq % bq != 0
    check_keys = p.varlen or p.Nk % bk != 0
    rows_ok = rows < seq.nq if check_rows else None

    q = layout.load_tile(layout.at(p, q_ref, pl.ds(seq.q0 + i0, bq)), rows_ok, p.Dqk)
    rng = ranges.block_range(i0, seq.nq, seq.nk, seq.nk - seq.nq, p.left, p.right, bq, bk)

    def step(masked: bool):
        def body(kt, carry):
            acc, m, den = carry
            j0 = kt * bk
            keys_ok = (j0 + layout.iota(bk) < seq.nk) if (masked and check_keys) else None
            k = layout.load_tile(layout.at(p, k_ref, pl.ds(seq.k0 + j0, bk)), keys_ok, p.Dqk)
            v = layout.load_tile(layout.at(p, v_ref, pl.ds(seq.k0 + j0, bk)), keys_ok, p.Dv)
            s, _ = scores.logits(p, lax.dot_general(q, k, NT, preferred_element_type=jnp.float32))
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
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            # A row with nothing visible yet keeps m = -inf; exp2 against 0 gives it p = 0
            # instead of exp2(-inf + inf) = NaN. Interior tiles always see something.
            m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            mc = scores.times_c(p, m_use)
            alpha = jnp.exp2(scores.times_c(p, m) - mc)
            pr = jnp.exp2(scores.times_c(p, s) - mc[:, None])
            den = den * alpha + jnp.sum(pr, axis=1)
            acc = acc * alpha[:, None] + lax.dot_general(
                pr.astype(v.dtype), v, NN, preferred_element_type=jnp.float32
            )
            return acc, m_new, den

        return body

    carry = (
        jnp.zeros((bq, p.dv_pad), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    if p.left is not None:
        carry = lax.fori_loop(rng.lo, rng.a, step(True), carry)
    if p.Tk >= bk:  # else no tile can be full (and the unmasked load would not trace)
        carry = lax.fori_loop(rng.a, rng.b, step(False), carry)
    if p.right is not None or check_keys:
        carry = lax.fori_loop(rng.b, rng.hi, step(True), carry)
    acc, m, den = carry

    seen = den > 0
    out = acc * (1.0 / jnp.where(seen, den, 1.0))[:, None]
    lse = jnp.where(seen, (scores.times_c(p, m) + jnp.log2(den)) * scores.LN2, -jnp.inf)
    layout.store_tile(
        layout.at(p, o_ref, pl.ds(seq.q0 + i0, bq)), out.astype(o_ref.dtype), rows_ok, p.Dv
    )
    layout.store_rows(layout.at(p, lse_ref, pl.ds(seq.q0 + i0, bq)), lse, rows_ok)


def forward_call(p: Problem, t: Tile, like: tuple[Any, ...] = ()) -> Any:
    """The pallas_call computing (out, lse) from (cu_q, cu_k,) q, k, v. ``like``: the
    input arrays, whose shard_map mesh axes the outputs inherit."""
    n_tiles = pl.cdiv(p.Nq, t.block_q)
    grid = layout.make_grid(p, n_tiles, p.Hq)
    g = p.group
    q_spec = layout.seq_spec(p, grid, p.Tq, p.Hq, p.dqk_pad)
    k_spec = layout.seq_spec(p, grid, p.Tk, p.Hq, p.dqk_pad, head_of=lambda bh: bh % p.Hq // g)
    v_spec = layout.seq_spec(p, grid, p.Tk, p.Hq, p.dv_pad, head_of=lambda bh: bh % p.Hq // g)
    o_spec = layout.seq_spec(p, grid, p.Tq, p.Hq, p.dv_pad)
    lse_spec = layout.rowstat_spec(p, grid, p.Tq, p.Hq)
    dtype = jnp.dtype(p.dtype)
    if p.varlen:
        out_shape = (
            layout.out_struct((p.Tq, p.Hq, p.Dv), dtype, like),
            layout.out_struct((p.Hq, p.Tq), jnp.float32, like),
        )
        in_specs = [layout.cu_spec(p), layout.cu_spec(p), q_spec, k_spec, v_spec]
    else:
        out_shape = (
            layout.out_struct((p.B, p.Nq, p.Hq, p.Dv), dtype, like),
            layout.out_struct((p.B, p.Hq, p.Nq), jnp.float32, like),
        )
        in_specs = [q_spec, k_spec, v_spec]
    return pl.pallas_call(
        functools.partial(_kernel, p=p, t=t, grid=grid),
        grid=grid.shape,
        in_specs=in_specs,
        out_specs=(o_spec, lse_spec),
        out_shape=out_shape,
        compiler_params=None if p.interpret else layout.compiler_params(t.num_warps, t.num_stages),
        interpret=p.interpret,
        name="longflash_fwd",
    )
