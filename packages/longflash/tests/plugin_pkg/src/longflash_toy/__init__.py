"""A third-party LongFlash backend in miniature (a test fixture, not a product).

Exact attention in float32 PyTorch, batched calls only: it declines varlen and softcap,
so that the registry's handling of declined calls can be seen from outside. It counts
its calls so that a test can tell it ran.
"""

from __future__ import annotations

import math
from typing import Any

CALLS = {"forward": 0, "backward": 0}


class ToyBackend:
    name = "toy"
    frameworks = frozenset({"torch"})
    devices = frozenset({"cpu"})
    priority = -200  # below the reference: "auto" never picks it over a real backend

    def available(self) -> tuple[bool, str]:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False, "torch is not installed"
        return True, ""

    def check(self, call: Any) -> list[str]:
        reasons = []
        if call.varlen is not None:
            reasons.append("varlen not supported")
        if call.softcap is not None:
            reasons.append("softcap not supported")
        if call.device != "cpu":
            reasons.append(f"device {call.device} not supported")
        return reasons

    def _probs(self, call: Any, q: Any, k: Any) -> tuple[Any, Any]:
        import torch

        group = call.Hq // call.Hk
        qf = q.float().transpose(1, 2)  # (B, Hq, Nq, D)
        kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)
        s = (qf @ kf.transpose(-1, -2)) * call.scale
        nq, nk = q.shape[1], k.shape[1]
        i = torch.arange(nq)[:, None]
        j = torch.arange(nk)[None, :]
        seen = torch.ones(nq, nk, dtype=torch.bool)
        if call.window is not None:
            left, right = call.window
            if left is not None:
                seen &= j >= i + (nk - nq) - left
            if right is not None:
                seen &= j <= i + (nk - nq) + right
        s = s.masked_fill(~seen, -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]).masked_fill(~seen, 0.0)
        return p, lse

    def forward(self, call: Any, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
        CALLS["forward"] += 1
        group = call.Hq // call.Hk
        p, lse = self._probs(call, q, k)
        vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
        out = (p @ vf).transpose(1, 2).to(q.dtype).contiguous()
        return out, lse.contiguous()

    def backward(
        self, call: Any, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
    ) -> tuple[Any, Any, Any]:
        CALLS["backward"] += 1
        group = call.Hq // call.Hk
        p, _ = self._probs(call, q, k)
        do = dout.float().transpose(1, 2)
        vf = v.float().repeat_interleave(group, dim=2).transpose(1, 2)
        kf = k.float().repeat_interleave(group, dim=2).transpose(1, 2)
        qf = q.float().transpose(1, 2)
        dv = p.transpose(-1, -2) @ do
        dp = do @ vf.transpose(-1, -2)
        ds = p * (dp - (do * out.float().transpose(1, 2)).sum(-1, keepdim=True))
        dq = (ds @ kf) * call.scale
        dk = (ds.transpose(-1, -2) @ qf) * call.scale

        def fold(x: Any) -> Any:  # (B, Hq, N, D) -> (B, N, Hk, D), summing each group
            b, _, n, d = x.shape
            return x.transpose(1, 2).reshape(b, n, call.Hk, group, d).sum(3)

        return (dq.transpose(1, 2).to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype))


backend = ToyBackend()
