"""Reference backend (placeholder while the real one is written)."""
class _Ref:
    name = "reference"
    frameworks = frozenset({"torch", "jax"})
    devices = frozenset({"cpu", "cuda"})
    priority = -100
    def available(self): return True, ""
    def check(self, call): return []
    def forward(self, call, q, k, v): raise NotImplementedError
    def backward(self, call, dout, q, k, v, out, lse): raise NotImplementedError
backend = _Ref()
