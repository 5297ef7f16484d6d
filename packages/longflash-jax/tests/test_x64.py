"""The kernels under ``jax_enable_x64``, common in scientific JAX code.

With x64 on, a static index (a whole axis, a Python int) becomes int64 while the kernels'
traced indices are int32; the Pallas interpreter's masked store then fails in
``lax.dynamic_slice`` on the mixed types. Shapes here are chosen so that every kernel takes
its masked (edge-tile) stores: lengths that are not multiples of the tiles, and varlen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import longflash
import numpy as np
import pytest
from conftest import TOL, outputs_match, reference
from longflash.call import normalize_window


@pytest.fixture
def x64():
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        # Guards against the flag silently not taking effect: the test would then pass
        # without exercising x64 at all.
        assert jnp.arange(1).dtype == jnp.int64
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def _inputs(rng, shapes):
    return [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in shapes]


def _check(out, lse, grads, args, ref):
    # No float64 may leak into what the backend returns (DESIGN §3 dtypes).
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    for g, a in zip(grads, args):
        assert g.dtype == a.dtype and g.shape == a.shape
    outputs_match(out, lse, grads, ref, TOL["bfloat16"])


def _run(f, args, do):
    (out, lse), vjp = jax.vjp(f, *args)
    return out, lse, vjp((do, jnp.zeros_like(lse)))


@pytest.mark.parametrize("window", [None, (6, 3)], ids=["causal", "window"])
def test_batched_x64(x64, window):
    causal = window is None
    rng = np.random.default_rng(7)
    b, nq, nk, hq, hk, d = 2, 20, 27, 4, 2, 32
    q, k, v, do = _inputs(rng, [(b, nq, hq, d), (b, nk, hk, d), (b, nk, hk, d), (b, nq, hq, d)])

    def f(q, k, v):
        return longflash.attention(
            q, k, v, causal=causal, window=window, return_lse=True, backend="pallas"
        )

    out, lse, grads = _run(f, (q, k, v), do)
    ref = reference(q, k, v, do, scale=d**-0.5, window=normalize_window(causal, window))
    _check(out, lse, grads, (q, k, v), ref)


def test_varlen_x64(x64):
    rng = np.random.default_rng(8)
    lens_q, lens_k = [7, 13, 0], [9, 16, 5]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    hq, hk, d = 2, 1, 16
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v, do = _inputs(rng, [(tq, hq, d), (tk, hk, d), (tk, hk, d), (tq, hq, d)])
    cq, ck = jnp.asarray(cu_q), jnp.asarray(cu_k)

    def f(q, k, v):
        return longflash.attention_varlen(
            q,
            k,
            v,
            cq,
            ck,
            max_seqlen_q=max(lens_q),
            max_seqlen_k=max(lens_k),
            causal=True,
            return_lse=True,
            backend="pallas",
        )

    out, lse, grads = _run(f, (q, k, v), do)
    ref = reference(q, k, v, do, scale=d**-0.5, window=(None, 0), cu_q=cu_q, cu_k=cu_k)
    _check(out, lse, grads, (q, k, v), ref)
