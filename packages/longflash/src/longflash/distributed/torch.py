"""Sequence parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs).

Ring: K/V shards travel to rank+1 each step while the current step's blocks are computed.
The next transfer is posted (batch_isend_irecv into a spare buffer pair) before the
current compute and waited on after it; waiting only orders streams on NCCL, so the loop
never synchronises the host. Each block's (out, lse) merges into an fp32 accumulator
through the lse. The backward recomputes each block from its own lse with dout rescaled
to the block's share of the row (see ring_backward), keeps dQ at home and sends the fp32
dK/dV partial sums around a second ring, so that after P hops each rank holds the
gradient of its own K/V. Under a window that leaves every rank's last steps empty, both
rings stop early and the dK/dV sums go home in one hop (schedule.ring_steps).

Ulysses: all-to-all from sequence shards to head shards, full attention on P times fewer
heads, all-to-all back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

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
from longflash.frontends.torch import make_call
from longflash.registry import REGISTRY, get_backend

# A hook the benchmark uses to time the steps: called with the step index before each
# step and with P after the last one.
StepMark = Callable[[int], None]


# -- communication ------------------------------------------------------------------------
class _Pending:
    """Posted sends and receives; ``wait`` returns the received tensors."""

    def __init__(
        self, works: list[Any], recv: Sequence[torch.Tensor], send: Sequence[torch.Tensor]
    ):
        self._works = works
        self._recv = list(recv)
        self._send = list(send)  # held so that nothing frees them while in flight

    def wait(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        self._send = []
        return self._recv


class P2PRing:
    """Send to rank+d and receive from rank-d of a process group, batched per shift
    (d = 1: the ring's neighbours)."""

    def __init__(self, group: Any):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _peer(self, d: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + d) % self.world_size)

    def shift(
        self,
        send: Sequence[torch.Tensor],
        recv: Sequence[torch.Tensor],
        tag: int = 0,
        distance: int = 1,
    ) -> _Pending:
        to, frm = self._peer(distance), self._peer(-distance)
        # Distinct tags keep gloo's matching by (peer, tag) unambiguous; NCCL ignores them.
        ops = [dist.P2POp(dist.isend, t, to, self.group, tag + i) for i, t in enumerate(send)]
        ops += [dist.P2POp(dist.irecv, t, frm, self.group, tag + i) for i, t in enumerate(recv)]
        return _Pending(dist.batch_isend_irecv(ops), recv, send)


class NoComm:
    """Stands in for the ring when one device runs every rank's schedule in turn (the
    benchmark's load-balance simulation): nothing moves, a shift hands back what it was
    given, so each step computes on valid data of the right shape."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    def shift(
        self,
        send: Sequence[torch.Tensor],
        recv: Sequence[torch.Tensor],
        tag: int = 0,
        distance: int = 1,
    ) -> _Pending:
        return _Pending([], send, send)


# -- the ring -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RingConfig:
    """Everything about one rank's ring call except the arrays."""

    call: AttentionCall  # the local shards' call, mask-free; blocks set Nq/Nk and the mask
    backend: str
    rank: int
    world_size: int
    layout: str
    causal: bool
    window: Window | None = None  # over the global sequence, as ring_attention takes it

    def blocks(self, step: int) -> tuple[Block, ...]:
        return step_blocks(
            self.rank, step, self.world_size, self.layout, self.causal, self.call.Nq, self.window
        )

    def block_call(self, blk: Block) -> AttentionCall:
        return self.call.replace(Nq=blk.nq, Nk=blk.nk, causal=blk.causal, window=blk.window)

    @property
    def steps(self) -> int:
        """Steps the ring runs (P, or fewer when a window leaves the last ones empty)."""
        return ring_steps(self.world_size, self.layout, self.causal, self.call.Nq, self.window)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    # Sequence-axis slice. Backends may assume a unit stride along head_dim only; a
    # batch > 1 slice is copied so that no backend ever sees a gapped sequence axis.
    s = x[:, a:b]
    return s if s.is_contiguous() else s.contiguous()


def _merge(
    out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, lo: torch.Tensor, q0: int, q1: int
) -> None:
    """Fold one block's (o, lo) into the accumulators for rows [q0, q1), in place.

    Max-shifted: both weights are <= 1 and the larger is exactly 1, so nothing overflows;
    rows that have seen nothing on either side (lse = -inf) keep out = 0, lse = -inf.
    """
    la = lse[:, :, q0:q1]
    lo = lo.to(la.dtype)
    m = torch.maximum(la, lo)
    m = m.masked_fill(m == -math.inf, 0.0)
    wa, wb = torch.exp(la - m), torch.exp(lo - m)
    total = wa + wb
    lse[:, :, q0:q1] = m + torch.log(total)
    total = total.masked_fill(total == 0, 1.0)
    wa = (wa / total).transpose(1, 2).unsqueeze(-1)
    wb = (wb / total).transpose(1, 2).unsqueeze(-1)
    oa = out[:, q0:q1]
    oa.mul_(wa).add_(o.to(oa.dtype) * wb)


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: RingConfig,
    comm: P2PRing | NoComm,
    mark: StepMark | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One rank's ring forward.

    Returns out in q's dtype, the rows' lse in the accumulation dtype (float32, float64
    for float64 inputs) and, per step, the lse of that step's blocks, (slots, B, Hq, n)
    with a slot per block as ``lse_slots`` assigns them (-inf on rows a slot does not
    touch), which the backward needs.
    """
    acc = _acc_dtype(q.dtype)
    b, n, hq, _ = q.shape
    out = q.new_zeros((b, n, hq, v.shape[-1]), dtype=acc)
    lse = q.new_full((b, hq, n), -math.inf, dtype=acc)
    step_lse: list[torch.Tensor] = []
    k_cur, v_cur = k, v
    spare: list[torch.Tensor] | None = None
    steps = cfg.steps
    for s in range(steps):
        if mark is not None:
            mark(s)
        pending = None
        if s + 1 < steps:
            if spare is None:
                spare = [torch.empty_like(k), torch.empty_like(v)]
            pending = comm.shift([k_cur, v_cur], spare)
        blocks = cfg.blocks(s)
        lse_s = lse.new_full((n_slots(blocks), *lse.shape), -math.inf)
        for blk, slot in zip(blocks, lse_slots(blocks)):
            call = cfg.block_call(blk)
            impl = REGISTRY.select(call, cfg.backend)
            o, lo = impl.forward(
                call,
                _rows(q, blk.q0, blk.q1),
                _rows(k_cur, blk.k0, blk.k1),
                _rows(v_cur, blk.k0, blk.k1),
            )
            lse_s[slot, :, :, blk.q0 : blk.q1] = lo
            _merge(out, lse, o, lo, blk.q0, blk.q1)
        step_lse.append(lse_s)
        if pending is not None:
            k_nxt, v_nxt = pending.wait()
            # The pair just computed on becomes the next receive buffer, except the
            # caller's own k/v at step 0.
            spare = [k_cur, v_cur] if s > 0 else None
            k_cur, v_cur = k_nxt, v_nxt
    if mark is not None:
        mark(steps)
    return out.to(q.dtype), lse, step_lse


def _block_dout(dout: torch.Tensor, lse_blk: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """dout scaled per row by exp(lse_blk - lse), the share of the row's softmax mass
    that the block holds (0 where the row sees nothing)."""
    w = torch.exp(lse_blk - lse.masked_fill(lse == -math.inf, 0.0))
    return (dout.to(w.dtype) * w.transpose(1, 2).unsqueeze(-1)).to(dout.dtype)


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    step_lse: Sequence[torch.Tensor],
    cfg: RingConfig,
    comm: P2PRing | NoComm,
    mark: StepMark | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's ring backward: (dq, dk, dv) for this rank's q, k, v shards.

    Each block's backward runs against the block's own softmax (its lse from the
    forward) with dout scaled by exp(lse_blk - lse), and delta = rowsum(dout' * out) from
    the final out. Then P_blk * w = exp(s - lse), dout' V^T - delta' = w (dout V^T -
    delta): the block's gradients are exactly its share of the full attention's. This
    holds whether a backend uses the lse it is given (as FlashAttention kernels do) or
    recomputes the block's own lse (as the reference does for float64).
    """
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    k_cur, v_cur = k, v
    spare: list[torch.Tensor] | None = None
    dkv_pending: _Pending | None = None
    dkv: list[torch.Tensor] = []
    steps = cfg.steps
    for s in range(steps):
        if mark is not None:
            mark(s)
        kv_pending = None
        if s + 1 < steps:
            if spare is None:
                spare = [torch.empty_like(k), torch.empty_like(v)]
            kv_pending = comm.shift([k_cur, v_cur], spare)
        # fp32 partial dK/dV of the K/V held at this step (owner: rank - s)
        dkv = [
            torch.zeros(k.shape, dtype=acc, device=k.device),
            torch.zeros(v.shape, dtype=acc, device=v.device),
        ]
        blocks = cfg.blocks(s)
        for blk, slot in zip(blocks, lse_slots(blocks)):
            call = cfg.block_call(blk)
            impl = REGISTRY.select(call, cfg.backend)
            rows = slice(blk.q0, blk.q1)
            lse_blk = step_lse[s][slot, :, :, rows]
            dq_b, dk_b, dv_b = impl.backward(
                call,
                _block_dout(dout[:, rows], lse_blk, lse[:, :, rows]),
                _rows(q, blk.q0, blk.q1),
                _rows(k_cur, blk.k0, blk.k1),
                _rows(v_cur, blk.k0, blk.k1),
                _rows(out, blk.q0, blk.q1),
                lse_blk.to(torch.float32),
            )
            dq[:, rows] += dq_b
            dkv[0][:, blk.k0 : blk.k1] += dk_b
            dkv[1][:, blk.k0 : blk.k1] += dv_b
        if dkv_pending is not None:
            # Sums from the ranks that held this K/V before us.
            for mine, theirs in zip(dkv, dkv_pending.wait()):
                mine += theirs
            dkv_pending = None
        # On to the next holder; after the last step, home to the owner (rank - s):
        # one hop of distance 1 when the ring ran all P steps.
        distance = 1 if s + 1 < steps else -s
        if distance % cfg.world_size:
            recv = [torch.empty_like(t) for t in dkv]
            dkv_pending = comm.shift(dkv, recv, tag=2, distance=distance)
        if kv_pending is not None:
            k_nxt, v_nxt = kv_pending.wait()
            spare = [k_cur, v_cur] if s > 0 else None
            k_cur, v_cur = k_nxt, v_nxt
    if dkv_pending is not None:
        # The last hop brings the complete sums home.
        dkv = dkv_pending.wait()
    if mark is not None:
        mark(steps)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg, comm):
        out, lse, step_lse = ring_forward(q, k, v, cfg, comm)
        ctx.save_for_backward(q, k, v, out, lse, *step_lse)
        ctx.cfg, ctx.comm = cfg, comm
        lse32 = lse.to(torch.float32)
        ctx.mark_non_differentiable(lse32)
        return out, lse32

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *step_lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.to(out.dtype)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, step_lse, ctx.cfg, ctx.comm)
        return dq, dk, dv, None, None


def _world(group: Any) -> Any:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(e.g. under torchrun) before sequence-parallel attention"
        )
    return dist.group.WORLD if group is None else group


def _lastdim(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def ring_attention(q, k, v, *, group, causal, scale, window, softcap, layout, return_lse, backend):
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
    comm = P2PRing(_world(group))
    cfg = RingConfig(
        call=call.replace(causal=False, window=None),
        backend=backend if backend is not None else get_backend(),
        rank=comm.rank,
        world_size=comm.world_size,
        layout=layout,
        causal=causal,
        window=call.window,  # validated, causal folded in
    )
    # K/V travel, and a send needs one dense buffer.
    out, lse = _RingAttention.apply(_lastdim(q), k.contiguous(), v.contiguous(), cfg, comm)
    return (out, lse) if return_lse else out


# -- Ulysses --------------------------------------------------------------------------------
def _all_to_all(
    x: torch.Tensor, group: Any, world_size: int, split_dim: int, concat_dim: int
) -> torch.Tensor:
    """Split x along split_dim into P parts, send part j to rank j, concatenate what
    arrives along concat_dim in rank order."""
    send = torch.stack(x.chunk(world_size, dim=split_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=concat_dim)


class _AllToAll(torch.autograd.Function):
    # The exchange is a permutation of elements, so its adjoint is the reverse exchange.
    @staticmethod
    def forward(ctx, x, group, world_size, split_dim, concat_dim):
        ctx.args = (group, world_size, concat_dim, split_dim)
        return _all_to_all(x, group, world_size, split_dim, concat_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), *ctx.args), None, None, None, None


def ulysses_attention(q, k, v, *, group, causal, scale, window, softcap, return_lse, backend):
    from longflash.api import attention

    make_call(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap)
    group = _world(group)
    world_size = dist.get_world_size(group)
    hq, hk = q.shape[2], k.shape[2]
    if hq % world_size or hk % world_size:
        raise ValueError(
            f"ulysses_attention splits heads over the {world_size} ranks, so q heads ({hq}) "
            f"and k/v heads ({hk}) must both be divisible by {world_size}; use "
            "ring_attention instead"
        )
    # sequence shards -> head shards of the whole sequence (contiguous layout)
    qh, kh, vh = (_AllToAll.apply(x, group, world_size, 2, 1) for x in (q, k, v))
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
    out = _AllToAll.apply(out, group, world_size, 1, 2)
    if not return_lse:
        return out
    with torch.no_grad():
        lse = _all_to_all(lse, group, world_size, 2, 1)
    return out, lse
