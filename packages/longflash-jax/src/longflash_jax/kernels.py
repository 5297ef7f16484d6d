"""Entry points from the Backend object: build the problem, pick tiles, run the kernels.

Each entry point is one jax.jit per (problem, tiles), so an eager call compiles once and an
enclosing jit, grad, vmap or shard_map simply traces through it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from longflash.call import AttentionCall

from longflash_jax import mosaic_route, scores
from longflash_jax.backward import dkdv_call, dq_call
from longflash_jax.forward import forward_call
from longflash_jax.problem import Problem, Tiles, problem_of, tiles_for


def _cu(call: AttentionCall) -> tuple[Any, ...]:
    if call.varlen is None:
        return ()
    return (call.varlen.cu_seqlens_q, call.varlen.cu_seqlens_k)


def forward(
    call: AttentionCall,
    q: Any,
    k: Any,
    v: Any,
    tiles: Tiles | None = None,
    lowering: str | None = None,
) -> tuple[Any, Any]:
    """(out, lse) of one call; ``tiles`` overrides tiles.json's Triton tiles and ``lowering``
    ("triton" or "mosaic") the routing of mosaic_route.choose (benchmarks use both)."""
    p = problem_of(call)
    if p.empty:
        lead = q.shape[:-2]
        out = jnp.zeros((*lead, p.Hq, p.Dv), q.dtype)
        lse_shape = (p.Hq, p.Tq) if p.varlen else (p.B, p.Hq, p.Nq)
        return out, jnp.full(lse_shape, -jnp.inf, jnp.float32)
    if lowering is None:
        lowering = "triton" if tiles is not None else mosaic_route.choose(p)[0]
    if lowering == "mosaic":
        # Imported here: the Mosaic GPU API is never needed on a CPU or with an older jax.
        from longflash_jax import mosaic

        tile = mosaic.MosaicTile(**mosaic_route.mosaic_tile(p))
        return mosaic.forward(p, tile, q, k, v)
    return _forward(p, tiles_for(p, tiles), *_cu(call), q, k, v)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(p: Problem, t: Tiles, *arrays: Any) -> tuple[Any, Any]:
    return forward_call(p, t.fwd, like=arrays[-3:])(*arrays)


def backward(
    call: AttentionCall,
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    tiles: Tiles | None = None,
    lowering: str | None = None,
) -> tuple[Any, Any, Any]:
    """(dq, dk, dv) of one call; ``tiles`` overrides tiles.json's Triton tiles and
    ``lowering`` ("triton" or "mosaic") the routing of mosaic_route.choose_backward."""
    p = problem_of(call)
    if p.empty:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    if lowering is None:
        lowering = "triton" if tiles is not None else mosaic_route.choose_backward(p)[0]
    if lowering == "mosaic":
        # Imported here: the Mosaic GPU API is never needed on a CPU or with an older jax.
        from longflash_jax import mosaic_bwd

        t = mosaic_route.mosaic_bwd_tiles(p)
        mt = mosaic_bwd.MosaicBwdTiles(
            dkdv=mosaic_bwd.MosaicTile(**t["dkdv"]),
            dq=mosaic_bwd.MosaicTile(**t["dq"]),
            fused=bool(t.get("fused", False)),
        )
        return mosaic_bwd.backward(p, mt, dout, q, k, v, out, lse)
    return _backward(p, tiles_for(p, tiles), *_cu(call), dout, q, k, v, out, lse)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _backward(p: Problem, t: Tiles, *arrays: Any) -> tuple[Any, Any, Any]:
    cu, (do, q, k, v, out, lse) = arrays[: 2 * p.varlen], arrays[2 * p.varlen :]
    # delta_i = rowsum(dO * O): the softmax-Jacobian term of every dS row, computed once
    # here (one read of O and dO) instead of in each of the two kernels.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = jnp.moveaxis(delta, -1, -2)  # (B, Hq, Nq) or (Hq, Tq), like lse
    # Base-2 lse; +inf on rows that see no key, so that their P = exp2(t - inf) = 0.
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * scores.LOG2E)
    like = (do, q, k, v, out, lse)
    dq = dq_call(p, t.dq, like)(*cu, q, k, v, do, lse2, delta)

    g = p.group
    if p.varlen:
        qg = q.reshape(p.Tq, p.Hk, g, p.Dqk)
        dog = do.reshape(p.Tq, p.Hk, g, p.Dv)
        lse2g, deltag = lse2.reshape(p.Hk, g, p.Tq), delta.reshape(p.Hk, g, p.Tq)
    else:
        qg = q.reshape(p.B, p.Nq, p.Hk, g, p.Dqk)
        dog = do.reshape(p.B, p.Nq, p.Hk, g, p.Dv)
        lse2g, deltag = lse2.reshape(p.B, p.Hk, g, p.Nq), delta.reshape(p.B, p.Hk, g, p.Nq)
    dk, dv = dkdv_call(p, t.dkdv, like)(*cu, qg, k, v, dog, lse2g, deltag)
    return dq, dk, dv
