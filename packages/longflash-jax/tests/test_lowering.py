"""The GPU lowering, checked without a GPU: every kernel must lower through Pallas' Triton
backend for the "cuda" platform (jax.export cross-lowers on any machine).

This catches what interpret mode cannot: operations the Triton lowering rejects, grids
over three dimensions (vmap adds one), block shapes it cannot express. Compiling the
emitted Triton IR to PTX (and timing it) is left to benchmarks/pallas_tune.py on a GPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from conftest import CROSS_LOWERING, NO_CROSS_LOWERING_REASON
from longflash.call import AttentionCall, Varlen, normalize_window
from longflash_jax import kernels
from longflash_jax.problem import problem_of, tiles_for

# The custom call a Pallas Triton kernel lowers to: the first up to jaxlib 0.10.2, the
# second after.
TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
CALL = re.compile(r"custom_call @(" + "|".join(re.escape(t) for t in TRITON_CALLS) + r")\(")

pytestmark = pytest.mark.skipif(not CROSS_LOWERING, reason=NO_CROSS_LOWERING_REASON)


def _call(
    B=1,
    N=256,
    Hq=4,
    Hk=4,
    D=128,
    Dv=128,
    causal=False,
    window=None,
    softcap=None,
    varlen=False,
    dtype="bfloat16",
):
    vl = Varlen(None, None, B * N, B * N) if varlen else None
    return AttentionCall(
        "jax",
        "cuda",
        dtype,
        B,
        N,
        N,
        Hq,
        Hk,
        D,
        Dv,
        causal,
        D**-0.5,
        normalize_window(causal, window),
        softcap,
        vl,
    )


def _export(fn, *avals) -> str:
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CALLS]
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*avals)
    return exp.mlir_module()


def _avals(call: AttentionCall, vmap: int = 0):
    p = problem_of(call)
    sd = jax.ShapeDtypeStruct
    dt = jnp.dtype(p.dtype)
    lead = (vmap,) if vmap else ()
    if p.varlen:
        q, k, v = (
            sd(lead + (p.Tq, p.Hq, p.Dqk), dt),
            sd(lead + (p.Tk, p.Hk, p.Dqk), dt),
            sd(lead + (p.Tk, p.Hk, p.Dv), dt),
        )
        o, lse = sd(lead + (p.Tq, p.Hq, p.Dv), dt), sd(lead + (p.Hq, p.Tq), jnp.float32)
        cu = (sd((p.B + 1,), jnp.int32),) * 2
    else:
        q, k, v = (
            sd(lead + (p.B, p.Nq, p.Hq, p.Dqk), dt),
            sd(lead + (p.B, p.Nk, p.Hk, p.Dqk), dt),
            sd(lead + (p.B, p.Nk, p.Hk, p.Dv), dt),
        )
        o, lse = sd(lead + (p.B, p.Nq, p.Hq, p.Dv), dt), sd(lead + (p.B, p.Hq, p.Nq), jnp.float32)
        cu = ()
    return p, cu, (q, k, v), (o, lse)


CASES = {
    "causal-gqa": dict(causal=True, Hq=8, Hk=2),
    "window-softcap-fp16": dict(window=(64, 16), softcap=20.0, dtype="float16"),
    "varlen-causal": dict(varlen=True, B=3, causal=True, Hq=4, Hk=1),
    "padded-dims": dict(D=96, Dv=40, N=200),
    "hd256": dict(D=256, Dv=256),
    # batch x heads above CUDA's 65535 limit for grid axis 1: the grid axes swap.
    "wide-grid": dict(B=4200, N=16, Hq=16, Hk=16, D=64, Dv=64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lowers_for_cuda(name):
    call = _call(**CASES[name])
    p, cu, qkv, (o, lse) = _avals(call)
    t = tiles_for(p)
    fwd = _export(lambda *a: kernels._forward(p, t, *a), *cu, *qkv)
    bwd = _export(lambda *a: kernels._backward(p, t, *a), *cu, o, *qkv, o, lse)
    assert len(CALL.findall(fwd)) == 1
    assert len(CALL.findall(bwd)) == 2


def test_vmap_lowers_for_cuda():
    # vmap adds a grid axis: the kernels' 2-D grids leave room for it (Triton allows 3).
    call = _call(causal=True, Hq=4, Hk=2)
    p, cu, qkv, (o, lse) = _avals(call, vmap=3)
    t = tiles_for(p)
    fwd = _export(jax.vmap(lambda *a: kernels._forward(p, t, *a)), *qkv)
    bwd = _export(jax.vmap(lambda *a: kernels._backward(p, t, *a)), o, *qkv, o, lse)
    assert len(CALL.findall(fwd)) == 1
    assert len(CALL.findall(bwd)) == 2
