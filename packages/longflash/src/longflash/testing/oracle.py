"""Exact attention oracles for the conformance suite, written from DESIGN §2 alone.

Two paths, both independent of every backend (the reference one included):

- :func:`attention_oracle`: naive attention in float64 NumPy on the host. Forward, lse
  and closed-form gradients. It materialises the score matrix per sequence, so it serves
  the small shapes the suite runs on a CPU.
- :func:`blockwise_oracle`: the same mathematics in float32 on the inputs' own device
  (torch or JAX), one block of query rows at a time, so memory stays O(block · Nk). It
  serves the long sequences (up to 128K tokens) the suite runs on a GPU.

Semantics (DESIGN §2): ``off = Nk - Nq`` (per sequence when packed); query i sees key j
iff ``i + off - left <= j <= i + off + right`` with ``None`` meaning unbounded and
``causal`` forcing ``right = 0``; scores are ``s = scale · q·k`` (``scale`` defaults to
``1/sqrt(Dqk)``), then ``c · tanh(s / c)`` under a softcap ``c``; q head ``h`` reads kv
head ``h // (Hq // Hk)``. A row that sees no key has out 0, lse -inf and zero gradients.

Closed-form backward, per row i (P the softmax, T the capped scores, dO the output
cotangent): ``dV = Pᵀ dO``, ``dP = dO Vᵀ``, ``Δᵢ = Σ_d dOᵢ·Oᵢ``,
``dT = P ∘ (dP − Δ)``, ``dS = dT ∘ (1 − tanh²(s/c))`` (just ``dT`` without a softcap),
``dQ = scale · dS K`` and ``dK = scale · dSᵀ Q``; GQA sums dK and dV over the query heads
of a group.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

# Larger problems are split over heads so that one float64 score matrix stays below
# 32 MiB on the host: the backward keeps about ten of them alive.
_MAX_SCORES = 1 << 22


@dataclass
class OracleResult:
    """Oracle outputs as float64 NumPy arrays, in the API's shapes.

    ``key_seen`` marks the key tokens at least one query sees ((B, Nk), or (Tk,) when
    packed); the gradients of the others must be exactly zero.

    ``dq_terms``/``dk_terms`` (shaped like dq/dk) hold the magnitude of the terms that
    the softmax Jacobian sums into dq and dk: ``scale · (P ∘ (|dP| + |Δ|)) |K|`` and
    ``scale · (P ∘ (|dP| + |Δ|))ᵀ |Q|``. Where every row sees a single key those terms
    cancel exactly and dq = dk = 0; any finite-precision kernel then returns rounding
    noise of the size of these terms, which is what it is measured against.
    """

    out: np.ndarray
    lse: np.ndarray
    dq: np.ndarray | None = None
    dk: np.ndarray | None = None
    dv: np.ndarray | None = None
    key_seen: np.ndarray | None = None
    dq_terms: np.ndarray | None = None
    dk_terms: np.ndarray | None = None


# -- conversions ---------------------------------------------------------------------
def to_numpy64(x: Any) -> np.ndarray:
    """A torch tensor, JAX array, NumPy array or nested list as a float64 host array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return np.asarray(jax.device_get(x)).astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def to_int_list(x: Any) -> list[int]:
    """cu_seqlens (any framework) as a list of Python ints."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return [int(v) for v in x.detach().cpu().tolist()]
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return [int(v) for v in np.asarray(jax.device_get(x)).tolist()]
    return [int(v) for v in np.asarray(x).tolist()]


def visible(nq: int, nk: int, causal: bool, window: Any) -> np.ndarray:
    """(nq, nk) bool: which keys each query sees, straight from DESIGN §2."""
    left, right = (None, None) if window is None else window
    if causal:
        right = 0
    off = nk - nq
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    mask = np.ones((nq, nk), dtype=bool)
    if left is not None:
        mask &= j >= i + off - left
    if right is not None:
        mask &= j <= i + off + right
    return mask


# -- the float64 oracle --------------------------------------------------------------
def attention_oracle(
    q: Any,
    k: Any,
    v: Any,
    dout: Any = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
) -> OracleResult:
    """Exact attention in float64 on the host, with gradients when ``dout`` is given.

    Arguments follow ``longflash.attention`` (or ``attention_varlen`` when cu_seqlens
    are given); arrays of any framework are converted to float64 NumPy first.
    """
    q, k, v = to_numpy64(q), to_numpy64(k), to_numpy64(v)
    do = None if dout is None else to_numpy64(dout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    opts = dict(causal=causal, scale=scale, window=window, softcap=softcap)

    if cu_seqlens_q is None:
        # batched: (B, N, H, D); every batch element is one sequence
        pieces = [
            _sequence(q[b], k[b], v[b], None if do is None else do[b], **opts)
            for b in range(q.shape[0])
        ]
        return _stack(pieces, q.shape, k.shape, v.shape, do is not None, packed=False)

    cq, ck = to_int_list(cu_seqlens_q), to_int_list(cu_seqlens_k)
    pieces = []
    for b in range(len(cq) - 1):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        pieces.append(_sequence(q[sq], k[sk], v[sk], None if do is None else do[sq], **opts))
    return _stack(pieces, q.shape, k.shape, v.shape, do is not None, packed=True)


def _stack(pieces, q_shape, k_shape, v_shape, with_grads: bool, packed: bool) -> OracleResult:
    """Join per-sequence pieces into the API's shapes (batched: stack; packed: concat)."""
    hq = q_shape[-2]
    if not pieces:  # a batch of zero sequences
        res = OracleResult(
            out=np.zeros(q_shape[:-1] + (v_shape[-1],)),
            lse=np.full((hq, q_shape[0]) if packed else (0, hq, q_shape[1]), -np.inf),
            key_seen=np.zeros(k_shape[:-2], dtype=bool),
        )
        if with_grads:
            res.dq, res.dk, res.dv = np.zeros(q_shape), np.zeros(k_shape), np.zeros(v_shape)
            res.dq_terms, res.dk_terms = np.zeros(q_shape), np.zeros(k_shape)
        return res
    join = np.concatenate if packed else np.stack
    # a piece's lse is (Hq, n): packed joins along tokens, batched stacks a batch axis
    lse = (
        np.concatenate([p[1] for p in pieces], axis=1)
        if packed
        else np.stack([p[1] for p in pieces], axis=0)
    )
    res = OracleResult(
        out=join([p[0] for p in pieces], axis=0),
        lse=lse,
        key_seen=join([p[5] for p in pieces], axis=0),
    )
    if with_grads:
        res.dq, res.dk, res.dv, res.dq_terms, res.dk_terms = (
            join([p[i] for p in pieces], axis=0) for i in (2, 3, 4, 6, 7)
        )
    return res


def _sequence(q, k, v, do, *, causal, scale, window, softcap):
    """One sequence: q (Nq, Hq, D), k (Nk, Hk, D), v (Nk, Hk, Dv)."""
    nq, hq, _ = q.shape
    nk, hk, dv_dim = v.shape
    group = hq // hk
    mask = visible(nq, nk, causal, window)
    seen = mask.any(axis=0)
    out = np.zeros((nq, hq, dv_dim))
    lse = np.full((hq, nq), -np.inf)
    grads = None
    if do is not None:
        grads = (
            np.zeros_like(q),
            np.zeros((nk, hq, k.shape[-1])),
            np.zeros((nk, hq, dv_dim)),
            np.zeros_like(q),
            np.zeros((nk, hq, k.shape[-1])),
        )
    if nq and nk:
        per = max(1, _MAX_SCORES // max(1, nq * nk))
        for h0 in range(0, hq, per):
            heads = np.arange(h0, min(hq, h0 + per))
            kv = heads // group
            qh = q[:, heads].transpose(1, 0, 2)  # (h, Nq, D)
            kh = k[:, kv].transpose(1, 0, 2)
            vh = v[:, kv].transpose(1, 0, 2)
            o, row_lse, g = _heads(
                qh,
                kh,
                vh,
                None if do is None else do[:, heads].transpose(1, 0, 2),
                mask,
                scale,
                softcap,
            )
            out[:, heads] = o.transpose(1, 0, 2)
            lse[heads] = row_lse
            if g is not None:
                for dst, src_ in zip(grads, g):
                    dst[:, heads] = src_.transpose(1, 0, 2)
    if grads is None:
        return out, lse, None, None, None, seen, None, None
    # GQA: the query heads of one group all read the same kv head
    dk, dv, dk_terms = (
        x.reshape(nk, hk, group, x.shape[-1]).sum(axis=2) for x in (grads[1], grads[2], grads[4])
    )
    return out, lse, grads[0], dk, dv, seen, grads[3], dk_terms


def _heads(q, k, v, do, mask, scale, softcap):
    """Heads stacked on axis 0: q (h, Nq, D), k (h, Nk, D), v (h, Nk, Dv)."""
    s = scale * (q @ k.transpose(0, 2, 1))
    if softcap is not None:
        th = np.tanh(s / softcap)
        t = softcap * th
    else:
        t = s
    t = np.where(mask, t, -np.inf)
    m = t.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(t - m_safe), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    live = total > 0
    p = np.where(live, e / np.where(live, total, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(live, m_safe + np.log(np.where(live, total, 1.0)), -np.inf)[..., 0]
    out = p @ v
    if do is None:
        return out, lse, None
    dv = p.transpose(0, 2, 1) @ do
    dp = do @ v.transpose(0, 2, 1)
    delta = (do * out).sum(axis=-1, keepdims=True)
    ds = p * (dp - delta)
    if softcap is not None:
        ds = ds * (1.0 - th * th)
    dq = scale * (ds @ k)
    dk = scale * (ds.transpose(0, 2, 1) @ q)
    terms = p * (np.abs(dp) + np.abs(delta))
    if softcap is not None:
        terms = terms * (1.0 - th * th)
    dq_terms = scale * (terms @ np.abs(k))
    dk_terms = scale * (terms.transpose(0, 2, 1) @ np.abs(q))
    return out, lse, (dq, dk, dv, dq_terms, dk_terms)


# -- the blockwise on-device oracle ---------------------------------------------------
class _TorchOps:
    def __init__(self, like: Any):
        import torch

        self.t = torch
        self.device = like.device

    def f32(self, x):
        return x.to(self.t.float32)

    def ein(self, eq, a, b):
        return self.t.einsum(eq, a, b)

    def arange(self, n):
        return self.t.arange(n, device=self.device)

    def amax(self, x, axis):
        return self.t.amax(x, dim=axis, keepdim=True)

    def sum(self, x, axis):
        return self.t.sum(x, dim=axis, keepdim=True)

    def heads_first(self, x):
        return x.permute(1, 0, 2)

    exp = staticmethod(lambda x: x.exp())
    log = staticmethod(lambda x: x.log())
    tanh = staticmethod(lambda x: x.tanh())

    def where(self, c, a, b):
        return self.t.where(c, a, b)

    def isfinite(self, x):
        return self.t.isfinite(x)

    def abs(self, x):
        return x.abs()

    def host(self, x):
        return x.detach().to("cpu", self.t.float64).numpy()

    def precise(self):
        """Plain float32 matmuls: TF32 would cost the oracle three decimal digits."""
        import contextlib

        torch = self.t

        @contextlib.contextmanager
        def ctx():
            prev_prec = torch.get_float32_matmul_precision()
            prev_tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.set_float32_matmul_precision("highest")
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                with torch.no_grad():
                    yield
            finally:
                torch.set_float32_matmul_precision(prev_prec)
                torch.backends.cuda.matmul.allow_tf32 = prev_tf32

        return ctx()


class _JaxOps:
    def __init__(self, like: Any):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.device = next(iter(like.devices()))

    def f32(self, x):
        return x.astype(self.jnp.float32)

    def ein(self, eq, a, b):
        # HIGHEST: no TF32/bf16 passes on GPUs and TPUs for the oracle's float32 products
        return self.jnp.einsum(eq, a, b, precision=self.jax.lax.Precision.HIGHEST)

    def arange(self, n):
        return self.jax.device_put(self.jnp.arange(n), self.device)

    def amax(self, x, axis):
        return self.jnp.max(x, axis=axis, keepdims=True, initial=-self.jnp.inf)

    def sum(self, x, axis):
        return self.jnp.sum(x, axis=axis, keepdims=True)

    def heads_first(self, x):
        return self.jnp.transpose(x, (1, 0, 2))

    def exp(self, x):
        return self.jnp.exp(x)

    def log(self, x):
        return self.jnp.log(x)

    def tanh(self, x):
        return self.jnp.tanh(x)

    def where(self, c, a, b):
        return self.jnp.where(c, a, b)

    def abs(self, x):
        return self.jnp.abs(x)

    def isfinite(self, x):
        return self.jnp.isfinite(x)

    def host(self, x):
        return np.asarray(self.jax.device_get(x)).astype(np.float64)

    def precise(self):
        import contextlib

        return contextlib.nullcontext()


def _ops_for(x: Any):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _TorchOps(x)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return _JaxOps(x)
    raise TypeError(f"blockwise_oracle takes torch tensors or JAX arrays, got {type(x)}")


def blockwise_oracle(
    q: Any,
    k: Any,
    v: Any,
    dout: Any = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    cu_seqlens_q: Any = None,
    cu_seqlens_k: Any = None,
    block_q: int | None = None,
    budget_bytes: int = 2 << 30,
) -> OracleResult:
    """Exact attention in float32 on the inputs' device, ``block_q`` query rows at a time.

    Each block holds its full score rows (all Nk keys), so the softmax of a block is
    exact in two passes and no online rescaling is involved: this is the plain
    definition, only tiled over queries. Memory is O(block_q · Nk · Hq); by default
    block_q is chosen so that one block's float32 temporaries fit in ``budget_bytes``.
    dq is produced per block, dk and dv are accumulated over blocks. Results come back
    as float64 NumPy arrays.
    """
    ops = _ops_for(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    opts = dict(
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
        block_q=block_q,
        budget=budget_bytes,
    )
    with ops.precise():
        if cu_seqlens_q is None:
            pieces = [
                _bw_sequence(ops, q[b], k[b], v[b], None if dout is None else dout[b], **opts)
                for b in range(q.shape[0])
            ]
            packed = False
        else:
            cq, ck = to_int_list(cu_seqlens_q), to_int_list(cu_seqlens_k)
            pieces = []
            for b in range(len(cq) - 1):
                sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
                pieces.append(
                    _bw_sequence(
                        ops, q[sq], k[sk], v[sk], None if dout is None else dout[sq], **opts
                    )
                )
            packed = True
    return _stack(
        pieces, tuple(q.shape), tuple(k.shape), tuple(v.shape), dout is not None, packed=packed
    )


def _bw_sequence(ops, q, k, v, do, *, causal, scale, window, softcap, block_q, budget):
    """One sequence on device; returns host float64 pieces like ``_sequence``."""
    nq, hq, dqk = q.shape
    nk, hk, dvd = v.shape
    group = hq // hk
    left, right = (None, None) if window is None else window
    if causal:
        right = 0
    off = nk - nq
    seen = np.zeros(nk, dtype=bool)
    if nq == 0 or nk == 0:
        g = do is not None
        return (
            np.zeros((nq, hq, dvd)),
            np.full((hq, nq), -np.inf),
            np.zeros((nq, hq, dqk)) if g else None,
            np.zeros((nk, hk, dqk)) if g else None,
            np.zeros((nk, hk, dvd)) if g else None,
            seen,
            np.zeros((nq, hq, dqk)) if g else None,
            np.zeros((nk, hk, dqk)) if g else None,
        )
    # kv heads lead, (Hk, Nk, D), so that a group of query heads broadcasts against them
    kt = ops.heads_first(ops.f32(k))
    kt_abs = ops.abs(kt)
    vt = ops.heads_first(ops.f32(v))
    if block_q is None:
        # up to about ten live (Hq, block, Nk) float32 temporaries in the backward
        block_q = max(16, budget // (10 * 4 * hq * nk))
    outs, lses, dqs, dq_terms = [], [], [], []
    dk_acc = dv_acc = dk_terms = None
    jk = ops.arange(nk)[None, :]
    for i0 in range(0, nq, block_q):
        i1 = min(nq, i0 + block_q)
        n = i1 - i0
        # the union of consecutive rows' key intervals is one interval
        lo = 0 if left is None else max(0, i0 + off - left)
        hi = nk - 1 if right is None else min(nk - 1, i1 - 1 + off + right)
        if lo <= hi:
            seen[lo : hi + 1] = True
        qg = ops.heads_first(ops.f32(q[i0:i1])).reshape(hk, group, n, dqk)
        s = ops.ein("kgid,kjd->kgij", qg, kt) * scale
        if softcap is not None:
            th = ops.tanh(s * (1.0 / softcap))
            t = th * softcap
        else:
            t = s
        ii = ops.arange(n)[:, None] + i0
        allowed = None
        if left is not None:
            allowed = jk >= ii + (off - left)
        if right is not None:
            c = jk <= ii + (off + right)
            allowed = c if allowed is None else (allowed & c)
        if allowed is not None:
            t = ops.where(allowed, t, -math.inf)
        m = ops.amax(t, -1)
        m_safe = ops.where(ops.isfinite(m), m, 0.0)
        e = ops.exp(t - m_safe)
        if allowed is not None:
            e = ops.where(allowed, e, 0.0)
        total = ops.sum(e, -1)
        live = total > 0
        safe_total = ops.where(live, total, 1.0)
        p = e / safe_total
        lse = ops.where(live, m_safe + ops.log(safe_total), -math.inf)
        o = ops.ein("kgij,kjd->kgid", p, vt)  # (Hk, G, n, Dv)
        outs.append(ops.host(o).reshape(hq, n, dvd).transpose(1, 0, 2))
        lses.append(ops.host(lse).reshape(hq, n))
        if do is None:
            continue
        dog = ops.heads_first(ops.f32(do[i0:i1])).reshape(hk, group, n, dvd)
        dv_b = ops.ein("kgij,kgid->kjd", p, dog)
        dp = ops.ein("kgid,kjd->kgij", dog, vt)
        delta = ops.sum(dog * o, -1)
        ds = p * (dp - delta)
        if softcap is not None:
            ds = ds * (1.0 - th * th)
        dqs.append(
            ops.host(ops.ein("kgij,kjd->kgid", ds, kt) * scale)
            .reshape(hq, n, dqk)
            .transpose(1, 0, 2)
        )
        dk_b = ops.ein("kgij,kgid->kjd", ds, qg) * scale
        dk_acc = dk_b if dk_acc is None else dk_acc + dk_b
        dv_acc = dv_b if dv_acc is None else dv_acc + dv_b
        terms = p * (ops.abs(dp) + ops.abs(delta))
        if softcap is not None:
            terms = terms * (1.0 - th * th)
        dq_terms.append(
            ops.host(ops.ein("kgij,kjd->kgid", terms, kt_abs) * scale)
            .reshape(hq, n, dqk)
            .transpose(1, 0, 2)
        )
        dkt_b = ops.ein("kgij,kgid->kjd", terms, ops.abs(qg)) * scale
        dk_terms = dkt_b if dk_terms is None else dk_terms + dkt_b
    out = np.concatenate(outs, 0)
    lse = np.concatenate(lses, 1)
    if do is None:
        return out, lse, None, None, None, seen, None, None
    return (
        out,
        lse,
        np.concatenate(dqs, 0),
        ops.host(dk_acc).transpose(1, 0, 2),
        ops.host(dv_acc).transpose(1, 0, 2),
        seen,
        np.concatenate(dq_terms, 0),
        ops.host(dk_terms).transpose(1, 0, 2),
    )
