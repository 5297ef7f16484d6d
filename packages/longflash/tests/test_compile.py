"""The API under compilers: torch.compile(fullgraph=True) and jax.jit / grad / vmap.

The reference backend runs inside; what is tested is the front-ends (custom ops with fake
implementations and autograd, custom_vjp) and that compiled results equal eager ones.
"""

from __future__ import annotations

import longflash
import numpy as np
import pytest


# -- torch ------------------------------------------------------------------------------
def _torch_inputs(torch, b=2, nq=37, nk=45, hq=4, hk=2, d=16, dv=24):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, nq, hq, d, generator=g, requires_grad=True)
    k = torch.randn(b, nk, hk, d, generator=g, requires_grad=True)
    v = torch.randn(b, nk, hk, dv, generator=g, requires_grad=True)
    dout = torch.randn(b, nq, hq, dv, generator=g)
    return q, k, v, dout


def _fwd_bwd(torch, fn, q, k, v, dout):
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(), lse.detach()) + grads


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compiler):
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()

    def f(q, k, v):
        out, lse = longflash.attention(q, k, v, causal=True, return_lse=True, backend="reference")
        # something around the op, so the compiled graph is more than the op alone
        return out * 2.0 + 1.0, lse

    q, k, v, dout = _torch_inputs(torch)
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    got = _fwd_bwd(torch, compiled, q, k, v, dout)
    want = _fwd_bwd(torch, f, q, k, v, dout)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


def test_torch_compile_window_softcap_and_varlen():
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    q, k, v, dout = _torch_inputs(torch, b=1, nq=40, nk=40)
    qp, kp, vp = (t.detach()[0].clone().requires_grad_() for t in (q, k, v))
    cu = torch.tensor([0, 13, 13, 40], dtype=torch.int32)

    def f(q, k, v):
        a = longflash.attention(q, k, v, window=(5, 3), softcap=4.0, backend="reference")
        return a, a.sum(dim=-1)

    def fv(q, k, v):
        a = longflash.attention_varlen(
            q, k, v, cu, cu, max_seqlen_q=27, max_seqlen_k=27, causal=True, backend="reference"
        )
        return a, a.sum(dim=-1)

    for fn, args, d in ((f, (q, k, v), dout), (fv, (qp, kp, vp), dout[0])):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = _fwd_bwd(torch, compiled, *args, d)
        want = _fwd_bwd(torch, fn, *args, d)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_torch_compile_bakes_in_the_chosen_backend():
    """The backend in force at trace time is the one the compiled graph calls."""
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    q, k, v, _ = _torch_inputs(torch)

    def f(q, k, v):
        return longflash.attention(q, k, v)

    with longflash.use_backend("reference"):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))


def test_torch_eager_calls_skip_the_dispatcher_only_where_nothing_needs_it(monkeypatch):
    """Inference and the backward call the ops' implementations directly (same function, no
    dispatch); a call that records autograd, or runs under a dispatch mode, takes the op."""
    torch = pytest.importorskip("torch")
    from longflash.frontends import torch as fe
    from torch.utils._python_dispatch import TorchDispatchMode

    direct = {"fwd": 0, "bwd": 0}

    def counting(kind, impl):
        def run(*args):
            direct[kind] += 1
            return impl(*args)

        return run

    monkeypatch.setattr(fe, "_attention_fwd_impl", counting("fwd", fe._attention_fwd_impl))
    monkeypatch.setattr(fe, "_attention_bwd_impl", counting("bwd", fe._attention_bwd_impl))
    q, k, v, dout = _torch_inputs(torch)

    def attend(*args):
        return longflash.attention(*args, causal=True, return_lse=True, backend="reference")

    out, lse = attend(q, k, v)  # records autograd: the op
    assert direct == {"fwd": 0, "bwd": 0}
    grads = torch.autograd.grad(out, (q, k, v), dout)  # the backward itself: direct
    assert direct == {"fwd": 0, "bwd": 1}
    with torch.no_grad():
        out2, lse2 = attend(q, k, v)  # inference: direct, the same result
    assert direct == {"fwd": 1, "bwd": 1}
    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(lse2, lse.detach(), rtol=0, atol=0)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Seen() as mode:
        out3, _ = attend(q, k, v)  # a mode sees every op: the op, not the shortcut
    assert direct == {"fwd": 1, "bwd": 1}
    assert any("longflash.attention_fwd" in name for name in mode.ops), sorted(mode.ops)
    torch.testing.assert_close(out3, out2, rtol=0, atol=0)
    detached = [t.detach() for t in (q, k, v)]
    attend(*detached)  # grad enabled but nothing requires it: direct
    assert direct == {"fwd": 2, "bwd": 1}
    assert all(g.shape == t.shape for g, t in zip(grads, (q, k, v)))


# -- jax ---------------------------------------------------------------------------------
def _jax_inputs(lead=(), b=2, nq=37, nk=45, hq=4, hk=2, d=16, dv=24):
    import jax.numpy as jnp

    rng = np.random.default_rng(1)

    def x(*shape):
        return jnp.asarray(rng.standard_normal(lead + shape), jnp.float32)

    return x(b, nq, hq, d), x(b, nk, hk, d), x(b, nk, hk, dv), x(b, nq, hq, dv)


def test_jax_jit_grad_matches_eager():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    q, k, v, dout = _jax_inputs()

    def loss(q, k, v):
        out = longflash.attention(q, k, v, causal=True, softcap=3.0, backend="reference")
        return jnp.sum(out * dout)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    # and against the oracle, so that "equal" does not mean "equally wrong"
    from longflash.testing import attention_oracle

    ref = attention_oracle(q, k, v, dout, causal=True, softcap=3.0)
    for g, r in zip(got, (ref.dq, ref.dk, ref.dv)):
        assert np.linalg.norm(np.asarray(g) - r) <= 1e-4 * np.linalg.norm(r)


def test_jax_vmap_over_leading_axis():
    jax = pytest.importorskip("jax")

    q, k, v, dout = _jax_inputs(lead=(3,), b=1)

    def f(q, k, v):
        return longflash.attention(q, k, v, window=(8, None), backend="reference")

    got = jax.vmap(f)(q, k, v)
    assert got.shape == (3, 1, 37, 4, 24)
    one = jax.jit(f)  # per-slice references, compiled once
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(got[i]), np.asarray(one(q[i], k[i], v[i])), rtol=1e-6, atol=1e-6
        )

    # gradients through vmap as well
    def loss(q, k, v, d):
        return (f(q, k, v) * d).sum()

    gq = jax.jit(jax.vmap(jax.grad(loss)))(q, k, v, dout)
    grad_one = jax.jit(jax.grad(loss))
    for i in range(3):
        np.testing.assert_allclose(
            np.asarray(gq[i]), np.asarray(grad_one(q[i], k[i], v[i], dout[i])), rtol=1e-5, atol=1e-5
        )
