"""The Mosaic GPU forward, lowered for "cuda" without a GPU (jax >= 0.11 only).

Lowering a Mosaic GPU kernel on any machine runs Pallas' tracing, Mosaic's layout inference
and the lowering of its dialect to the GPU-level module in Python (for sm_90 when no GPU is
visible); only the last passes to PTX run later, inside XLA's compiler on a GPU. So this
catches wrong shapes, layouts, transforms and TMA slices of every routed shape class, not
deadlocks or numerics (benchmarks/pallas_mosaic.py checks those on the H200). The Pallas GPU
interpreter cannot run this kernel: it has no rule for run_state and takes wgmma operands
from shared memory only, while P comes from registers here.

CI's jax 0.10.2 skips the module (the kernel is written for the 0.11 API; 0.10's Mosaic GPU
also needs absl).
"""

from __future__ import annotations

import re

import pytest
from longflash.call import AttentionCall, normalize_window
from longflash_jax import mosaic_route
from longflash_jax.problem import problem_of

if mosaic_route._version_tuple(__import__("jax").__version__) < mosaic_route.MOSAIC_MIN_JAX:
    pytest.skip("the Mosaic GPU kernel needs jax >= 0.11", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from longflash_jax import mosaic  # noqa: E402

CALL = re.compile(r"custom_call @(mosaic_gpu\w*)\(")


def _problem(B=1, N=512, Nk=None, Hq=4, Hk=4, D=128, causal=False, dtype="bfloat16"):
    call = AttentionCall(
        "jax",
        "cuda",
        dtype,
        B,
        N,
        Nk or N,
        Hq,
        Hk,
        D,
        D,
        causal,
        D**-0.5,
        normalize_window(causal, None),
    )
    p = problem_of(call)
    assert mosaic_route.mosaic_reasons(p) == [], mosaic_route.mosaic_reasons(p)
    return p


CASES = {
    "hd128-full": dict(),
    "hd128-causal-gqa": dict(causal=True, Hq=8, Hk=2, B=2),
    "ragged-causal": dict(N=1000, Nk=1304, causal=True, Hq=4, Hk=1),
    "ragged-more-queries": dict(N=1304, Nk=1000, causal=True),
    "ragged-full": dict(N=1000, Nk=1000, B=2),
    "hd64-causal": dict(D=64, causal=True),
    "hd256-full-fp16": dict(D=256, dtype="float16"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_mosaic_forward_lowers_for_cuda(name):
    p = _problem(**CASES[name])
    tile = mosaic.MosaicTile(**mosaic_route.mosaic_tile(p))
    dt = jnp.dtype(p.dtype)
    sd = jax.ShapeDtypeStruct
    args = (
        sd((p.B, p.Nq, p.Hq, p.Dqk), dt),
        sd((p.B, p.Nk, p.Hk, p.Dqk), dt),
        sd((p.B, p.Nk, p.Hk, p.Dv), dt),
    )
    f = jax.jit(lambda q, k, v: mosaic.forward(p, tile, q, k, v))
    lowered = f.trace(*args).lower(lowering_platforms=("cuda",))
    out, lse = lowered.out_info
    assert out.shape == (p.B, p.Nq, p.Hq, p.Dv) and out.dtype == dt
    assert lse.shape == (p.B, p.Hq, p.Nq) and lse.dtype == jnp.float32
    assert len(CALL.findall(lowered.as_text())) == 1


def test_lengths_off_the_row_tile_do_not_lower():
    """Why mosaic_route declines N % 8 != 0: the (8, 64) TMA tiling refuses it."""
    call = AttentionCall("jax", "cuda", "bfloat16", 1, 300, 300, 2, 2, 128, 128, False, 0.1)
    p = problem_of(call)
    assert any("multiples of 8" in r for r in mosaic_route.mosaic_reasons(p))
    sd = jax.ShapeDtypeStruct((1, 300, 2, 128), jnp.bfloat16)
    f = jax.jit(lambda q, k, v: mosaic.forward(p, mosaic.MosaicTile(64, 128, 2), q, k, v))
    with pytest.raises(ValueError, match="multiple of its tiling 8"):
        f.trace(sd, sd, sd).lower(lowering_platforms=("cuda",))
