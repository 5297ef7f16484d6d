"""Per-framework glue for the suite: build inputs for a case, run a backend on them.

Both runners return host float64 arrays so that the comparison is one code path. Inputs
are drawn from a NumPy generator seeded by the case and dtype, rounded to the dtype, and
the oracle reads back the rounded values: errors measure only the backend's arithmetic.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from longflash.testing.cases import Case
from longflash.testing.oracle import to_numpy64


@dataclass
class Inputs:
    q: Any
    k: Any
    v: Any
    dout: Any
    cu_q: Any = None
    cu_k: Any = None


@dataclass
class Outputs:
    """A backend's results as float64 host arrays plus what was checked on the way."""

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]


def seed_for(case: Case, dtype: str) -> int:
    return zlib.crc32(f"{case!r}|{dtype}".encode())


def host_inputs(case: Case, dtype: str) -> dict[str, np.ndarray]:
    """Float32 host arrays of the API's shapes (not yet rounded to ``dtype``)."""
    rng = np.random.default_rng(seed_for(case, dtype))
    if case.varlen:
        cq, ck = case.cu_seqlens
        lead_q, lead_k = (cq[-1],), (ck[-1],)
    else:
        lead_q, lead_k = (case.B, case.Nq), (case.B, case.Nk)
    expanded = case.layout == "expanded_batch"

    def draw(lead, h, d, shared_over_batch=False):
        if shared_over_batch:
            one = rng.standard_normal((1,) + lead[1:] + (h, d), dtype=np.float32)
            return np.broadcast_to(one, lead + (h, d))
        return rng.standard_normal(lead + (h, d), dtype=np.float32)

    q = draw(lead_q, case.Hq, case.Dqk)
    k = draw(lead_k, case.Hk, case.Dqk, expanded)
    v = draw(lead_k, case.Hk, case.dv, expanded)
    dout = rng.standard_normal(lead_q + (case.Hq, case.dv), dtype=np.float32)
    if case.q_shift:
        q = q.copy()
        q[..., 0] += case.q_shift
    if case.k_shift:
        k = k.copy()
        k[..., 0] += case.k_shift
    return {"q": q, "k": k, "v": v, "dout": dout}


def to_host(outputs: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: to_numpy64(x) for name, x in outputs.items()}


# -- torch ---------------------------------------------------------------------------
class TorchRunner:
    framework = "torch"

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def dtype(self, name: str) -> Any:
        return getattr(self.torch, name)

    def inputs(self, case: Case, dtype: str) -> Inputs:
        torch = self.torch
        host = host_inputs(case, dtype)
        tdt = self.dtype(dtype)
        made = {}
        for name, arr in host.items():
            made[name] = self._layout(
                arr, tdt, case.layout, grad=name != "dout", kv=name in ("k", "v")
            )
        cu_q = cu_k = None
        if case.varlen:
            cq, ck = case.cu_seqlens
            cu_q = torch.tensor(cq, dtype=torch.int32, device=self.device)
            cu_k = torch.tensor(ck, dtype=torch.int32, device=self.device)
        return Inputs(made["q"], made["k"], made["v"], made["dout"], cu_q, cu_k)

    def _layout(self, arr: np.ndarray, tdt: Any, layout: str, grad: bool, kv: bool) -> Any:
        """A tensor with ``arr``'s values (rounded to tdt) in the requested layout."""
        torch = self.torch
        nan = float("nan")
        a = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, tdt)
        if layout == "contiguous" or (layout == "expanded_batch" and not kv):
            return a.requires_grad_(grad)
        if layout == "expanded_batch":
            base = a[:1].clone().requires_grad_(grad)
            return base.expand(a.shape)
        if layout == "transposed":
            # storage (…, H, N, D) for batched, (H, T, D) for packed; viewed back
            dims = (0, 2, 1, 3) if a.dim() == 4 else (1, 0, 2)
            base = a.permute(dims).contiguous().requires_grad_(grad)
            return base.permute(dims)
        if layout == "sliced_heads":
            shape = list(a.shape)
            shape[-2] *= 2
            base = torch.full(shape, nan, dtype=tdt, device=self.device)
            base[..., 1::2, :] = a
            base.requires_grad_(grad)
            return base[..., 1::2, :]
        if layout == "padded_dim":
            base = torch.full(a.shape[:-1] + (a.shape[-1] + 8,), nan, dtype=tdt, device=self.device)
            base[..., : a.shape[-1]] = a
            base.requires_grad_(grad)
            return base[..., : a.shape[-1]]
        if layout == "strided_dim":
            base = torch.full(a.shape[:-1] + (2 * a.shape[-1],), nan, dtype=tdt, device=self.device)
            base[..., ::2] = a
            base.requires_grad_(grad)
            return base[..., ::2]
        raise ValueError(f"unknown layout {layout!r}")

    def make_call(self, case: Case, x: Inputs) -> Any:
        from longflash.frontends import torch as fe

        return fe.make_call(x.q, x.k, x.v, **self._varlen_kwargs(case, x), **case.kwargs())

    @staticmethod
    def _varlen_kwargs(case: Case, x: Inputs) -> dict[str, Any]:
        if not case.varlen:
            return {}
        kw: dict[str, Any] = dict(cu_seqlens_q=x.cu_q, cu_seqlens_k=x.cu_k)
        if case.pass_max_seqlen:
            kw.update(max_seqlen_q=case.Nq, max_seqlen_k=case.Nk)
        return kw

    def call(self, case: Case, x: Inputs, backend: str) -> tuple[Any, Any]:
        import longflash

        if case.varlen:
            kw = self._varlen_kwargs(case, x)
            return longflash.attention_varlen(
                x.q,
                x.k,
                x.v,
                kw.pop("cu_seqlens_q"),
                kw.pop("cu_seqlens_k"),
                **kw,
                **case.kwargs(),
                return_lse=True,
                backend=backend,
            )
        return longflash.attention(x.q, x.k, x.v, **case.kwargs(), return_lse=True, backend=backend)

    def run(self, case: Case, x: Inputs, backend: str) -> Outputs:
        from longflash.testing.poison import poisoned

        torch = self.torch
        with poisoned():
            out, lse = self.call(case, x, backend)
            dq, dk, dv = torch.autograd.grad(out, (x.q, x.k, x.v), x.dout, allow_unused=True)
        res = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
        missing = [n for n, t in res.items() if t is None]
        if missing:
            raise AssertionError(f"no gradient produced for {', '.join(missing)}")
        dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in res.items()}
        devices = {n: t.device.type for n, t in res.items()}
        for n, dev in devices.items():
            if dev != self.device.type:
                raise AssertionError(f"{n} is on {dev}, expected {self.device.type}")
        return Outputs(to_host(res), dtypes)

    def blockwise_oracle(self, case: Case, x: Inputs) -> Any:
        from longflash.testing.oracle import blockwise_oracle

        return blockwise_oracle(
            x.q.detach(),
            x.k.detach(),
            x.v.detach(),
            x.dout,
            **case.kwargs(),
            cu_seqlens_q=x.cu_q,
            cu_seqlens_k=x.cu_k,
        )


# -- jax -----------------------------------------------------------------------------
class JaxRunner:
    framework = "jax"

    def __init__(self, device: str):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        platform = {"cuda": "gpu"}.get(device, device)
        self.device = jax.devices(platform)[0]

    def dtype(self, name: str) -> Any:
        return getattr(self.jnp, name)

    def inputs(self, case: Case, dtype: str) -> Inputs:
        if case.layout not in ("contiguous",):
            raise ValueError("JAX arrays have no layouts: only 'contiguous' cases apply")
        jnp, jax = self.jnp, self.jax
        host = host_inputs(case, dtype)
        made = {
            n: jax.device_put(jnp.asarray(a).astype(self.dtype(dtype)), self.device)
            for n, a in host.items()
        }
        cu_q = cu_k = None
        if case.varlen:
            cq, ck = case.cu_seqlens
            cu_q = jax.device_put(jnp.asarray(cq, dtype=jnp.int32), self.device)
            cu_k = jax.device_put(jnp.asarray(ck, dtype=jnp.int32), self.device)
        return Inputs(made["q"], made["k"], made["v"], made["dout"], cu_q, cu_k)

    def make_call(self, case: Case, x: Inputs) -> Any:
        from longflash.frontends import jax as fe

        return fe.make_call(x.q, x.k, x.v, **TorchRunner._varlen_kwargs(case, x), **case.kwargs())

    def fn(self, case: Case, x: Inputs, backend: str):
        """q, k, v -> (out, lse) with everything else fixed."""
        import longflash

        if case.varlen:
            kw = TorchRunner._varlen_kwargs(case, x)
            cu_q, cu_k = kw.pop("cu_seqlens_q"), kw.pop("cu_seqlens_k")

            def f(q, k, v):
                return longflash.attention_varlen(
                    q, k, v, cu_q, cu_k, **kw, **case.kwargs(), return_lse=True, backend=backend
                )
        else:

            def f(q, k, v):
                return longflash.attention(
                    q, k, v, **case.kwargs(), return_lse=True, backend=backend
                )

        return f

    def call(self, case: Case, x: Inputs, backend: str) -> tuple[Any, Any]:
        return self.fn(case, x, backend)(x.q, x.k, x.v)

    def run(self, case: Case, x: Inputs, backend: str) -> Outputs:
        f = self.fn(case, x, backend)
        jax = self.jax

        # One jit over forward and backward: the form JAX code takes in practice, and
        # one XLA compilation per case instead of one per primitive and shape (eager
        # dispatch made the suite several times slower). test_jax_eager covers eager.
        @jax.jit
        def forward_backward(q, k, v, dout):
            out, vjp, lse = jax.vjp(f, q, k, v, has_aux=True)
            return (out, lse) + tuple(vjp(dout))

        out, lse, dq, dk, dv = forward_backward(x.q, x.k, x.v, x.dout)
        res = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
        dtypes = {n: np.dtype(t.dtype).name for n, t in res.items()}
        return Outputs(to_host(res), dtypes)

    def blockwise_oracle(self, case: Case, x: Inputs) -> Any:
        from longflash.testing.oracle import blockwise_oracle

        return blockwise_oracle(
            x.q, x.k, x.v, x.dout, **case.kwargs(), cu_seqlens_q=x.cu_q, cu_seqlens_k=x.cu_k
        )


def runner(framework: str, device: str) -> TorchRunner | JaxRunner:
    if framework == "torch":
        return TorchRunner(device)
    if framework == "jax":
        return JaxRunner(device)
    raise ValueError(f"framework must be 'torch' or 'jax', got {framework!r}")


def default_device(framework: str) -> str:
    """torch: "cuda" when available, else "cpu"; jax: the default backend's platform."""
    if framework == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    import jax

    return {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
