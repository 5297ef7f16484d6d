"""The Mosaic GPU forward and backward, lowered for "cuda" without a GPU (jax >= 0.11 only).

Lowering a Mosaic GPU kernel on any machine runs Pallas' tracing, Mosaic's layout inference
and the lowering of its dialect to the GPU-level module in Python (for sm_90 when no GPU is
visible); only the last passes to PTX run later, inside XLA's compiler on a GPU. So this
catches wrong shapes, layouts, transforms, TMA slices and shared memory beyond the sm_90
limit of every routed shape class, not deadlocks or numerics (benchmarks/pallas_mosaic.py
checks those on the H200). The Pallas GPU interpreter cannot run these kernels: it has no
rule for run_state and takes wgmma operands from shared memory only, while P, P^T and dS^T
come from registers here. What the CPU can check of the backward's numerics is its tile
schedule: ``test_backward_schedule_*`` replays, in float64 NumPy, exactly the tiles the
kernels visit (their own range helpers), masked where they mask, with the padded (lse2,
delta) rows of ``mosaic_bwd.preprocess``, and compares with the float64 oracle.

CI's jax 0.10.2 skips the module (the kernel is written for the 0.11 API; 0.10's Mosaic GPU
also needs absl).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from longflash.call import AttentionCall, normalize_window
from longflash_jax import mosaic_route
from longflash_jax.problem import problem_of

if mosaic_route._version_tuple(__import__("jax").__version__) < mosaic_route.MOSAIC_MIN_JAX:
    pytest.skip("the Mosaic GPU kernel needs jax >= 0.11", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from longflash.testing.oracle import attention_oracle  # noqa: E402
from longflash.testing.tolerances import compare, errors  # noqa: E402
from longflash_jax import mosaic, mosaic_bwd  # noqa: E402

CALL = re.compile(r"custom_call @(mosaic_gpu\w*)\(")


def _problem(B=1, N=512, Nk=None, Hq=4, Hk=4, D=128, causal=False, dtype="bfloat16", bwd=False):
    call = AttentionCall(
        "jax",
        "cuda",
        dtype,
        B,
        N,
        Nk or N,
        Hq,
        Hk,
        D,
        D,
        causal,
        D**-0.5,
        normalize_window(causal, None),
    )
    p = problem_of(call)
    reasons = (mosaic_route.mosaic_bwd_reasons if bwd else mosaic_route.mosaic_reasons)(p)
    assert reasons == [], reasons
    return p


CASES = {
    "hd128-full": dict(),
    "hd128-causal-gqa": dict(causal=True, Hq=8, Hk=2, B=2),
    "ragged-causal": dict(N=1000, Nk=1304, causal=True, Hq=4, Hk=1),
    "ragged-more-queries": dict(N=1304, Nk=1000, causal=True),
    "ragged-full": dict(N=1000, Nk=1000, B=2),
    "hd64-causal": dict(D=64, causal=True),
    "hd256-full-fp16": dict(D=256, dtype="float16"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mosaic_forward_lowers_for_cuda(name):
    p = _problem(**CASES[name])
    tile = mosaic.MosaicTile(**mosaic_route.mosaic_tile(p))
    dt = jnp.dtype(p.dtype)
    sd = jax.ShapeDtypeStruct
    args = (
        sd((p.B, p.Nq, p.Hq, p.Dqk), dt),
        sd((p.B, p.Nk, p.Hk, p.Dqk), dt),
        sd((p.B, p.Nk, p.Hk, p.Dv), dt),
    )
    f = jax.jit(lambda q, k, v: mosaic.forward(p, tile, q, k, v))
    lowered = f.trace(*args).lower(lowering_platforms=("cuda",))
    out, lse = lowered.out_info
    assert out.shape == (p.B, p.Nq, p.Hq, p.Dv) and out.dtype == dt
    assert lse.shape == (p.B, p.Hq, p.Nq) and lse.dtype == jnp.float32
    assert len(CALL.findall(lowered.as_text())) == 1


def test_lengths_off_the_row_tile_do_not_lower():
    """Why mosaic_route declines N % 8 != 0: the (8, 64) TMA tiling refuses it."""
    call = AttentionCall("jax", "cuda", "bfloat16", 1, 300, 300, 2, 2, 128, 128, False, 0.1)
    p = problem_of(call)
    assert any("multiples of 8" in r for r in mosaic_route.mosaic_reasons(p))
    sd = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
    f = jax.jit(lambda q, k, v: mosaic.forward(p, mosaic.MosaicTile(64, 128, 2), q, k, v))
    with pytest.raises(ValueError, match="multiple of its tiling 8"):
        f.trace(sd, sd, sd).lower(lowering_platforms=("cuda",))


# Every class the backward router accepts: hd 64/128 x causal/full, GQA/MQA, Nq != Nk both
# ways (rows without keys), lengths off the tiles, fp16.
BWD_CASES = {
    "hd128-full": dict(),
    "hd128-causal": dict(causal=True),
    "hd128-causal-gqa": dict(causal=True, Hq=8, Hk=2, B=2),
    "hd128-full-mqa": dict(Hq=4, Hk=1),
    "ragged-causal": dict(N=1000, Nk=1304, causal=True, Hq=4, Hk=1),
    "ragged-more-queries": dict(N=1304, Nk=1000, causal=True),
    "ragged-full": dict(N=1000, Nk=1000, B=2),
    "hd64-causal": dict(D=64, causal=True),
    "hd64-full-gqa-fp16": dict(D=64, N=1000, Nk=1304, Hq=6, Hk=3, dtype="float16"),
}


def _bwd_tiles(p):
    t = mosaic_route.mosaic_bwd_tiles(p)
    return mosaic_bwd.MosaicBwdTiles(
        dkdv=mosaic.MosaicTile(**t["dkdv"]),
        dq=mosaic.MosaicTile(**t["dq"]),
        fused=t.get("fused", False),
    )


def _bwd_args(p):
    dt = jnp.dtype(p.dtype)
    sd = jax.ShapeDtypeStruct
    return (
        sd((p.B, p.Nq, p.Hq, p.Dv), dt),  # dout
        sd((p.B, p.Nq, p.Hq, p.Dqk), dt),
        sd((p.B, p.Nk, p.Hk, p.Dqk), dt),
        sd((p.B, p.Nk, p.Hk, p.Dv), dt),
        sd((p.B, p.Nq, p.Hq, p.Dv), dt),  # out
        sd((p.B, p.Hq, p.Nq), jnp.float32),  # lse
    )


@pytest.mark.parametrize("fused", [False, True], ids=["dq-kernel", "fused-dq"])
@pytest.mark.parametrize("name", sorted(BWD_CASES))
def test_mosaic_backward_lowers_for_cuda(name, fused):
    """Both backward kernels (dQ; dK/dV) of tiles.json's tiles lower, i.e. also fit the
    227 KiB of shared memory that Mosaic checks at lowering time; so does the variant with
    dQ fused into the dK/dV kernel (one kernel, fp32 TMA reduce-add)."""
    p = _problem(bwd=True, **BWD_CASES[name])
    t = dataclasses.replace(_bwd_tiles(p), fused=fused)
    f = jax.jit(lambda *a: mosaic_bwd.backward(p, t, *a))
    lowered = f.trace(*_bwd_args(p)).lower(lowering_platforms=("cuda",))
    dq, dk, dv = lowered.out_info
    dt = jnp.dtype(p.dtype)
    assert dq.shape == (p.B, p.Nq, p.Hq, p.Dqk) and dq.dtype == dt
    assert dk.shape == (p.B, p.Nk, p.Hk, p.Dqk) and dk.dtype == dt
    assert dv.shape == (p.B, p.Nk, p.Hk, p.Dv) and dv.dtype == dt
    assert len(CALL.findall(lowered.as_text())) == (1 if fused else 2)


def test_backward_shared_memory_limit_is_enforced_at_lowering():
    """What makes the test above a shared-memory check: a ring too deep for 227 KiB fails."""
    p = _problem(bwd=True)
    deep = mosaic_bwd.MosaicBwdTiles(mosaic.MosaicTile(64, 64, 8), mosaic.MosaicTile(64, 64, 2))
    f = jax.jit(lambda *a: mosaic_bwd.backward(p, deep, *a))
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        f.trace(*_bwd_args(p)).lower(lowering_platforms=("cuda",))


def test_backward_lengths_off_the_row_tile_do_not_lower():
    call = AttentionCall("jax", "cuda", "bfloat16", 1, 300, 300, 2, 2, 128, 128, False, 0.1)
    p = problem_of(call)
    assert any("multiples of 8" in r for r in mosaic_route.mosaic_bwd_reasons(p))
    t = mosaic_bwd.MosaicBwdTiles(mosaic.MosaicTile(64, 64, 2), mosaic.MosaicTile(64, 64, 2))
    f = jax.jit(lambda *a: mosaic_bwd.backward(p, t, *a))
    with pytest.raises(ValueError, match="multiple of its tiling 8"):
        f.trace(*_bwd_args(p)).lower(lowering_platforms=("cuda",))


# -- the backward's tile schedule, replayed in float64 -----------------------------------


def _rows(x, start, n):
    """x[start:start + n] with rows past the end read as zeros (TMA out-of-bounds fill)."""
    tile = np.zeros((n,) + x.shape[1:], x.dtype)
    part = x[start : start + n]
    tile[: len(part)] = part
    return tile


def _visible(p, rows, keys):
    """Real query rows x real keys that see each other (DESIGN §2, causal or none)."""
    i, j = rows[:, None], keys[None, :]
    vis = (i < p.Nq) & (j < p.Nk)
    if p.right is not None:
        vis &= j <= i + (p.Nk - p.Nq)
    return vis


def _replay(p, t, q, k, v, do, stats):
    """dq, dk, dv computed over exactly the tiles the kernels visit, masked exactly where
    they mask; asserts that the tiles they run unmasked need no mask and that the tiles
    they skip hold nothing visible. With t.fused, dq comes from the dK/dV kernel's tiles
    (dS^T transposed times K, reduced over key CTAs) instead of the dQ kernel."""
    g, c, off = p.group, p.scale * mosaic.LOG2E, p.Nk - p.Nq
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    kt_, qt_ = t.dkdv, t.dq
    n_qt = -(-p.Nq // kt_.block_q)
    # as in dkdv_call: fused and ragged key CTAs -> every tile masked, keys past Nk included
    mask_keys = t.fused and p.Nk % (2 * kt_.block_k) != 0
    dq_rows = -(-p.Nq // kt_.block_q) * kt_.block_q
    dq_acc = np.zeros((p.B, dq_rows, p.Hq, p.Dqk))
    for b in range(p.B):
        for hk in range(p.Hk):
            for k0 in range(0, p.Nk, 2 * kt_.block_k):
                lo0 = int(mosaic_bwd._query_tiles(p, kt_, jnp.int32(k0))[0])
                for kw in (k0, k0 + kt_.block_k):
                    lo, full = (int(x) for x in mosaic_bwd._query_tiles(p, kt_, jnp.int32(kw)))
                    full = n_qt if mask_keys else full
                    keys = kw + np.arange(kt_.block_k)
                    kk, vv = (
                        _rows(k[b, :, hk], kw, kt_.block_k),
                        _rows(v[b, :, hk], kw, kt_.block_k),
                    )
                    gk, gv = np.zeros(kk.shape), np.zeros(vv.shape)
                    for h in range(hk * g, hk * g + g):
                        for qt in range(0, n_qt):
                            i0 = qt * kt_.block_q
                            rows = i0 + np.arange(kt_.block_q)
                            vis = _visible(p, rows, keys).T
                            if qt < lo0 or qt < lo:  # skipped (never loaded, or released)
                                assert not vis.any(), (b, hk, kw, qt)
                                continue
                            masked = qt < full
                            st_tile = stats[b, h, :, i0 : i0 + kt_.block_q]
                            assert st_tile.shape[-1] == kt_.block_q  # padded: a whole box
                            qq = _rows(q[b, :, h], i0, kt_.block_q)
                            dd = _rows(do[b, :, h], i0, kt_.block_q)
                            s_t = kk @ qq.T
                            if masked:
                                ok = np.ones_like(s_t, bool)
                                if mask_keys:
                                    ok &= keys[:, None] < p.Nk
                                if p.right is not None:
                                    ok &= keys[:, None] <= rows[None, :] + off
                                s_t = np.where(ok, s_t, -np.inf)
                            else:  # every real key of the tile sees every real row
                                assert vis[keys < p.Nk][:, rows < p.Nq].all(), (kw, qt)
                            p_t = np.exp2(s_t * c - st_tile[0][None, :])
                            ds_t = p_t * (vv @ dd.T - st_tile[1][None, :])
                            gv += p_t @ dd
                            gk += ds_t @ qq
                            dq_acc[b, i0 : i0 + kt_.block_q, h] += ds_t.T @ kk
                    n = min(kt_.block_k, p.Nk - kw)
                    if n > 0:  # the TMA store drops rows past Nk
                        dk[b, kw : kw + n, hk] = gk[:n] * p.scale
                        dv[b, kw : kw + n, hk] = gv[:n]
        for h in range(p.Hq):
            hk = h // g
            for r0 in range(0, p.Nq, qt_.block_q):  # each warpgroup's rows
                n_all, n_full = (int(x) for x in mosaic._key_tiles(p, qt_, jnp.int32(r0)))
                rows = r0 + np.arange(qt_.block_q)
                qq, dd = _rows(q[b, :, h], r0, qt_.block_q), _rows(do[b, :, h], r0, qt_.block_q)
                st_tile = stats[b, h, :, r0 : r0 + qt_.block_q]
                assert st_tile.shape[-1] == qt_.block_q
                acc = np.zeros(qq.shape)
                for j in range(-(-p.Nk // qt_.block_k)):
                    keys = j * qt_.block_k + np.arange(qt_.block_k)
                    vis = _visible(p, rows, keys)
                    if j >= n_all:
                        assert not vis.any(), (h, r0, j)
                        continue
                    kk = _rows(k[b, :, hk], j * qt_.block_k, qt_.block_k)
                    vv = _rows(v[b, :, hk], j * qt_.block_k, qt_.block_k)
                    s = qq @ kk.T
                    if j >= n_full:
                        ok = (keys[None, :] < p.Nk) & np.ones_like(s, bool)
                        if p.right is not None:
                            ok &= keys[None, :] <= rows[:, None] + off
                        s = np.where(ok, s, -np.inf)
                    else:
                        assert (keys < p.Nk).all() and vis[rows < p.Nq].all(), (h, r0, j)
                    pr = np.exp2(s * c - st_tile[0][:, None])
                    acc += (pr * (dd @ vv.T - st_tile[1][:, None])) @ kk
                n = min(qt_.block_q, p.Nq - r0)
                dq[b, r0 : r0 + n, h] = acc[:n] * p.scale
    if t.fused:  # the reduce-add target has Nq rows: TMA drops the rest
        dq = dq_acc[:, : p.Nq] * p.scale
    return dq, dk, dv


SCHEDULE_CASES = {
    "full": dict(N=104, Hq=2, Hk=2),
    "causal-gqa": dict(N=104, Hq=4, Hk=2, causal=True),
    "causal-fewer-queries": dict(N=72, Nk=136, Hq=3, Hk=1, causal=True),
    "causal-rows-without-keys": dict(N=136, Nk=72, Hq=2, Hk=1, causal=True),
    "full-ragged-mqa": dict(N=88, Nk=120, Hq=2, Hk=1, B=2),
}
# Small tiles so that short sequences span many; block_q != block_k in both kernels.
SCHEDULE_TILES = mosaic_bwd.MosaicBwdTiles(
    dkdv=mosaic.MosaicTile(block_q=16, block_k=8, stages=2),
    dq=mosaic.MosaicTile(block_q=8, block_k=16, stages=2),
)


@pytest.mark.parametrize("fused", [False, True], ids=["dq-kernel", "fused-dq"])
@pytest.mark.parametrize("name", sorted(SCHEDULE_CASES))
def test_backward_schedule_matches_the_oracle(name, fused):
    kw = dict(B=1, Nk=None, D=16, causal=False) | SCHEDULE_CASES[name]
    call = AttentionCall(
        "jax", "cuda", "float32", kw["B"], kw["N"], kw["Nk"] or kw["N"], kw["Hq"], kw["Hk"],
        kw["D"], kw["D"], kw["causal"], 0.3, normalize_window(kw["causal"], None),
    )  # fmt: skip
    p = problem_of(call)
    rng = np.random.default_rng(7)
    q = rng.standard_normal((p.B, p.Nq, p.Hq, p.Dqk))
    k = rng.standard_normal((p.B, p.Nk, p.Hk, p.Dqk))
    v = rng.standard_normal((p.B, p.Nk, p.Hk, p.Dv))
    do = rng.standard_normal((p.B, p.Nq, p.Hq, p.Dv))
    ref = attention_oracle(q, k, v, do, causal=kw["causal"], scale=p.scale)
    tiles = dataclasses.replace(SCHEDULE_TILES, fused=fused)
    stats = np.asarray(
        mosaic_bwd.preprocess(p, tiles, jnp.asarray(do), jnp.asarray(ref.out), ref.lse),
        np.float64,
    )
    assert stats.shape[-1] == mosaic_bwd.stats_rows(p, tiles)
    with np.errstate(over="ignore", invalid="ignore"):  # garbage rows past Nk, dropped
        dq, dk, dv = _replay(p, tiles, q, k, v, do, stats)
    got = {"out": ref.out, "lse": ref.lse, "dq": dq, "dk": dk, "dv": dv}
    assert compare(got, ref, "float32") == []
    # lse2 and delta pass through float32 (as in the kernels); everything else is float64.
    worst = max(errors(got, ref)[n] for n in ("dq", "dk", "dv"))
    assert worst < 2e-5, errors(got, ref)
