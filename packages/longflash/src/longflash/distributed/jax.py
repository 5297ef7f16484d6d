"""Sequence parallelism in JAX: collectives over a shard_map mesh axis.

Ring: a Python loop over the P steps (fewer when a window leaves every rank's last steps
empty: schedule.ring_steps), unrolled at trace time. Each step issues the
``ppermute`` of the next K/V shard before the current step's blocks, with no data
dependence between the two, so XLA's latency-hiding scheduler can run the transfer under
the compute (``--xla_gpu_enable_latency_hiding_scheduler=true`` on GPUs). The program is
the same on every device (SPMD), so where the step's blocks depend on the rank, a
``lax.switch`` on the axis index picks the rank's variant. The forward and backward form a
``custom_vjp``; the backward sends fp32 dK/dV partial sums around a second ring.

Ulysses: ``lax.all_to_all`` from sequence shards to head shards and back, around the
ordinary ``longflash.attention`` (whose own custom_vjp gives the gradients).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from longflash.call import AttentionCall, Window
from longflash.distributed.schedule import (
    Block,
    check_layout,
    chunks_per_rank,
    lse_slots,
    n_slots,
    ring_steps,
    step_blocks,
)
from longflash.frontends.jax import make_call
from longflash.registry import REGISTRY, get_backend

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class RingConfig:
    """The static part of a ring call (hashable: it is a custom_vjp nondiff argument)."""

    call: AttentionCall  # the local shards' call, mask-free; blocks set Nq/Nk and the mask
    backend: str
    axis_name: Any
    world_size: int
    layout: str
    causal: bool
    window: Window | None = None  # over the global sequence, causal folded in

    def variants(self, step: int) -> tuple[tuple[tuple[Block, ...], ...], tuple[int, ...]]:
        """The distinct block lists of this step over all ranks, and each rank's index."""
        plans = [
            step_blocks(
                r, step, self.world_size, self.layout, self.causal, self.call.Nq, self.window
            )
            for r in range(self.world_size)
        ]
        distinct = tuple(dict.fromkeys(plans))
        return distinct, tuple(distinct.index(p) for p in plans)

    def slots(self, step: int) -> int:
        """Rows of lse this step keeps per token: the most any rank's blocks need (every
        lax.switch branch returns the same shape)."""
        return max(n_slots(blocks) for blocks in self.variants(step)[0])

    def block_call(self, blk: Block) -> AttentionCall:
        return self.call.replace(Nq=blk.nq, Nk=blk.nk, causal=blk.causal, window=blk.window)

    @property
    def steps(self) -> int:
        """Steps the ring runs (P, or fewer when a window leaves the last ones empty)."""
        return ring_steps(self.world_size, self.layout, self.causal, self.call.Nq, self.window)

    def ring(self, x: jax.Array, distance: int = 1) -> jax.Array:
        """Send x to the device ``distance`` further along the axis, receive the one
        from as far back (distance 1: the next device)."""
        perm = [(i, (i + distance) % self.world_size) for i in range(self.world_size)]
        return lax.ppermute(x, self.axis_name, perm)


def _acc_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _rank_switch(cfg: RingConfig, step: int, branch, operands: tuple) -> tuple:
    """Run ``branch(blocks, *operands)`` with this rank's blocks of ``step``."""
    distinct, index = cfg.variants(step)
    if len(distinct) == 1:
        return branch(distinct[0], *operands)
    # A chain of selects on scalar literals, not a lookup in a constant table: array constants
    # become inputs of the manual computation, and XLA's GPU compiler (Shardy's unused-inputs
    # canonicalisation, jax 0.11) crashed on the backward's constant inputs.
    rank = lax.axis_index(cfg.axis_name)
    which = functools.reduce(
        lambda acc, ri: jnp.where(rank == ri[0], ri[1], acc), enumerate(index), jnp.int32(0)
    )
    return lax.switch(which, [functools.partial(branch, blocks) for blocks in distinct], *operands)


def _merge(out, lse, o, lo, q0: int, q1: int):
    """Fold one block's (o, lo) into the accumulators for rows [q0, q1).

    Max-shifted: both weights are <= 1 and the larger is exactly 1; rows that have seen
    nothing on either side (lse = -inf) keep out = 0, lse = -inf, never NaN.
    """
    la, oa = lse[:, :, q0:q1], out[:, q0:q1]
    lo = lo.astype(la.dtype)
    m = jnp.maximum(la, lo)
    m = jnp.where(m == _NEG_INF, 0.0, m)
    wa, wb = jnp.exp(la - m), jnp.exp(lo - m)
    total = wa + wb
    new_lse = m + jnp.log(total)
    total = jnp.where(total == 0, 1.0, total)
    wa = jnp.swapaxes(wa / total, 1, 2)[..., None]
    wb = jnp.swapaxes(wb / total, 1, 2)[..., None]
    new_out = oa * wa + o.astype(oa.dtype) * wb
    if q0 == 0 and q1 == out.shape[1]:
        return new_out, new_lse
    return _put(out, 1, q0, new_out), _put(lse, 2, q0, new_lse)


def _put(x, axis: int, start: int, update, add: bool = False):
    """``x`` with ``update`` written (or added) at ``start`` along ``axis``. A static
    dynamic_update_slice rather than ``x.at[...]``, whose scatter takes its (constant)
    indices as an array: see ``_rank_switch``."""
    if add:
        stop = start + update.shape[axis]
        update = lax.slice_in_dim(x, start, stop, axis=axis) + update.astype(x.dtype)
    starts = [0] * x.ndim
    starts[axis] = start
    return lax.dynamic_update_slice(x, update.astype(x.dtype), starts)


def _forward_step(cfg: RingConfig, blocks: tuple[Block, ...], out, lse, lse_s, q, kc, vc):
    for blk, slot in zip(blocks, lse_slots(blocks)):
        call = cfg.block_call(blk)
        impl = REGISTRY.select(call, cfg.backend)
        o, lo = impl.forward(
            call, q[:, blk.q0 : blk.q1], kc[:, blk.k0 : blk.k1], vc[:, blk.k0 : blk.k1]
        )
        lse_s = _put(lse_s, 0, slot, _put(lse_s[slot], 2, blk.q0, lo)[None])
        out, lse = _merge(out, lse, o, lo, blk.q0, blk.q1)
    return out, lse, lse_s


def _block_dout(dout, lse_blk, lse):
    """dout scaled per row by exp(lse_blk - lse), the share of the row's softmax mass
    that the block holds (0 where the row sees nothing)."""
    w = jnp.exp(lse_blk - jnp.where(lse == _NEG_INF, 0.0, lse))
    return (dout.astype(w.dtype) * jnp.swapaxes(w, 1, 2)[..., None]).astype(dout.dtype)


def _backward_step(
    cfg: RingConfig, blocks: tuple[Block, ...], dq, dk, dv, dout, q, kc, vc, out, lse, lse_s
):
    for blk, slot in zip(blocks, lse_slots(blocks)):
        call = cfg.block_call(blk)
        impl = REGISTRY.select(call, cfg.backend)
        rows = slice(blk.q0, blk.q1)
        keys = slice(blk.k0, blk.k1)
        lse_blk = lse_s[slot, :, :, rows]
        dq_b, dk_b, dv_b = impl.backward(
            call,
            _block_dout(dout[:, rows], lse_blk, lse[:, :, rows]),
            q[:, rows],
            kc[:, keys],
            vc[:, keys],
            out[:, rows],
            lse_blk.astype(jnp.float32),
        )
        dq = _put(dq, 1, blk.q0, dq_b, add=True)
        dk = _put(dk, 1, blk.k0, dk_b, add=True)
        dv = _put(dv, 1, blk.k0, dv_b, add=True)
    return dq, dk, dv


def _ring_forward(cfg: RingConfig, q, k, v):
    """(out in q's dtype, lse in the accumulation dtype, per-step block lse, each
    (slots, B, Hq, n) with a slot per block as ``lse_slots`` assigns them)."""
    acc = _acc_dtype(q.dtype)
    b, n, hq, _ = q.shape
    # *_like keeps q's varying-axes type, which every switch branch must return.
    out = jnp.zeros_like(q, dtype=acc, shape=(b, n, hq, v.shape[-1]))
    lse = jnp.full_like(q, _NEG_INF, dtype=acc, shape=(b, hq, n))
    step_lse = []
    kc, vc = k, v
    steps = cfg.steps
    for s in range(steps):
        if s + 1 < steps:
            kn, vn = cfg.ring(kc), cfg.ring(vc)  # in flight during this step's blocks
        out, lse, lse_s = _rank_switch(
            cfg,
            s,
            functools.partial(_forward_step, cfg),
            (out, lse, jnp.full_like(lse, _NEG_INF, shape=(cfg.slots(s), *lse.shape)), q, kc, vc),
        )
        step_lse.append(lse_s)
        if s + 1 < steps:
            kc, vc = kn, vn
    return out.astype(q.dtype), lse, tuple(step_lse)


def _ring_backward(cfg: RingConfig, dout, q, k, v, out, lse, step_lse):
    """Each block's backward runs against its own softmax (its lse from the forward)
    with dout scaled by exp(lse_blk - lse): exactly its share of the full gradients,
    whether the backend uses the lse it is given or recomputes the block's own (see
    longflash.distributed.torch.ring_backward)."""
    acc = _acc_dtype(q.dtype)
    dq = jnp.zeros_like(q, dtype=acc)
    kc, vc = k, v
    incoming = None
    steps = cfg.steps
    for s in range(steps):
        if s + 1 < steps:
            kn, vn = cfg.ring(kc), cfg.ring(vc)
        dk = jnp.zeros_like(k, dtype=acc)
        dv = jnp.zeros_like(v, dtype=acc)
        # The partial sums from earlier ranks are added after the step, not passed in:
        # a conditional waits for all its operands, which would expose their transfer.
        dq, dk, dv = _rank_switch(
            cfg,
            s,
            functools.partial(_backward_step, cfg),
            (dq, dk, dv, dout, q, kc, vc, out, lse, step_lse[s]),
        )
        if incoming is not None:
            dk, dv = dk + incoming[0], dv + incoming[1]
            incoming = None
        # On to the next holder; after the last step, home to the owner (rank - s):
        # one hop of distance 1 when the ring ran all P steps.
        distance = 1 if s + 1 < steps else -s
        if distance % cfg.world_size:
            incoming = (cfg.ring(dk, distance), cfg.ring(dv, distance))
        if s + 1 < steps:
            kc, vc = kn, vn
    if incoming is not None:
        dk, dv = incoming
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: RingConfig, q, k, v):
    out, lse, _ = _ring_forward(cfg, q, k, v)
    return out, lse.astype(jnp.float32)


def _ring_fwd(cfg: RingConfig, q, k, v):
    out, lse, step_lse = _ring_forward(cfg, q, k, v)
    return (out, lse.astype(jnp.float32)), (q, k, v, out, lse, step_lse)


def _ring_bwd(cfg: RingConfig, res, cotangents):
    q, k, v, out, lse, step_lse = res
    dout, _ = cotangents  # lse is not differentiable, as in longflash.attention
    return _ring_backward(cfg, dout.astype(out.dtype), q, k, v, out, lse, step_lse)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q, k, v, *, axis_name, causal, scale, window, softcap, layout, return_lse, backend
):
    check_layout(layout)
    # Validates the mask too; the blocks carry their own, so the base call has none.
    call = make_call(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap)
    if call.Nq != call.Nk:
        raise ValueError(
            f"ring_attention needs q and k/v shards of one sequence, of equal length; got "
            f"q {call.Nq} and k/v {call.Nk} tokens"
        )
    per = chunks_per_rank(layout)
    if call.Nq % per:
        raise ValueError(
            f"layout {layout!r} needs a local sequence length divisible by {per} (the "
            f"shard is chunks r and 2P-1-r); got {call.Nq}"
        )
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    cfg = RingConfig(
        call=call.replace(varlen=None, causal=False, window=None),
        backend=backend if backend is not None else get_backend(),
        axis_name=axis_name,
        world_size=_axis_size(axis_name),
        layout=layout,
        causal=causal,
        window=call.window,  # validated, causal folded in
    )
    out, lse = _ring(cfg, q, k, v)
    return (out, lax.stop_gradient(lse)) if return_lse else out


def _axis_size(axis_name: Any) -> int:
    try:
        return int(lax.axis_size(axis_name))
    except NameError as exc:
        raise ValueError(
            f"axis_name {axis_name!r} is not a mesh axis here: call sequence-parallel "
            "attention inside jax.shard_map over a mesh with that axis"
        ) from exc


def ulysses_attention(q, k, v, *, axis_name, causal, scale, window, softcap, return_lse, backend):
    from longflash.api import attention

    make_call(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap)
    world_size = _axis_size(axis_name)
    hq, hk = q.shape[2], k.shape[2]
    if hq % world_size or hk % world_size:
        raise ValueError(
            f"ulysses_attention splits heads over the {world_size} devices of axis "
            f"{axis_name!r}, so q heads ({hq}) and k/v heads ({hk}) must both be divisible "
            f"by {world_size}; use ring_attention instead"
        )

    def exchange(x, split, concat):
        return lax.all_to_all(x, axis_name, split, concat, tiled=True)

    # sequence shards -> head shards of the whole sequence (contiguous layout)
    qh, kh, vh = (exchange(x, 2, 1) for x in (q, k, v))
    out, lse = attention(
        qh,
        kh,
        vh,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
        return_lse=True,
        backend=backend,
    )
    out = exchange(out, 1, 2)
    if not return_lse:
        return out
    return out, lax.stop_gradient(exchange(lse, 2, 1))
