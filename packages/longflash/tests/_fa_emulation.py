"""A test-only backend that reproduces the rounding of a FlashAttention-2 style kernel.

Scores, the softmax statistics and every accumulation are float32; P is rounded to the
input dtype before P·V and Pᵀ·dO, dS before dS·K and dSᵀ·Q, and the outputs once at the
end: the roundings a tensor-core kernel makes. Used to measure what the suite's
tolerances must allow (tests/test_tolerances.py) and, with deliberate defects switched
on, to show what they must not.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float32)


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32's 10-bit mantissa (round to nearest)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class EmulatedFlash:
    frameworks = frozenset({"torch"})
    devices = frozenset({"cpu"})
    priority = -1000

    def __init__(self, name: str = "fa-emulation", *, tf32: bool = False, prescale_q: bool = False):
        self.name = name
        self.tf32 = tf32  # float32 products in TF32: a defect for float32 inputs
        self.prescale_q = prescale_q  # q·scale rounded to the input dtype first

    def available(self) -> tuple[bool, str]:
        return True, ""

    def check(self, call: Any) -> list[str]:
        return (
            []
            if call.dtype in ("float16", "bfloat16", "float32")
            else [f"dtype {call.dtype} not supported"]
        )

    # -- helpers --------------------------------------------------------------------
    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.tf32:
            a, b = _tf32(a), _tf32(b)
        return a @ b

    @staticmethod
    def _sequences(call: Any, q: torch.Tensor):
        if call.varlen is None:
            for b in range(q.shape[0]):
                yield b, b
            return
        cq = call.varlen.cu_seqlens_q.tolist()
        ck = call.varlen.cu_seqlens_k.tolist()
        for b in range(len(cq) - 1):
            yield slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])

    @staticmethod
    def _mask(call: Any, nq: int, nk: int) -> torch.Tensor:
        i = torch.arange(nq)[:, None]
        j = torch.arange(nk)[None, :]
        seen = torch.ones(nq, nk, dtype=torch.bool)
        if call.window is not None:
            left, right = call.window
            if left is not None:
                seen &= j >= i + (nk - nq) - left
            if right is not None:
                seen &= j <= i + (nk - nq) + right
        return seen

    def _heads(self, call: Any, x: torch.Tensor) -> torch.Tensor:
        """(N, H, D) -> (Hq, N, D) float32, kv heads repeated over their group."""
        if x.shape[1] != call.Hq:
            x = x.repeat_interleave(call.Hq // call.Hk, dim=1)
        return x.float().transpose(0, 1)

    def _scores(self, call: Any, q: torch.Tensor, k: torch.Tensor):
        qh, kh = self._heads(call, q), self._heads(call, k)
        if self.prescale_q:
            s = self._mm(_round(qh * call.scale, q.dtype), kh.transpose(1, 2))
        else:
            s = self._mm(qh, kh.transpose(1, 2)) * call.scale
        th = None
        if call.softcap is not None:
            th = torch.tanh(s / call.softcap)
            s = call.softcap * th
        return s, th

    # -- protocol -------------------------------------------------------------------------
    def forward(self, call: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        packed = call.varlen is not None
        out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
        lse = torch.full(
            (call.Hq, q.shape[0]) if packed else (q.shape[0], call.Hq, q.shape[1]), -math.inf
        )
        for iq, ik in self._sequences(call, q):
            qs, ks, vs = q[iq], k[ik], v[ik]
            if qs.shape[0] == 0 or ks.shape[0] == 0:
                continue
            s, _ = self._scores(call, qs, ks)
            s = s.masked_fill(~self._mask(call, qs.shape[0], ks.shape[0]), -math.inf)
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            e = torch.exp(s - m)
            total = e.sum(-1, keepdim=True)
            live = total > 0
            safe = torch.where(live, total, torch.ones_like(total))
            o = self._mm(_round(e, q.dtype), self._heads(call, vs)) / safe
            out[iq] = o.transpose(0, 1).to(q.dtype)
            row_lse = torch.where(live, m + torch.log(safe), -math.inf)[..., 0]
            if packed:
                lse[:, iq] = row_lse
            else:
                lse[iq] = row_lse
        return out, lse

    def backward(self, call: Any, dout, q, k, v, out, lse):
        packed = call.varlen is not None
        group = call.Hq // call.Hk
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for iq, ik in self._sequences(call, q):
            qs, ks, vs = q[iq], k[ik], v[ik]
            nq, nk = qs.shape[0], ks.shape[0]
            if nq == 0 or nk == 0:
                continue
            s, th = self._scores(call, qs, ks)
            row_lse = (lse[:, iq] if packed else lse[iq])[..., None]
            live = torch.isfinite(row_lse)
            p = torch.exp(s - torch.where(live, row_lse, torch.zeros_like(row_lse)))
            p = torch.where(self._mask(call, nq, nk) & live, p, torch.zeros_like(p))
            do = dout[iq].float().transpose(0, 1)
            dv_h = self._mm(_round(p, q.dtype).transpose(1, 2), do)
            dp = self._mm(do, self._heads(call, vs).transpose(1, 2))
            delta = (do * out[iq].float().transpose(0, 1)).sum(-1, keepdim=True)
            ds = p * (dp - delta)
            if th is not None:
                ds = ds * (1 - th * th)
            ds = _round(ds, q.dtype)
            dq[iq] = (self._mm(ds, self._heads(call, ks)) * call.scale).transpose(0, 1).to(q.dtype)
            dk_h = self._mm(ds.transpose(1, 2), self._heads(call, qs)) * call.scale

            # (Hq, Nk, D) -> (Nk, Hk, D), summing the query heads of each group
            dk[ik] = dk_h.transpose(0, 1).reshape(nk, call.Hk, group, -1).sum(2).to(k.dtype)
            dv[ik] = dv_h.transpose(0, 1).reshape(nk, call.Hk, group, -1).sum(2).to(v.dtype)
        return dq, dk, dv
