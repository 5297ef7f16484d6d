"""Reference attention in PyTorch: exact and blockwise paths, forward and backward.

Internally every call is batched attention in a head-major layout: q (B*Hk, Nq*G, D)
with row r = token*G + g for query head h = kv_head*G + g, so that the G query heads
sharing one kv head form one matrix product with that head's K and V (GQA/MQA without
copying K/V), a tile of consecutive tokens is a contiguous block of rows, and every
product is one bmm/baddbmm (which on the CPU runs about twice as fast as a 4-D matmul
with a transposed operand, and fuses the softmax scale). Varlen calls are one packed
batch whose per-row key ranges keep the sequences apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from longflash.call import AttentionCall

NEG_INF = float("-inf")


@dataclass(frozen=True)
class _Problem:
    """One call in canonical form: batch b (1 for varlen), tokens nq/nk, heads."""

    b: int
    nq: int
    nk: int
    hk: int
    g: int
    scale: float
    softcap: float | None
    masked: bool  # False: every row sees every key, no mask is built
    lo: torch.Tensor  # (nq,) int64: first visible key of each query row
    hi: torch.Tensor  # (nq,) int64: one past the last visible key


# -- entry points (called by ReferenceBackend) -------------------------------------------
def forward(call: AttentionCall, q, k, v, path: str, settings):
    """(out, lse) of the call: out in q's dtype, lse float32."""
    q4, k4, v4 = _batched(call, q, k, v)
    b, nq, hq, _ = q4.shape
    nk = k4.shape[1]
    if q4.numel() == 0 or nk == 0:
        out = q4.new_zeros((b, nq, hq, v4.shape[-1]))
        lse = q4.new_full((b, hq, nq), NEG_INF, dtype=torch.float32)
        return _unbatched(call, out, lse)
    p = _problem(call, q4, k4)
    cd = _compute_dtype(q4.dtype)
    qh, kh, vh = (_heads_major(x, p.hk, cd) for x in (q4, k4, v4))
    plan = None if path == "exact" else _plan(p, settings.block_q, settings.block_k, q4.device)
    out_h, lse_h = _forward(p, plan, qh, kh, vh)
    out = _tokens_major(out_h, p.b, p.g, q4.dtype)
    return _unbatched(call, out, _lse_out(lse_h, p))


def backward(call: AttentionCall, dout, q, k, v, out, lse, path: str, settings):
    """(dq, dk, dv) in the input dtypes, by the closed form (no autograd)."""
    q4, k4, v4 = _batched(call, q, k, v)
    nk = k4.shape[1]
    if q4.numel() == 0 or nk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    p = _problem(call, q4, k4)
    cd = _compute_dtype(q4.dtype)
    qh, kh, vh = (_heads_major(x, p.hk, cd) for x in (q4, k4, v4))
    doh = _heads_major(_batched_out(call, dout), p.hk, cd)
    # rowsum(dO * O): the softmax Jacobian term of dS = P * (dP - delta).
    delta = (doh * _heads_major(_batched_out(call, out), p.hk, cd)).sum(-1, keepdim=True)
    plan = None if path == "exact" else _plan(p, settings.block_q, settings.block_k, q4.device)
    if cd == torch.float64:
        # The float32 lse the protocol carries would cap float64 gradients at float32
        # accuracy: recompute it.
        lse_h = _forward(p, plan, qh, kh, vh, with_out=False)[1]
    else:
        lse_h = _lse_in(call, lse, p, cd)
    lse_h = _safe_lse(lse_h)
    if plan is None:
        dq, dk, dv = _grads_tile(p, 0, p.nq, 0, p.nk, p.masked, qh, kh, vh, doh, lse_h, delta)
    else:
        dq, dk, dv = _backward_blockwise(p, plan, qh, kh, vh, doh, lse_h, delta)
    dq = _tokens_major(dq.mul_(p.scale), p.b, p.g, q4.dtype)
    dk = _tokens_major(dk, p.b, 1, k4.dtype)
    dv = _tokens_major(dv, p.b, 1, v4.dtype)
    if call.varlen is not None:
        dq, dk, dv = dq[0], dk[0], dv[0]
    return dq, dk, dv


# -- layout --------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batched(call, q, k, v):
    if call.varlen is None:
        return q, k, v
    return q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)


def _batched_out(call, x):
    return x if call.varlen is None else x.unsqueeze(0)


def _unbatched(call, out, lse):
    if call.varlen is None:
        return out, lse
    return out[0], lse[0]


def _heads_major(x: torch.Tensor, hk: int, cd: torch.dtype) -> torch.Tensor:
    """(b, n, h, d) -> (b*hk, n*g, d) in the compute dtype, row = token*g + group."""
    b, n, h, d = x.shape
    g = h // hk
    y = x.reshape(b, n, hk, g, d).permute(0, 2, 1, 3, 4)
    return _contiguous_copy(y, cd).view(b * hk, n * g, d)


def _tokens_major(y: torch.Tensor, b: int, g: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of _heads_major, cast to ``dtype``."""
    bh, rows, d = y.shape
    hk, n = bh // b, rows // g
    z = y.view(b, hk, n, g, d).permute(0, 2, 1, 3, 4)
    return _contiguous_copy(z, dtype).view(b, n, hk * g, d)


def _contiguous_copy(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # One pass for the cast and the transpose together (x.to() would keep x's strides).
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _lse_out(lse_h: torch.Tensor, p: _Problem) -> torch.Tensor:
    """(b*hk, nq*g) in the compute dtype -> (b, hq, nq) float32."""
    return (
        lse_h.view(p.b, p.hk, p.nq, p.g)
        .permute(0, 1, 3, 2)
        .reshape(p.b, p.hk * p.g, p.nq)
        .to(torch.float32)
    )


def _lse_in(call, lse: torch.Tensor, p: _Problem, cd: torch.dtype) -> torch.Tensor:
    """(b, hq, nq) (varlen: (hq, tq)) -> (b*hk, nq*g) in the compute dtype."""
    if call.varlen is not None:
        lse = lse.unsqueeze(0)
    return (
        lse.reshape(p.b, p.hk, p.g, p.nq).permute(0, 1, 3, 2).to(cd).reshape(p.b * p.hk, p.nq * p.g)
    )


def _safe_lse(lse_h: torch.Tensor) -> torch.Tensor:
    # Rows that see no key have lse = -inf and all scores -inf; subtracting 0 instead
    # keeps exp(s - lse) at exactly 0 there instead of exp(-inf + inf) = NaN.
    return torch.where(torch.isneginf(lse_h), 0.0, lse_h).unsqueeze(-1)


# -- the mask as one key range per query row ----------------------------------------------
def _problem(call: AttentionCall, q4: torch.Tensor, k4: torch.Tensor) -> _Problem:
    b, nq, hq, _ = q4.shape
    nk, hk = k4.shape[1], k4.shape[2]
    masked = call.window is not None or call.varlen is not None
    lo, hi = _bounds(call, nq, nk, q4.device)
    return _Problem(b, nq, nk, hk, hq // hk, call.scale, call.softcap, masked, lo, hi)


def _bounds(call: AttentionCall, nq: int, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible keys [lo[r], hi[r]) of each query row (packed indices for varlen).

    Computed on the device with tensor ops only (no host reads), so that it can run
    under CUDA graph capture.
    """
    t = torch.arange(nq, device=device)
    if call.varlen is None:
        start_k = torch.zeros_like(t)
        pos, len_q, len_k = t, torch.full_like(t, nq), torch.full_like(t, nk)
    else:
        cu_q = call.varlen.cu_seqlens_q.to(device=device, dtype=torch.int64)
        cu_k = call.varlen.cu_seqlens_k.to(device=device, dtype=torch.int64)
        # The last sequence starting at or before t holds t (empty sequences share
        # their start with the next one, and searching right skips them).
        seq = (torch.searchsorted(cu_q, t, right=True) - 1).clamp(0, cu_q.numel() - 2)
        start_q, start_k = cu_q[seq], cu_k[seq]
        len_q, len_k = cu_q[seq + 1] - start_q, cu_k[seq + 1] - start_k
        pos = t - start_q
    diag = pos + (len_k - len_q)  # the key aligned with this query (bottom-right)
    left, right = call.window if call.window is not None else (None, None)
    cap = nq + nk  # a wider window is unbounded; capping keeps the integers small
    if left is None:
        lo = torch.zeros_like(t)
    else:
        lo = torch.minimum((diag - min(left, cap)).clamp_min(0), len_k)
    if right is None:
        hi = len_k
    else:
        hi = torch.minimum((diag + min(right, cap) + 1).clamp_min(0), len_k)
    return start_k + lo, start_k + hi


def _invisible(p: _Problem, t0: int, t1: int, k0: int, k1: int) -> torch.Tensor:
    """(t1-t0, k1-k0) bool: True where query token t cannot see key j."""
    j = torch.arange(k0, k1, device=p.lo.device)
    return (j < p.lo[t0:t1, None]) | (j >= p.hi[t0:t1, None])


# A tile plan: for each block of query tokens (t0, t1), the key blocks (k0, k1, masked),
# k0 a multiple of block_k, that hold at least one visible key; masked=False when every
# row sees the whole block.
Plan = list[tuple[int, int, list[tuple[int, int, bool]]]]


def _plan(p: _Problem, block_q: int, block_k: int, device) -> Plan:
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:
        # No host reads while a CUDA graph is captured: visit every tile, masked.
        kblocks = [(k0, min(k0 + block_k, p.nk), p.masked) for k0 in range(0, p.nk, block_k)]
        return [(t0, min(t0 + block_q, p.nq), kblocks) for t0 in range(0, p.nq, block_q)]
    lo, hi = p.lo.cpu().numpy(), p.hi.cpu().numpy()
    plan: Plan = []
    for t0 in range(0, p.nq, block_q):
        t1 = min(t0 + block_q, p.nq)
        lo_t, hi_t = lo[t0:t1], hi[t0:t1]
        sees = lo_t < hi_t
        if not sees.any():
            plan.append((t0, t1, []))
            continue
        lo_t, hi_t = lo_t[sees], hi_t[sees]
        # Key blocks are aligned to multiples of block_k, so that the backward can
        # accumulate dk, dv in one contiguous buffer per key block.
        k0s = np.arange(lo_t.min() // block_k * block_k, hi_t.max(), block_k)
        k1s = np.minimum(k0s + block_k, p.nk)
        any_visible = ((lo_t[:, None] < k1s) & (hi_t[:, None] > k0s)).any(0)
        all_visible = ((lo_t[:, None] <= k0s) & (hi_t[:, None] >= k1s)).all(0)
        # Rows that see nothing still need the mask in every block they share.
        all_visible &= bool(sees.all())
        kblocks = [
            (int(k0), int(k1), p.masked and not full)
            for k0, k1, vis, full in zip(k0s, k1s, any_visible, all_visible)
            if vis
        ]
        plan.append((t0, t1, kblocks))
    return plan


# -- scores ----------------------------------------------------------------------------
class _Scratch:
    """Buffers reused from tile to tile for the score-sized temporaries. A fresh
    (b*hk, rows, keys) matrix per tile costs page faults, and glibc's malloc, which
    stops returning such blocks to the system after the first few, fragments the heap
    until the peak RSS is several times the live data."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = 1
        for size in shape:
            n *= size
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self._buffers[name] = like.new_empty(n)
        return buf[:n].view(shape)


def _new(scratch: _Scratch | None, name: str, shape, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(shape) if scratch is None else scratch.get(name, shape, like)


def _scores(
    p: _Problem,
    t0: int,
    t1: int,
    k0: int,
    k1: int,
    masked: bool,
    qt: torch.Tensor,
    kt: torch.Tensor,
    keep_tanh: bool = False,
    scratch: _Scratch | None = None,
):
    """Scaled, softcapped, masked scores of query tokens [t0, t1) and keys [k0, k1):
    (b*hk, (t1-t0)*g, k1-k0), and tanh(raw/softcap) when keep_tanh (for the backward)."""
    shape = (qt.shape[0], qt.shape[1], kt.shape[1])
    # beta=0: the uninitialised buffer is ignored (NaNs in it do not propagate).
    s = _new(scratch, "s", shape, qt).baddbmm_(qt, kt.transpose(1, 2), beta=0, alpha=p.scale)
    tanh = None
    if p.softcap is not None:
        tanh = s.div_(p.softcap).tanh_()
        if keep_tanh:
            s = torch.mul(tanh, p.softcap, out=_new(scratch, "capped", shape, qt))
        else:
            s = tanh.mul_(p.softcap)
    if masked:
        s.view(shape[0], t1 - t0, p.g, shape[2]).masked_fill_(
            _invisible(p, t0, t1, k0, k1)[:, None, :], NEG_INF
        )
    return s, tanh


# -- forward ---------------------------------------------------------------------------
def _forward(p: _Problem, plan, qh, kh, vh, with_out: bool = True):
    if plan is None:
        return _forward_exact(p, qh, kh, vh, with_out)
    return _forward_blockwise(p, plan, qh, kh, vh, with_out)


def _forward_exact(p: _Problem, qh, kh, vh, with_out: bool = True):
    """One softmax over the whole score matrix."""
    s, _ = _scores(p, 0, p.nq, 0, p.nk, p.masked, qh, kh)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)  # rows that see no key
    e = s.sub_(m).exp_()
    rowsum = e.sum(-1, keepdim=True)
    lse = torch.where(rowsum == 0, NEG_INF, m + torch.log(rowsum)).squeeze(-1)
    if not with_out:
        return None, lse
    out = torch.bmm(e, vh).div_(torch.where(rowsum == 0, 1.0, rowsum))
    return out, lse


def _forward_blockwise(p: _Problem, plan: Plan, qh, kh, vh, with_out: bool = True):
    """Online softmax over the plan's tiles: a running max m, row sum and unnormalised
    output per row, rescaled by exp(m_old - m_new) whenever the max grows."""
    bh, dv = qh.shape[0], vh.shape[-1]
    scratch = _Scratch()
    lse = qh.new_full((bh, p.nq * p.g), NEG_INF)
    out = qh.new_zeros((bh, p.nq * p.g, dv)) if with_out else None
    for t0, t1, kblocks in plan:
        if not kblocks:
            continue  # out stays 0, lse -inf
        r0, r1 = t0 * p.g, t1 * p.g
        qt = qh[:, r0:r1]
        m = qt.new_full((bh, r1 - r0, 1), NEG_INF)
        rowsum = qt.new_zeros((bh, r1 - r0, 1))
        acc = qt.new_zeros((bh, r1 - r0, dv)) if with_out else None
        for k0, k1, masked in kblocks:
            s, _ = _scores(p, t0, t1, k0, k1, masked, qt, kh[:, k0:k1], scratch=scratch)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            # A row with nothing visible yet keeps m = -inf; shifting by 0 instead
            # avoids exp(-inf - -inf) = NaN and leaves its terms at exactly 0.
            shift = torch.where(torch.isneginf(m_new), 0.0, m_new)
            e = s.sub_(shift).exp_()
            alpha = torch.exp(m - shift)
            rowsum = rowsum.mul_(alpha).add_(e.sum(-1, keepdim=True))
            if with_out:
                acc.mul_(alpha).baddbmm_(e, vh[:, k0:k1])
            m = m_new
        lse[:, r0:r1] = torch.where(rowsum == 0, NEG_INF, m + torch.log(rowsum)).squeeze(-1)
        if with_out:
            out[:, r0:r1] = acc.div_(torch.where(rowsum == 0, 1.0, rowsum))
    return out, lse


# -- backward --------------------------------------------------------------------------
def _grads_tile(
    p: _Problem,
    t0,
    t1,
    k0,
    k1,
    masked,
    qt,
    kt,
    vt,
    dot,
    lse_t,
    delta_t,
    dq=None,
    dk=None,
    dv=None,
    scratch: _Scratch | None = None,
):
    """Closed-form gradients of one tile, added into dq, dk, dv (new tensors when None);
    dq still to be multiplied by scale, dk already is:
    P = exp(S - lse), dV = P^T dO, dP = dO V^T, dS = P * (dP - delta), times
    1 - tanh^2 under softcap (d/dx c*tanh(x/c)), dQ = dS K, dK = scale dS^T Q."""
    s, tanh = _scores(p, t0, t1, k0, k1, masked, qt, kt, keep_tanh=True, scratch=scratch)
    prob = s.sub_(lse_t).exp_()  # masked scores are -inf: exactly 0
    dv = _add_bmm(dv, prob.transpose(1, 2), dot)
    ds = torch.bmm(dot, vt.transpose(1, 2), out=_new(scratch, "ds", prob.shape, prob))
    ds.sub_(delta_t).mul_(prob)
    del prob
    if tanh is not None:
        ds.mul_(tanh.square_().neg_().add_(1.0))
    dq = _add_bmm(dq, ds, kt)
    dk = _add_bmm(dk, ds.transpose(1, 2), qt, alpha=p.scale)
    return dq, dk, dv


def _add_bmm(acc, a, b, alpha: float = 1.0):
    if acc is None:
        return torch.bmm(a, b).mul_(alpha) if alpha != 1.0 else torch.bmm(a, b)
    return acc.baddbmm_(a, b, alpha=alpha)


def _backward_blockwise(p: _Problem, plan: Plan, qh, kh, vh, doh, lse_h, delta):
    """FlashAttention-2 backward: per tile, recompute P from the lse, then accumulate
    dq per query block and dk, dv per key block in the compute dtype. Each accumulator
    is its own contiguous buffer: baddbmm_ into a strided slice of a larger tensor runs
    about twice as slow on the CPU."""
    dq = torch.empty_like(qh)
    scratch = _Scratch()
    dk_blocks: dict[int, torch.Tensor] = {}
    dv_blocks: dict[int, torch.Tensor] = {}
    for t0, t1, kblocks in plan:
        r0, r1 = t0 * p.g, t1 * p.g
        qt, dot = qh[:, r0:r1], doh[:, r0:r1]
        lse_t, delta_t = lse_h[:, r0:r1], delta[:, r0:r1]
        dq_t = torch.zeros_like(qt)
        for k0, k1, masked in kblocks:
            if k0 not in dk_blocks:
                dk_blocks[k0] = kh.new_zeros((kh.shape[0], k1 - k0, kh.shape[2]))
                dv_blocks[k0] = vh.new_zeros((vh.shape[0], k1 - k0, vh.shape[2]))
            _grads_tile(
                p,
                t0,
                t1,
                k0,
                k1,
                masked,
                qt,
                kh[:, k0:k1],
                vh[:, k0:k1],
                dot,
                lse_t,
                delta_t,
                dq_t,
                dk_blocks[k0],
                dv_blocks[k0],
                scratch,
            )
        dq[:, r0:r1] = dq_t
    return dq, _gather(dk_blocks, kh), _gather(dv_blocks, vh)


def _gather(blocks: dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Concatenate per-key-block accumulators; keys no query sees get 0."""
    out = torch.zeros_like(like)
    for k0, blk in blocks.items():
        out[:, k0 : k0 + blk.shape[1]] = blk
    return out
