# Computes: attention forward, out = softmax(mask(scale*QK^T))V and lse (natural log), batched.
# Tiles: CTA = 2 consumer warpgroups x block_q query rows (Q read once) + 1 TMA producer warpgroup
#   streaming block_k x D tiles of K and V through a `stages`-deep SMEM ring (K/V once per CTA).
# Target: NVIDIA sm_90a (H100/H200) through Pallas' Mosaic GPU lowering (jax >= 0.11), wgmma.
"""Mosaic GPU forward kernel: warp-specialised, TMA-fed, ping-pong between two consumer WGs.

Only the dense training shape lives here (see ``mosaic_route.reasons``): no window other than
causal, no softcap, no varlen, Dqk = Dv in {64, 128, 256}. Everything else stays on the
Triton-lowered kernels (the backward has its own Mosaic kernels in mosaic_bwd.py, routed
separately). This module imports the Mosaic GPU API at the top and is only imported when a
call is routed to it (never on the CPU).

Schedule per consumer warpgroup and key tile j (slot = j mod stages):
  wait K[slot] -> wgmma S = Q K^T (SS) -> rendezvous with the other WG -> release K[slot]
  -> mask (edge tiles only) -> online softmax on exp2 -> arrive -> wait V[slot] -> wait for the
  other WG -> wgmma O += P V (RS, P from registers) -> release V[slot].
The second consumer starts one rendezvous late, so one WG's softmax runs while the other's
matrix products occupy the tensor cores (FA3's ping-pong). Under a causal mask the first WG
needs fewer key tiles than the second; it keeps releasing slots and meeting the rendezvous
for the tiles it skips, so that the producer and the other WG never wait on it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from longflash_jax.problem import Problem

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
CONSUMERS = 2
# setmaxnreg budgets: 2 x 128 threads at 232 plus 128 at 40 is 64,512 of the SM's 65,536
# registers. The producer only computes addresses; the consumers hold S, P and O.
CONSUMER_REGS = 232
PRODUCER_REGS = 40


@dataclass(frozen=True)
class MosaicTile:
    """block_q: query rows per consumer warpgroup (a wgmma M of 64 per WG); block_k: keys per
    tile; stages: depth of the K/V ring in shared memory."""

    block_q: int
    block_k: int
    stages: int


def swizzled() -> tuple[Any, ...]:
    """SMEM transforms of every wgmma operand tile: a 128-byte swizzle over 64-element rows,
    the layout wgmma reads without bank conflicts."""
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def stream_kv(
    gmem: tuple[Any, Any],
    smem: tuple[Any, Any],
    full: tuple[Any, Any],
    free: tuple[Any, Any],
    b: Any,
    kvh: Any,
    bk: int,
    stages: int,
    n_load: Any,
) -> None:
    """The producer warpgroup's loop of the forward and the backward's dQ kernel: K/V tiles
    0..n_load-1 of (batch b, KV head kvh), bk keys each, into a ring of ``stages`` slots;
    slot j mod stages is refilled once both consumers released it (``free``), and ``full``
    signals its arrival. Keys past Nk read as zeros (TMA out-of-bounds fill); the consumers'
    masks drop them."""

    @pl.loop(0, n_load)
    def _load(j):
        slot = lax.rem(j, jnp.int32(stages))
        rows = (b, pl.ds(j * bk, bk), kvh)
        for src, dst, bar, released in zip(gmem, smem, full, free):

            @pl.when(j >= stages)
            def _(released=released):
                plgpu.barrier_wait(released.at[slot])

            plgpu.copy_gmem_to_smem(src.at[rows], dst.at[slot], bar.at[slot])


def _cdiv_nonneg(x: Any, d: int) -> Any:
    # lax.div truncates toward zero; clamping at 0 first makes it a floor division.
    x = lax.max(x, jnp.int32(0))
    return lax.div(x + jnp.int32(d - 1), jnp.int32(d))


def _key_tiles(p: Problem, t: MosaicTile, r0: Any) -> tuple[Any, Any]:
    """(tiles to visit, tiles needing no mask) for the block_q rows starting at row r0."""
    n_tiles, n_full = pl.cdiv(p.Nk, t.block_k), p.Nk // t.block_k
    if p.right is None:
        return n_tiles, n_full
    off = p.Nk - p.Nq
    # Row i sees keys j <= i + off: the tile's last row bounds the tiles to visit, its first
    # row bounds the tiles that every row sees whole.
    hi = lax.min(_cdiv_nonneg(r0 + (t.block_q + off), t.block_k), jnp.int32(n_tiles))
    full = lax.div(lax.max(r0 + (off + 1), jnp.int32(0)), jnp.int32(t.block_k))
    return hi, lax.min(lax.min(full, jnp.int32(n_full)), hi)


def forward_call(p: Problem, t: MosaicTile) -> Any:
    """A function (q, k, v) -> (out, lse) for one batched problem (see mosaic_route)."""
    bq, bk, stages = t.block_q, t.block_k, t.stages
    d = p.Dqk
    dtype = jnp.dtype(p.dtype)
    c = p.scale * LOG2E  # m and the exponents are kept in base-2 units of scale*q.k
    causal = p.right is not None
    rows_per_cta = CONSUMERS * bq
    n_cta_q = pl.cdiv(p.Nq, rows_per_cta)
    # lse leaves through TMA in whole tiles: its row stride must be 16-byte aligned and the
    # last tile must exist, so it is written padded and sliced afterwards (B*H*N*4 bytes).
    lse_len = n_cta_q * rows_per_cta
    mask_keys = p.Nk % bk != 0

    def rendezvous(sched: Any) -> None:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem, bars):
        q_bar, k_bar, v_bar, k_free, v_free, sched = bars
        wg = lax.axis_index("wg")
        h, b = lax.axis_index("h"), lax.axis_index("b")
        qt = lax.axis_index("q")
        if causal:  # the last query tiles see the most keys: launch them first
            qt = (n_cta_q - 1) - qt
        kvh = lax.div(h, jnp.int32(p.group))
        cta_r0 = qt * rows_per_cta
        # The producer streams every tile the CTA's last warpgroup needs (the most).
        n_load, _ = _key_tiles(p, t, cta_r0 + (CONSUMERS - 1) * bq)

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGS, action="increase")
            r0 = cta_r0 + wg * bq
            q_s = q_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, bq), h], q_s, q_bar.at[wg])
            n_all, n_full = _key_tiles(p, t, r0)
            wgmma_layout = plgpu.Layout.WGMMA
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            carry = (
                plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), wgmma_layout),
                plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout),
                plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout),
            )
            plgpu.barrier_wait(q_bar.at[wg])
            pl.when(wg == 1)(lambda: rendezvous(sched))

            def step(masked: bool):
                def body(j, carry):
                    acc, m, den = carry
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])

                    def qk(s_ref):
                        plgpu.wgmma(s_ref, q_s, k_smem.at[slot].transpose((1, 0)))
                        rendezvous(sched)
                        return s_ref[...]

                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    if masked:
                        cols = j * bk + plgpu.broadcasted_iota(
                            jnp.int32, (bq, bk), 1, layout=wgmma_layout
                        )
                        vis = None
                        if mask_keys:
                            vis = cols < p.Nk
                        if causal:
                            rows = r0 + plgpu.broadcasted_iota(
                                jnp.int32, (bq, bk), 0, layout=wgmma_layout
                            )
                            edge = cols <= rows + (p.Nk - p.Nq)
                            vis = edge if vis is None else jnp.logical_and(vis, edge)
                        s = jnp.where(vis, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1) * c)
                    # Rows that have seen no key yet keep m = -inf; exponents taken against
                    # 0 give them p = 0 instead of exp2(-inf + inf) = NaN.
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                    alpha = jnp.exp2(m - m_use)
                    pr = jnp.exp2(s * c - lax.broadcast_in_dim(m_use, s.shape, [0]))
                    den = den * alpha + pr.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    p16 = pr.astype(dtype)
                    plgpu.barrier_arrive(sched)  # softmax done: the other WG may multiply
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_wait(sched)  # the other WG's products are issued

                    def pv(o_acc):
                        plgpu.wgmma(o_acc, p16, v_smem.at[slot])

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, den

                return body

            carry = lax.fori_loop(0, n_full, step(False), carry)
            if causal or mask_keys:
                carry = lax.fori_loop(n_full, n_all, step(True), carry)
            if causal:
                # Tiles the other WG still multiplies: release them and keep the ping-pong
                # rendezvous count equal (two per tile).
                @pl.loop(n_all, n_load)
                def _drain(j):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    rendezvous(sched)
                    rendezvous(sched)

            pl.when(wg == 0)(lambda: rendezvous(sched))
            acc, m, den = carry
            seen = den > 0.0
            inv = 1.0 / jnp.where(seen, den, 1.0)
            out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            lse = jnp.where(seen, m * LN2 + jnp.log(jnp.where(seen, den, 1.0)), -jnp.inf)
            q_s[...] = out.astype(dtype)
            lse_smem.at[wg][...] = lse
            plgpu.commit_smem()
            # Rows past Nq fall outside the tensor: TMA drops them.
            plgpu.copy_smem_to_gmem(q_s, o_ref.at[b, pl.ds(r0, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(r0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
            stream_kv(
                (k_ref, v_ref),
                (k_smem, v_smem),
                (k_bar, v_bar),
                (k_free, v_free),
                b,
                kvh,
                bk,
                stages,
                n_load,
            )

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        tr = swizzled()
        scratch = (
            plgpu.SMEM((CONSUMERS, bq, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
            plgpu.SMEM((stages, bk, d), dtype, transforms=tr),
            plgpu.SMEM((CONSUMERS, bq), jnp.float32),
        )
        bars = (
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=CONSUMERS),
        )
        pl.run_scoped(
            lambda *s: kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *s[:4], s[4:]),
            *scratch,
            *bars,
            collective_axes="wg",
        )

    call = plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((p.B, p.Nq, p.Hq, p.Dv), dtype),
            jax.ShapeDtypeStruct((p.B, p.Hq, lse_len), jnp.float32),
        ),
        # Heads vary fastest: the CTAs running together share K/V tiles of one GQA group.
        grid=(p.Hq, n_cta_q, p.B),
        grid_names=("h", "q", "b"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )

    def run(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
        out, lse = call(q, k, v)
        return out, (lse if lse_len == p.Nq else lse[..., : p.Nq])

    return run


@functools.partial(jax.jit, static_argnums=(0, 1))
def forward(p: Problem, t: MosaicTile, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
    return forward_call(p, t)(q, k, v)
