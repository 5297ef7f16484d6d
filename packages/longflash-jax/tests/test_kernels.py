"""What the shared conformance suite does not cover for this backend.

The suite (test_conformance.py) sweeps dtypes, masks, lengths, GQA, varlen and random
shapes on the CPU with head dims up to 96. Here, against the float64 oracle in conftest:
head dims the CPU suite skips (256, and 200/136, which are padded to 256 inside the
kernel), head dims below Triton's 16-wide tiles, scales the kernels cannot fold into exp2,
and a check that the comparison itself can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import longflash
import numpy as np
import pytest
from conftest import TOL, outputs_match, reference, rel_err
from longflash.call import normalize_window

CASES = {
    # name: B, Nq, Nk, Hq, Hk, Dqk, Dv, causal, window, softcap
    "hd8": (1, 20, 20, 2, 2, 8, 8, False, None, None),
    "hd256": (1, 33, 40, 1, 1, 256, 256, True, None, None),
    "hd200-dv136-window": (1, 20, 24, 2, 1, 200, 136, False, (5, 2), None),
}


def _inputs(rng, shapes, dtype):
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def _check(out, lse, grads, ref, dtype):
    outputs_match(out, lse, grads, ref, TOL[dtype])


def _run(f, args, do):
    (out, lse), vjp = jax.vjp(f, *args)
    grads = vjp((do, jnp.zeros_like(lse)))
    return out, lse, grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched(case):
    b, nq, nk, hq, hk, dqk, dv, causal, window, softcap = CASES[case]
    dtype = "bfloat16"
    rng = np.random.default_rng(len(case))
    q, k, v, do = _inputs(
        rng, [(b, nq, hq, dqk), (b, nk, hk, dqk), (b, nk, hk, dv), (b, nq, hq, dv)], dtype
    )

    def f(q, k, v):
        return longflash.attention(
            q,
            k,
            v,
            causal=causal,
            window=window,
            softcap=softcap,
            return_lse=True,
            backend="pallas",
        )

    out, lse, grads = _run(f, (q, k, v), do)
    ref = reference(
        q, k, v, do, scale=dqk**-0.5, window=normalize_window(causal, window), softcap=softcap
    )
    _check(out, lse, grads, ref, dtype)


def test_scale_not_folded():
    # scale <= 0 cannot be folded into exp2 (the running max would be taken on the wrong
    # side); the kernel then scales scores explicitly.
    rng = np.random.default_rng(3)
    q, k, v, do = _inputs(
        rng, [(1, 30, 2, 32), (1, 30, 2, 32), (1, 30, 2, 32), (1, 30, 2, 32)], "bfloat16"
    )
    for scale in (-0.2, 0.0):

        def f(q, k, v, scale=scale):
            return longflash.attention(
                q, k, v, scale=scale, causal=True, return_lse=True, backend="pallas"
            )

        out, lse, grads = _run(f, (q, k, v), do)
        ref = reference(q, k, v, do, scale=scale, window=(None, 0))
        _check(out, lse, grads, ref, "bfloat16")


def test_oracle_detects_a_wrong_answer():
    """The comparison can fail: a causal result checked against the non-causal oracle."""
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, [(1, 40, 2, 32)] * 3, "bfloat16")
    out = longflash.attention(q, k, v, causal=True, backend="pallas")
    ro, _, _ = reference(q, k, v, scale=32**-0.5)
    assert rel_err(out, ro) > 10 * TOL["bfloat16"]


def test_zero_length():
    q = jnp.zeros((1, 0, 2, 32), jnp.bfloat16)
    k = jnp.ones((1, 5, 2, 32), jnp.bfloat16)
    out, lse = longflash.attention(q, k, k, return_lse=True, backend="pallas")
    assert out.shape == (1, 0, 2, 32) and lse.shape == (1, 2, 0)
    q = jnp.ones((1, 3, 2, 32), jnp.bfloat16)
    k = jnp.zeros((1, 0, 2, 32), jnp.bfloat16)
    out, lse = longflash.attention(q, k, k, return_lse=True, backend="pallas")
    assert np.all(np.asarray(out, np.float32) == 0) and np.all(np.isneginf(lse))
    g = jax.grad(
        lambda q: longflash.attention(q, k, k, backend="pallas").astype(jnp.float32).sum()
    )(q)
    assert np.all(np.asarray(g, np.float32) == 0)
