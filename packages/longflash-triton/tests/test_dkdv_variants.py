"""The dK/dV kernel's loop bodies (key-major, query-major) and load paths (pointers, TMA)
against the float64 reference, whichever the tables pick.

Off the GPU the TMA paths run too: Triton's interpreter executes tensor-descriptor loads,
so the query-major 2-D maps (row = b * Nq + m, column = h * D) are checked here, with
B > 1 so that a map's box meets the next batch's rows.
"""

from __future__ import annotations

import dataclasses

import longflash
import pytest
import torch
from conftest import DEVICE, ON_GPU, TOL, ref_attention, ref_varlen, rel_err
from longflash_triton import configs, launch

CASES = [
    # (B, Nq, Nk, Hq, Hk, D, Dv, kwargs); lengths cross 16-row tiles unevenly
    (2, 53, 53, 2, 2, 32, 32, {}),
    (2, 45, 70, 4, 2, 32, 32, {"causal": True}),  # Nq < Nk, GQA
    (1, 70, 37, 2, 1, 32, 32, {"causal": True}),  # Nq > Nk: rows that see nothing, MQA
    (2, 64, 64, 2, 2, 16, 16, {"window": (20, 9)}),
    (1, 50, 61, 2, 2, 32, 32, {"softcap": 2.0, "causal": True}),
    (1, 40, 40, 2, 2, 40, 24, {"causal": True}),  # padded head dims: pointer path only
]

VARIANTS = {
    "key-major": dict(qmajor=False, tma=False),
    "key-major-tma": dict(qmajor=False, tma=True),
    "query-major": dict(qmajor=True, tma=False),
    "query-major-tma": dict(qmajor=True, tma=True),
}


@pytest.fixture
def dkdv_variant(request, monkeypatch):
    """Route every dK/dV launch to one variant; TMA allowed off the GPU as well."""
    opts = VARIANTS[request.param]
    real_pick = configs.pick

    def pick(kernel, arch_name, head_block, band, n=0):
        cfg = real_pick(kernel, arch_name, head_block, band, n)
        return dataclasses.replace(cfg, **opts) if kernel == "dkdv" else cfg

    monkeypatch.setattr(configs, "pick", pick)
    if not ON_GPU:
        real_ok = launch._tma_ok
        monkeypatch.setattr(launch, "_tma_ok", lambda cfg, arch, *a: real_ok(cfg, "sm90", *a))
    return opts


def _grads(out, inputs, ref_out):
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, do)
    ref = torch.autograd.grad(ref_out, inputs, do.double())
    return got, ref


@pytest.mark.parametrize("dkdv_variant", list(VARIANTS), indirect=True)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:7]}-{c[7]}")
def test_dkdv_variant(case, dkdv_variant, poison):
    b, nq, nk, hq, hk, d, dv, kw = case
    torch.manual_seed(nq * 131 + nk)
    dt = torch.bfloat16
    q = torch.randn(b, nq, hq, d, dtype=dt, device=DEVICE, requires_grad=True)
    k = torch.randn(b, nk, hk, d, dtype=dt, device=DEVICE, requires_grad=True)
    v = torch.randn(b, nk, hk, dv, dtype=dt, device=DEVICE, requires_grad=True)
    out = longflash.attention(q, k, v, backend="triton", **kw)
    ro, _ = ref_attention(q, k, v, **kw)
    got, ref = _grads(out, (q, k, v), ro)
    for name, a, r in zip(("dq", "dk", "dv"), got, ref):
        err = rel_err(a, r)
        assert err <= TOL[dt], f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("dkdv_variant", ["query-major", "query-major-tma"], indirect=True)
def test_dkdv_variant_varlen(dkdv_variant, poison):
    """Varlen never takes the TMA path; the query-major body still must see each
    sequence's own bounds (empty and length-1 sequences included)."""
    torch.manual_seed(7)
    dt = torch.float16
    lens_q, lens_k = [5, 0, 40, 1, 19], [9, 4, 33, 1, 0]
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), 4, 32, dtype=dt, device=DEVICE, requires_grad=True)
    k = torch.randn(int(cu_k[-1]), 2, 32, dtype=dt, device=DEVICE, requires_grad=True)
    v = torch.randn(int(cu_k[-1]), 2, 32, dtype=dt, device=DEVICE, requires_grad=True)
    kw = {"causal": True, "softcap": 4.0}
    out = longflash.attention_varlen(
        q, k, v, cu_q, cu_k, max_seqlen_q=40, max_seqlen_k=33, backend="triton", **kw
    )
    ro, _ = ref_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), **kw)
    got, ref = _grads(out, (q, k, v), ro)
    for name, a, r in zip(("dq", "dk", "dv"), got, ref):
        err = rel_err(a, r)
        assert err <= TOL[dt], f"{name}: relative error {err:.3e}"
