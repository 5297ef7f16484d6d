"""Session 14: the torch front-end's own CPU time per call, on any machine: longflash.attention
with a registered backend that does no work (two torch.empty), against that backend called
directly, under torch.no_grad. Measured before and after the eager shortcut (f5bbe1b) on the
development CPU:

    PYTHONPATH=packages/longflash/src python benchmarks/session14/frontend_cpu.py
"""

import time

import longflash
import torch
from longflash.frontends import torch as lft
from longflash.registry import REGISTRY


class NoWork:
    name = "nowork"
    frameworks = frozenset({"torch"})
    devices = frozenset({"cpu"})
    priority = 0

    def available(self):
        return True, ""

    def check(self, call):
        return []

    def forward(self, call, q, k, v):
        return torch.empty_like(q), torch.empty((call.B, call.Hq, call.Nq), dtype=torch.float32)

    def backward(self, *args):
        raise NotImplementedError


backend = NoWork()
REGISTRY.register(backend)
q = torch.randn(4, 64, 16, 128, dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
call = lft.make_call(q, k, v, causal=True)
calls = {
    "longflash.attention": lambda: longflash.attention(q, k, v, causal=True, backend="nowork"),
    "backend alone": lambda: backend.forward(call, q, k, v),
}
with torch.no_grad():
    for name, fn in calls.items():
        for _ in range(200):
            fn()
        t = time.perf_counter()
        for _ in range(2000):
            fn()
        print(f"{name:22s} {(time.perf_counter() - t) / 2000 * 1e6:6.1f} us")
