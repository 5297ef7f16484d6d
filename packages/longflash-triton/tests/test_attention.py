"""Forward, lse and gradients of the triton backend against a float64 reference.

Covers every feature of DESIGN §2 on shapes small enough for the interpreter: dtypes,
head dims (non-powers of two, Dqk != Dv), Nq != Nk with causal/window alignment, softcap,
scale, GQA/MQA, varlen (empty and length-1 sequences), rows that see nothing, odd strides.
"""

from __future__ import annotations

import longflash
import pytest
import torch
from conftest import DEVICE, ON_GPU, TOL, ref_attention, ref_varlen, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _rand(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _check(dtype, got, ref, what):
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e}"


def _run(q, k, v, **kw):
    """Our out/lse/grads and the float64 reference's, compared element-wise."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = longflash.attention(q, k, v, return_lse=True, backend="triton", **kw)
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    ro, rlse = ref_attention(q, k, v, **kw)
    rdq, rdk, rdv = torch.autograd.grad(ro, (q, k, v), do.double())
    dt = q.dtype
    assert out.dtype == dt and lse.dtype == torch.float32
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    for name, a, b in (
        ("out", out, ro),
        ("lse", lse, rlse),
        ("dq", dq, rdq),
        ("dk", dk, rdk),
        ("dv", dv, rdv),
    ):
        _check(dt, a, b, name)
    return out, lse, (dq, dk, dv)


CASES = [
    # (B, Nq, Nk, Hq, Hk, D, Dv, kwargs)
    (2, 37, 37, 2, 2, 32, 32, {}),
    (1, 37, 37, 2, 2, 32, 32, {"causal": True}),
    (1, 29, 51, 2, 1, 40, 24, {"causal": True}),  # Nq < Nk, MQA, Dqk != Dv, non-pow2
    (1, 51, 23, 4, 2, 24, 40, {"causal": True}),  # Nq > Nk: leading rows see nothing
    (1, 45, 45, 3, 1, 16, 16, {"window": (7, 5)}),
    (1, 33, 47, 2, 2, 32, 32, {"window": (4, None)}),
    (1, 47, 33, 2, 2, 32, 32, {"window": (None, 2)}),
    (1, 40, 40, 2, 2, 16, 16, {"window": (0, 0)}),
    (1, 40, 48, 2, 2, 16, 16, {"causal": True, "window": (9, 3)}),  # causal wins: right=0
    (1, 35, 35, 4, 2, 32, 32, {"softcap": 3.0}),
    (1, 35, 42, 2, 2, 32, 32, {"softcap": 0.7, "causal": True, "scale": 0.4}),
    (1, 34, 34, 2, 2, 32, 32, {"scale": -0.25}),
    (1, 20, 20, 1, 1, 96, 96, {"causal": True}),
    (1, 18, 18, 1, 1, 256, 256, {"window": (3, 3)}),
    (1, 18, 18, 1, 1, 8, 8, {}),
    (1, 1, 30, 2, 2, 32, 32, {"causal": True}),  # one query row
    (1, 30, 1, 2, 2, 32, 32, {"causal": True}),  # one key
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:7]}-{c[7]}")
def test_attention(case, dtype, poison):
    b, nq, nk, hq, hk, d, dv, kw = case
    torch.manual_seed(hash((case[:7], dtype)) % 2**31)
    _run(
        _rand(b, nq, hq, d, dtype=dtype),
        _rand(b, nk, hk, d, dtype=dtype),
        _rand(b, nk, hk, dv, dtype=dtype),
        **kw,
    )


@pytest.mark.skipif(ON_GPU, reason="check() declines float32 on a GPU (test_kernels tests that)")
@pytest.mark.parametrize("kw", [{}, {"causal": True, "softcap": 2.0}, {"window": (3, 6)}])
def test_float32(kw, poison):
    torch.manual_seed(0)
    _run(
        _rand(1, 26, 2, 32, dtype=torch.float32),
        _rand(1, 31, 1, 32, dtype=torch.float32),
        _rand(1, 31, 1, 48, dtype=torch.float32),
        **kw,
    )


def test_rows_that_see_nothing(poison):
    """Nq > Nk with causal: the first Nq - Nk rows see no key. out 0, lse -inf, no NaN, and
    those rows contribute nothing to dK/dV."""
    torch.manual_seed(1)
    dt = torch.float16
    q, k, v = (
        _rand(1, 40, 2, 32, dtype=dt),
        _rand(1, 17, 2, 32, dtype=dt),
        _rand(1, 17, 2, 32, dtype=dt),
    )
    out, lse, (dq, dk, dv) = _run(q, k, v, causal=True)
    blind = 40 - 17
    assert torch.all(out[:, :blind] == 0)
    assert torch.all(lse[:, :, :blind] == float("-inf"))
    assert torch.all(dq[:, :blind] == 0)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()


def test_keys_nobody_sees_get_zero_grads(poison):
    # window (2, 0) with Nk > Nq: the first keys lie left of every query's window
    torch.manual_seed(2)
    dt = torch.bfloat16
    q, k, v = (
        _rand(1, 20, 2, 32, dtype=dt),
        _rand(1, 50, 2, 32, dtype=dt),
        _rand(1, 50, 2, 32, dtype=dt),
    )
    _, _, (_, dk, dv) = _run(q, k, v, window=(2, 0))
    assert torch.all(dk[:, : 50 - 20 - 2] == 0) and torch.all(dv[:, : 50 - 20 - 2] == 0)


def test_non_contiguous(poison):
    """Inputs viewed from a (B, H, N, D) layout: head stride < token stride is read right."""
    torch.manual_seed(3)
    dt = torch.float16
    q = _rand(2, 4, 33, 32, dtype=dt).transpose(1, 2)
    k = _rand(2, 2, 41, 32, dtype=dt).transpose(1, 2)
    v = _rand(2, 41, 2, 64, dtype=dt)[..., ::2]  # unit stride lost: the front-end copies
    assert not q.is_contiguous() and v.stride(-1) == 2
    _run(q, k, v, causal=True)


VARLEN = [
    # (lens_q, lens_k, Hq, Hk, D, Dv, kwargs)
    ([5, 0, 33, 1, 17], [9, 4, 33, 1, 0], 2, 1, 32, 32, {}),
    ([5, 0, 33, 1, 17], [9, 4, 33, 1, 20], 4, 2, 32, 24, {"causal": True}),
    ([18, 31, 2], [18, 12, 40], 2, 2, 16, 16, {"window": (5, 2), "softcap": 2.5}),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"{c[0]}-{c[1]}-{c[6]}")
def test_varlen(case, dtype, poison):
    lens_q, lens_k, hq, hk, d, dv, kw = case
    torch.manual_seed(len(lens_q) + hq)
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = _rand(tq, hq, d, dtype=dtype).requires_grad_()
    k = _rand(tk, hk, d, dtype=dtype).requires_grad_()
    v = _rand(tk, hk, dv, dtype=dtype).requires_grad_()
    out, lse = longflash.attention_varlen(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
        return_lse=True,
        backend="triton",
        **kw,
    )
    assert out.shape == (tq, hq, dv) and lse.shape == (hq, tq)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ro, rlse = ref_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), **kw)
    rgrads = torch.autograd.grad(ro, (q, k, v), do.double())
    _check(dtype, out, ro, "out")
    _check(dtype, lse, rlse, "lse")
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        _check(dtype, a, b, name)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    nq=st.integers(1, 40),
    nk=st.integers(1, 40),
    group=st.sampled_from([1, 2]),
    d=st.sampled_from([16, 24, 48]),
    causal=st.booleans(),
    left=st.one_of(st.none(), st.integers(0, 20)),
    right=st.one_of(st.none(), st.integers(0, 20)),
    softcap=st.one_of(st.none(), st.floats(0.5, 20.0)),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(nq, nk, group, d, causal, left, right, softcap, seed):
    torch.manual_seed(seed)
    dt = torch.float16
    window = None if left is None and right is None else (left, right)
    _run(
        _rand(1, nq, 2 * group, d, dtype=dt),
        _rand(1, nk, 2, d, dtype=dt),
        _rand(1, nk, 2, d, dtype=dt),
        causal=causal,
        window=window,
        softcap=softcap,
    )
