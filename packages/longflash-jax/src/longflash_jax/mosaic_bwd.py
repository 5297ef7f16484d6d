# Computes: attention backward dQ, dK, dV from dO, O, lse (delta = rowsum(dO*O) in XLA), batched.
# Tiles: dK/dV CTA = 2 consumer WGs x block_k keys (K/V read once) + 1 TMA producer streaming
#   block_q tiles of Q, dO, (lse, delta) per query head of the GQA group; dQ CTA = 2 WGs x block_q
#   (or, fused, dQ parts TMA-reduce-added into fp32 by the dK/dV CTAs).
# Target: NVIDIA sm_90a (H100/H200) through Pallas' Mosaic GPU lowering (jax >= 0.11), wgmma.
"""Mosaic GPU backward: two warp-specialised kernels, no atomics, deterministic.

Scope as in ``mosaic_route.mosaic_bwd_reasons``: dense (B, N, H, D), Dqk = Dv in {64, 128},
bf16/fp16, causal (bottom-right) or none, GQA/MQA, any scale > 0, N % 8 == 0. Everything else
stays on the Triton-lowered backward. Imported only when a call is routed here (never on a CPU).

dK/dV kernel, one CTA per 2*block_k keys of one KV head; each consumer warpgroup owns block_k
keys (the wgmma M of 64) with K, V in SMEM and dK, dV accumulating in registers for the whole
CTA. Per query head h of the group and visible query tile (slot = step mod stages):
  wait Q, dO, (lse2, delta)[slot]
  wgmma S^T = K Q^T and dP^T = V dO^T (both SS, one wait)
  P^T = exp2(S^T c - lse2), mask on causal edge tiles only
  dS^T = P^T (dP^T - delta)
  wgmma dV += P^T dO and dK += dS^T Q (both RS: P^T, dS^T from registers; one wait)
  release the slot (2 arrivals: both warpgroups read the same Q/dO)
GQA: the group's heads are looped inside the CTA (the producer streams h-major), so K/V are
read once, dK/dV are written once, and no (B, N, Hq, D) partial gradients exist in HBM; the
price is fewer CTAs when B*Hk*(Nk/2 block_k) is below the SM count (MQA at small batch).

dQ kernel, one CTA per 2*block_q query rows of one query head (the forward's shape): Q, dO,
lse2, delta of each warpgroup loaded once; the producer streams K/V tiles:
  wgmma S = Q K^T and dP = dO V^T (SS), P = exp2(S c - lse2), dS = P (dP - delta),
  wgmma dQ += dS K (RS).
S and dP are recomputed there (7 products per score tile instead of FA3's 5): the price of no
atomics and no fp32 dQ buffer.

Fused-dQ variant (``MosaicBwdTiles(fused=True)``, off by default until measured): FA3's
structure, no dQ kernel. The dK/dV consumers store dS^T to SMEM, compute dQ's part for their
64 keys as (dS^T)^T K (SS wgmma, transposed SMEM A operand) next to dV and dK, and add it into
an fp32 accumulator with a TMA reduce-add store; dQ = acc * scale is cast in XLA. 5 products
per score tile; the fp32 additions arrive in any order (dQ's last bits not deterministic).

Edges without masks where possible: rows past Nq read as zeros (TMA out-of-bounds fill) and
carry lse2 = +inf (the padding of the stats array), so their P is exactly 0 and they add
nothing to dK/dV; keys past Nk produce garbage only in their own dK/dV rows, which the TMA
store drops. Only the dQ kernel (and the fused variant, when a key CTA is ragged) masks keys
past Nk: there they would add to real rows, as inf * 0 = NaN if exp2(-lse2) overflows. Rows
that see no key (lse = -inf) get lse2 = +inf: P = 0, dq = 0, no NaN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from longflash_jax.mosaic import (
    CONSUMER_REGS,
    CONSUMERS,
    LOG2E,
    PRODUCER_REGS,
    MosaicTile,
    _cdiv_nonneg,
    _key_tiles,
    stream_kv,
    swizzled,
)
from longflash_jax.problem import Problem


@dataclass(frozen=True)
class MosaicBwdTiles:
    """dkdv: block_k keys per consumer WG, block_q rows per streamed Q/dO tile, stages of
    that ring; dq: block_q rows per consumer WG, block_k keys per streamed K/V tile.
    fused: dQ reduced by the dK/dV kernel (TMA reduce-add into fp32), no dQ kernel; the dq
    tile is then unused."""

    dkdv: MosaicTile
    dq: MosaicTile
    fused: bool = False


def stats_rows(p: Problem, t: MosaicBwdTiles) -> int:
    """Length of the padded (lse2, delta) rows: whole query tiles of both kernels, so that
    every TMA box lies inside the array and its row stride is 16-byte aligned."""
    unit = max(t.dkdv.block_q, CONSUMERS * t.dq.block_q)
    return pl.cdiv(p.Nq, unit) * unit


def preprocess(p: Problem, t: MosaicBwdTiles, do: Any, out: Any, lse: Any) -> Any:
    """(B, Hq, 2, rows): base-2 lse (+inf where no key is seen and on padding rows, so that
    P = exp2(s c - lse2) is exactly 0 there) and delta = rowsum(dO * O) (0 on padding). One
    XLA fusion reading O and dO once."""
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = jnp.swapaxes(delta, 1, 2)  # (B, Hq, Nq)
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    pad = stats_rows(p, t) - p.Nq
    if pad:
        lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, pad)), constant_values=jnp.inf)
        delta = jnp.pad(delta, ((0, 0), (0, 0), (0, pad)))
    return jnp.stack([lse2, delta], axis=2)


def _query_tiles(p: Problem, t: MosaicTile, kw: Any) -> tuple[Any, Any]:
    """(first visible, first fully visible) query tile for the block_k keys from kw; every
    tile from the first to the last is visible."""
    n_qt = pl.cdiv(p.Nq, t.block_q)
    if p.right is None:
        return jnp.int32(0), jnp.int32(0)
    off = p.Nk - p.Nq
    # Key j is seen by rows i >= j - off: the WG's first key bounds the visible tiles, its
    # last key the tiles whose every row sees all of the WG's keys.
    lo = lax.div(lax.max(kw - off, jnp.int32(0)), jnp.int32(t.block_q))
    lo = lax.min(lo, jnp.int32(n_qt))
    full = _cdiv_nonneg(kw + (t.block_k - 1 - off), t.block_q)
    return lo, lax.min(lax.max(full, lo), jnp.int32(n_qt))


def dkdv_call(p: Problem, t: MosaicTile, fused: bool = False) -> Any:
    """A function (q, k, v, do, stats) -> (dk, dv); stats from ``preprocess``. With
    ``fused``, (q, k, v, do, stats) -> (dq_acc, dk, dv): the kernel also reduces each tile's
    dQ part (dS K, unscaled, fp32) into dq_acc by TMA reduce-add, FA3's structure (5
    products per score tile instead of 7, no dQ kernel; order of the fp32 additions, hence
    dQ's last bits, not deterministic)."""
    bq, bk, stages = t.block_q, t.block_k, t.stages
    if fused and bq != 64:
        # dQ's wgmma has the query tile as its M: one warpgroup's 64 rows.
        raise ValueError(f"the fused dQ needs block_q = 64 in the dK/dV kernel, got {bq}")
    d, g = p.Dqk, p.group
    dtype = jnp.dtype(p.dtype)
    c = p.scale * LOG2E
    causal = p.right is not None
    keys_per_cta = CONSUMERS * bk
    n_cta_k = pl.cdiv(p.Nk, keys_per_cta)
    n_qt = pl.cdiv(p.Nq, bq)
    off = p.Nk - p.Nq
    # Fused: keys past Nk (zero-filled K, P^T from exp2(-lse2), possibly inf) would reach real
    # dQ rows as inf * 0 = NaN, so every tile of a problem with ragged key CTAs is masked.
    mask_keys = fused and p.Nk % keys_per_cta != 0
    wgmma_layout = plgpu.Layout.WGMMA
    col_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per query column of S^T

    def kernel(q_ref, k_ref, v_ref, do_ref, st_ref, dk_ref, dv_ref, dq_ref, smem, bars):
        k_smem, v_smem, q_smem, do_smem, st_smem, ds_smem, dq_smem = smem
        k_bar, v_bar, q_bar, do_bar, st_bar, free = bars
        wg = lax.axis_index("wg")
        kt, hk, b = lax.axis_index("k"), lax.axis_index("h"), lax.axis_index("b")
        k0 = kt * keys_per_cta
        lo0, _ = _query_tiles(p, t, k0)
        # The producer streams, per head, every tile the CTA's first warpgroup sees (the most).
        per_head = n_qt - lo0

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGS, action="increase")
            kw = k0 + wg * bk
            k_w, v_w = k_smem.at[wg], v_smem.at[wg]
            # Keys past Nk read as zeros; their dK/dV rows are dropped by the store.
            plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kw, bk), hk], k_w, k_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kw, bk), hk], v_w, v_bar.at[wg])
            lo, full = _query_tiles(p, t, kw)
            if mask_keys:
                full = jnp.int32(n_qt)
            zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), wgmma_layout)
            plgpu.barrier_wait(k_bar.at[wg])
            plgpu.barrier_wait(v_bar.at[wg])

            def wait_slot(slot: Any) -> None:
                plgpu.barrier_wait(q_bar.at[slot])
                plgpu.barrier_wait(do_bar.at[slot])
                plgpu.barrier_wait(st_bar.at[slot])

            def step(hi: Any, masked: bool):
                def body(qt, carry):
                    dk, dv = carry
                    slot = lax.rem(hi * per_head + (qt - lo0), jnp.int32(stages))
                    wait_slot(slot)
                    q_s, do_s = q_smem.at[slot], do_smem.at[slot]

                    def scores(st_acc, dpt_acc):
                        plgpu.wgmma(st_acc, k_w, q_s.transpose((1, 0)))
                        plgpu.wgmma(dpt_acc, v_w, do_s.transpose((1, 0)))
                        return st_acc[...], dpt_acc[...]

                    acc = plgpu.ACC((bk, bq), jnp.float32)
                    st, dpt = pl.run_scoped(scores, acc, acc)
                    lse2 = plgpu.load(st_smem.at[slot, 0], layout=col_layout)
                    delta = plgpu.load(st_smem.at[slot, 1], layout=col_layout)
                    if masked:
                        keys = kw + plgpu.broadcasted_iota(
                            jnp.int32, (bk, bq), 0, layout=wgmma_layout
                        )
                        vis = keys < p.Nk if mask_keys else None
                        if causal:  # key j is seen by rows i >= j - off
                            rows = qt * bq + plgpu.broadcasted_iota(
                                jnp.int32, (bk, bq), 1, layout=wgmma_layout
                            )
                            edge = keys <= rows + off
                            vis = edge if vis is None else jnp.logical_and(vis, edge)
                        st = jnp.where(vis, st, -jnp.inf)
                    pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse2, (bk, bq), [1]))
                    dst = pt * (dpt - lax.broadcast_in_dim(delta, (bk, bq), [1]))
                    if not fused:

                        def grads(refs):
                            dv_acc, dk_acc = refs
                            plgpu.wgmma(dv_acc, pt.astype(dtype), do_s)
                            plgpu.wgmma(dk_acc, dst.astype(dtype), q_s)

                        dv, dk = pl.run_state(grads)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                        plgpu.barrier_arrive(free.at[slot])
                        return dk, dv

                    # dS^T goes through SMEM: the A operand of dK (as is) and of dQ
                    # (transposed), which registers cannot provide.
                    ds_w, dq_w = ds_smem.at[wg], dq_smem.at[wg]
                    ds_w[...] = dst.astype(dtype)
                    plgpu.commit_smem()
                    dq0 = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), wgmma_layout)

                    def grads_fused(refs):
                        dv_acc, dk_acc, dq_acc = refs
                        plgpu.wgmma(dv_acc, pt.astype(dtype), do_s)
                        plgpu.wgmma(dk_acc, ds_w, q_s)
                        plgpu.wgmma(dq_acc, ds_w.transpose((1, 0)), k_w)

                    dv, dk, dq = pl.run_state(grads_fused)(
                        (plgpu.ACC.init(dv), plgpu.ACC.init(dk), plgpu.ACC.init(dq0))
                    )
                    plgpu.barrier_arrive(free.at[slot])
                    h = hk * g + hi
                    # The previous tile's reduce must have read dq_w before it is overwritten.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    dq_w[...] = dq
                    plgpu.commit_smem()
                    # Rows past Nq fall outside dq_acc: TMA drops them.
                    plgpu.copy_smem_to_gmem(
                        dq_w, dq_ref.at[b, pl.ds(qt * bq, bq), h], reduction_op="add"
                    )
                    return dk, dv

                return body

            def skip(hi: Any):
                # Tiles only the other warpgroup sees: wait for them anyway and release.
                # Barrier phases are tracked per thread (a skipped wait would desynchronise
                # them), and the wait keeps this warpgroup from running a ring ahead and
                # completing a slot's 2-arrival "free" phase on its own.
                def body(qt):
                    slot = lax.rem(hi * per_head + (qt - lo0), jnp.int32(stages))
                    wait_slot(slot)
                    plgpu.barrier_arrive(free.at[slot])

                return body

            def over_head(hi, carry):
                if causal:
                    pl.loop(lo0, lo)(skip(hi))
                if causal or mask_keys:
                    carry = lax.fori_loop(lo, full, step(hi, True), carry)
                return lax.fori_loop(full, jnp.int32(n_qt), step(hi, False), carry)

            carry = (zeros, zeros)
            if g == 1:
                carry = over_head(jnp.int32(0), carry)
            else:
                carry = lax.fori_loop(0, g, over_head, carry)
            dk, dv = carry
            k_w[...] = (dk * p.scale).astype(dtype)
            v_w[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_w, dk_ref.at[b, pl.ds(kw, bk), hk], commit_group=False)
            plgpu.copy_smem_to_gmem(v_w, dv_ref.at[b, pl.ds(kw, bk), hk], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == CONSUMERS)
        def _producer():
            plgpu.set_max_registers(PRODUCER_REGS, action="decrease")

            @pl.loop(0, g * per_head)
            def _load(s):
                slot = lax.rem(s, jnp.int32(stages))
                h = hk * g + lax.div(s, per_head)
                r0 = (lo0 + lax.rem(s, per_head)) * bq

                @pl.when(s >= stages)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                rows = (b, pl.ds(r0, bq), h)
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(
                    st_ref.at[b, h, :, pl.ds(r0, bq)], st_smem.at[slot], st_bar.at[slot]
                )

    def entry(q_ref, k_ref, v_ref, do_ref, st_ref, dk_ref, dv_ref, dq_ref=None):
        scratch = [
            plgpu.SMEM((CONSUMERS, bk, d), dtype, transforms=swizzled()),
            plgpu.SMEM((CONSUMERS, bk, d), dtype, transforms=swizzled()),
            plgpu.SMEM((stages, bq, d), dtype, transforms=swizzled()),
            plgpu.SMEM((stages, bq, d), dtype, transforms=swizzled()),
            plgpu.SMEM((stages, 2, bq), jnp.float32),
        ]
        if fused:
            scratch += [
                plgpu.SMEM((CONSUMERS, bk, bq), dtype, transforms=swizzled()),
                plgpu.SMEM((CONSUMERS, bq, d), jnp.float32),
            ]
        bars = (
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        )
        n = len(scratch)

        def scoped(*s):
            smem = tuple(s[:5]) + ((s[5], s[6]) if fused else (None, None))
            refs = (q_ref, k_ref, v_ref, do_ref, st_ref, dk_ref, dv_ref, dq_ref)
            kernel(*refs, smem, s[n:])

        pl.run_scoped(scoped, *scratch, *bars, collective_axes="wg")

    dk_type = jax.ShapeDtypeStruct((p.B, p.Nk, p.Hk, p.Dqk), dtype)
    dv_type = jax.ShapeDtypeStruct((p.B, p.Nk, p.Hk, p.Dv), dtype)
    # Key tiles vary fastest: the CTAs running together stream the same head's Q/dO, which
    # then comes from L2. Causal: the first key tiles see the most queries and start first.
    mesh = dict(
        grid=(n_cta_k, p.Hk, p.B),
        grid_names=("k", "h", "b"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
    )
    params = plgpu.CompilerParams(approx_math=True)
    if not fused:
        return plgpu.kernel(entry, out_type=(dk_type, dv_type), compiler_params=params, **mesh)

    def run(q: Any, k: Any, v: Any, do: Any, st: Any) -> tuple[Any, Any, Any]:
        # plgpu.kernel's outputs start uninitialised and it has no input/output aliasing;
        # the reduce-add target must start at zero, so the kernel runs on state refs.
        def stateful(refs):
            q_r, k_r, v_r, do_r, st_r, dq_r, dk_r, dv_r = refs

            pl.kernel(entry, out_type=(), mesh=plgpu.Mesh(**mesh), compiler_params=params)(
                q_r, k_r, v_r, do_r, st_r, dk_r, dv_r, dq_r
            )

        init = (
            q,
            k,
            v,
            do,
            st,
            jnp.zeros((p.B, p.Nq, p.Hq, p.Dqk), jnp.float32),
            jnp.zeros(dk_type.shape, dtype),
            jnp.zeros(dv_type.shape, dtype),
        )
        outs = pl.run_state(stateful)(init)
        return outs[5], outs[6], outs[7]

    return run


def dq_call(p: Problem, t: MosaicTile) -> Any:
    """A function (q, k, v, do, stats) -> dq; stats from ``preprocess``."""
    bq, bk, stages = t.block_q, t.block_k, t.stages
    d, g = p.Dqk, p.group
    dtype = jnp.dtype(p.dtype)
    c = p.scale * LOG2E
    causal = p.right is not None
    rows_per_cta = CONSUMERS * bq
    n_cta_q = pl.cdiv(p.Nq, rows_per_cta)
    mask_keys = p.Nk % bk != 0
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def kernel(q_ref, k_ref, v_ref, do_ref, st_ref, dq_ref, smem, bars):
        q_smem, do_smem, st_smem, k_smem, v_smem = smem
        q_bar, do_bar, st_bar, k_bar, v_bar, k_free, v_free = bars
        wg = lax.axis_index("wg")
        qt, h, b = lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b")
        if causal:  # the last query tiles see the most keys: launch them first
            qt = (n_cta_q - 1) - qt
        kvh = lax.div(h, jnp.int32(g))
        cta_r0 = qt * rows_per_cta
        n_load, _ = _key_tiles(p, t, cta_r0 + (CONSUMERS - 1) * bq)

        @pl.when(wg < CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(CONSUMER_REGS, action="increase")
            r0 = cta_r0 + wg * bq
            q_s, do_s, st_s = q_smem.at[wg], do_smem.at[wg], st_smem.at[wg]
            rows = (b, pl.ds(r0, bq), h)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_s, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_s, do_bar.at[wg])
            plgpu.copy_gmem_to_smem(st_ref.at[b, h, :, pl.ds(r0, bq)], st_s, st_bar.at[wg])
            n_all, n_full = _key_tiles(p, t, r0)
            plgpu.barrier_wait(q_bar.at[wg])
            plgpu.barrier_wait(do_bar.at[wg])
            plgpu.barrier_wait(st_bar.at[wg])
            lse2 = lax.broadcast_in_dim(plgpu.load(st_s.at[0], layout=row_layout), (bq, bk), [0])
            delta = lax.broadcast_in_dim(plgpu.load(st_s.at[1], layout=row_layout), (bq, bk), [0])

            def step(masked: bool):
                def body(j, dq):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])
                    plgpu.barrier_wait(v_bar.at[slot])
                    k_s = k_smem.at[slot]

                    def scores(s_acc, dp_acc):
                        plgpu.wgmma(s_acc, q_s, k_s.transpose((1, 0)))
                        plgpu.wgmma(dp_acc, do_s, v_smem.at[slot].transpose((1, 0)))
                        return s_acc[...], dp_acc[...]

                    acc = plgpu.ACC((bq, bk), jnp.float32)
                    s, dp = pl.run_scoped(scores, acc, acc)
                    plgpu.barrier_arrive(v_free.at[slot])
                    if masked:
                        cols = j * bk + plgpu.broadcasted_iota(
                            jnp.int32, (bq, bk), 1, layout=wgmma_layout
                        )
                        vis = None
                        if mask_keys:  # keys past Nk would add to real rows here
                            vis = cols < p.Nk
                        if causal:
                            rows_i = r0 + plgpu.broadcasted_iota(
                                jnp.int32, (bq, bk), 0, layout=wgmma_layout
                            )
                            edge = cols <= rows_i + (p.Nk - p.Nq)
                            vis = edge if vis is None else jnp.logical_and(vis, edge)
                        s = jnp.where(vis, s, -jnp.inf)
                    ds = jnp.exp2(s * c - lse2) * (dp - delta)

                    def grad(dq_acc):
                        plgpu.wgmma(dq_acc, ds.astype(dtype), k_s)

                    dq = pl.run_state(grad)(plgpu.ACC.init(dq))
                    plgpu.barrier_arrive(k_free.at[slot])
                    return dq

                return body

            dq = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), wgmma_layout)
            dq = lax.fori_loop(0, n_full, step(False), dq)
            if causal or mask_keys:
                dq = lax.fori_loop(n_full, n_all, step(True), dq)
            if causal:
                # Tiles only the other warpgroup needs: release them, but only once loaded.
                # Arriving without the wait would let this warpgroup run a whole ring ahead
                # and complete a slot's "free" phase with two arrivals of its own while the
                # other warpgroup still reads the slot (the forward's ping-pong rendezvous
                # keeps its warpgroups in step; this kernel has none).
                @pl.loop(n_all, n_load)
                def _drain(j):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])

            q_s[...] = (dq * p.scale).astype(dtype)
            plgpu.commit_smem()
            # Rows past Nq fall outside the tensor: TMA drops them.
            plgpu.copy_smem_to_gmem(q_s, dq_ref.at[rows])
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

    def entry(*refs):
        scratch = (
            plgpu.SMEM((CONSUMERS, bq, d), dtype, transforms=swizzled()),
            plgpu.SMEM((CONSUMERS, bq, d), dtype, transforms=swizzled()),
            plgpu.SMEM((CONSUMERS, 2, bq), jnp.float32),
            plgpu.SMEM((stages, bk, d), dtype, transforms=swizzled()),
            plgpu.SMEM((stages, bk, d), dtype, transforms=swizzled()),
        )
        bars = (
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=CONSUMERS),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        )
        pl.run_scoped(lambda *s: kernel(*refs, s[:5], s[5:]), *scratch, *bars, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((p.B, p.Nq, p.Hq, p.Dqk), dtype),
        # Query tiles vary fastest: the CTAs running together stream one KV head's K/V.
        grid=(n_cta_q, p.Hq, p.B),
        grid_names=("q", "h", "b"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def backward(
    p: Problem, t: MosaicBwdTiles, do: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
) -> tuple[Any, Any, Any]:
    """(dq, dk, dv) of one batched problem routed here by mosaic_route.choose_backward."""
    stats = preprocess(p, t, do, out, lse)
    if t.fused:
        dq_acc, dk, dv = dkdv_call(p, t.dkdv, fused=True)(q, k, v, do, stats)
        return (dq_acc * p.scale).astype(q.dtype), dk, dv
    dq = dq_call(p, t.dq)(q, k, v, do, stats)
    dk, dv = dkdv_call(p, t.dkdv)(q, k, v, do, stats)
    return dq, dk, dv
