"""JAX front-end: validation and a custom_vjp around the chosen backend.

The whole call is traceable: it works under jit, grad and vmap (over a leading batch
axis), and inside shard_map. The backend is chosen at trace time from the static
AttentionCall; cu_seqlens values are checked only when they are concrete.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from longflash import validate
from longflash.call import AttentionCall, Varlen
from longflash.registry import REGISTRY, get_backend


def _platform(x: Any) -> str:
    try:
        devices = x.devices()
        platform = next(iter(devices)).platform
    except Exception:  # tracers carry no device: use the default backend's
        platform = jax.default_backend()
    return {"gpu": "cuda"}.get(platform, platform)


def _info(name: str, x: Any) -> validate.ArrayInfo:
    if not isinstance(x, jax.Array):
        raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")
    return validate.ArrayInfo(tuple(x.shape), np.dtype(x.dtype).name, _platform(x))


def make_call(
    q,
    k,
    v,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    causal=False,
    scale=None,
    window=None,
    softcap=None,
) -> AttentionCall:
    qi, ki, vi = _info("q", q), _info("k", k), _info("v", v)
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return validate.make_call(
            "jax", qi, ki, vi, causal=causal, scale=scale, window=window, softcap=softcap
        )
    cqi, cki = _info("cu_seqlens_q", cu_seqlens_q), _info("cu_seqlens_k", cu_seqlens_k)
    call = validate.make_varlen_call(
        "jax",
        qi,
        ki,
        vi,
        cqi,
        cki,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
    )
    for name, cu, total in (
        ("cu_seqlens_q", cu_seqlens_q, qi.shape[0]),
        ("cu_seqlens_k", cu_seqlens_k, ki.shape[0]),
    ):
        if not isinstance(cu, jax.core.Tracer):
            validate.check_cu_seqlens(name, np.asarray(cu).tolist(), total)
    return call


def _with_varlen(call: AttentionCall, q, k, cu_q, cu_k) -> AttentionCall:
    if cu_q is None:
        return call
    return call.replace(varlen=Varlen(cu_q, cu_k, q.shape[0], k.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(call, name, q, k, v, cu_q, cu_k):
    return _forward(call, name, q, k, v, cu_q, cu_k)[0]


def _varying(x) -> frozenset:
    """The shard_map mesh axes over which ``x`` varies (empty outside shard_map)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(manual.varying) if manual is not None else frozenset()


def _vary_like(x, *like):
    """``x`` typed as varying over every axis that ``like`` varies over. An FFI or callback
    result (the cuda backend's) carries no such axes; inside shard_map, custom_vjp wants the
    gradients typed exactly as the primals, and the outputs as varying as the inputs."""
    missing = frozenset().union(*map(_varying, like)) - _varying(x)
    return jax.lax.pcast(x, tuple(missing), to="varying") if missing else x


def _forward(call, name, q, k, v, cu_q, cu_k):
    full = _with_varlen(call, q, k, cu_q, cu_k)
    impl = REGISTRY.select(full, name)
    out, lse = (_vary_like(x, q, k, v) for x in impl.forward(full, q, k, v))
    return (out, lse), (q, k, v, out, lse, cu_q, cu_k)


def _backward(call, name, res, cotangents):
    q, k, v, out, lse, cu_q, cu_k = res
    dout, _ = cotangents  # lse is treated as non-differentiable, as in the torch op
    full = _with_varlen(call, q, k, cu_q, cu_k)
    impl = REGISTRY.select(full, name)
    dq, dk, dv = impl.backward(full, dout.astype(out.dtype), q, k, v, out, lse)
    return _vary_like(dq, q), _vary_like(dk, k), _vary_like(dv, v), None, None


_attention.defvjp(_forward, _backward)


def _run(call, q, k, v, cu_q, cu_k, return_lse, backend):
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    name = backend if backend is not None else get_backend()
    static = call.replace(varlen=None)  # hashable: the arrays travel as arguments
    out, lse = _attention(static, name, q, k, v, cu_q, cu_k)
    if return_lse:
        return out, jax.lax.stop_gradient(lse)
    return out


def attention(q, k, v, *, causal, scale, window, softcap, return_lse, backend):
    call = make_call(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap)
    return _run(call, q, k, v, None, None, return_lse, backend)


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    window,
    softcap,
    return_lse,
    backend,
):
    call = make_call(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
    )
    return _run(call, q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse, backend)
