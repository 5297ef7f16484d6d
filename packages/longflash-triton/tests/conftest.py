"""Test helpers for the triton backend: a float64 reference and NaN-poisoned allocations.

On a machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1 is
set here before triton is imported), on small shapes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from longflash.call import normalize_window

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"

# Relative Frobenius error bounds against float64, per input dtype (interim: the shared
# conformance suite states the project's).
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def ref_attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None):
    """Exact attention in float64 on (B, N, H, D); returns (out, lse). Differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    nq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    nk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(hq // hk, dim=2)
    v = v.repeat_interleave(hq // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(nq, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    w = normalize_window(causal, window)
    if w is not None:
        left, right = w
        off = nk - nq
        if left is not None:
            mask &= j >= i + off - left
        if right is not None:
            mask &= j <= i + off + right
    row_seen = mask.any(-1)
    seen = row_seen[:, None].expand(nq, nk)
    s = torch.where(seen, s.masked_fill(~mask, float("-inf")), 0.0)
    p = torch.softmax(s, -1) * seen
    lse = torch.where(row_seen, torch.logsumexp(s, -1), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def ref_varlen(q, k, v, cu_q, cu_k, **kw):
    """Varlen reference: each sequence through ref_attention; out (T, H, Dv), lse (H, T)."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        o, lse = ref_attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], **kw)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ over finite reference entries; NaN anywhere in x fails."""
    x = x.double()
    ref = ref.double()
    if torch.isnan(x).any():
        return float("inf")
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(x)) or not torch.equal(x[~fin], ref[~fin]):
        return float("inf")
    num = (x[fin] - ref[fin]).norm().item()
    den = ref[fin].norm().item()
    return num / den if den > 0 else num


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty returns NaN-filled memory, so an unwritten element shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield
