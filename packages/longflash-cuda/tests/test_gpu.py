"""GPU tests specific to the cuda backend (the shared suite covers the numerics): odd strides
are copied not misread, the deterministic backward repeats bitwise, empty problems, CUDA
graphs and torch.compile. Skipped without an sm_90 GPU."""

from __future__ import annotations

import math

import pytest
from longflash_cuda import backend

_ok, _why = backend.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"cuda backend unavailable: {_why}")

torch = pytest.importorskip("torch")


def _ref(q, k, v, causal):
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    g = qf.shape[1] // kf.shape[1]
    kf, vf = kf.repeat_interleave(g, 1), vf.repeat_interleave(g, 1)
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        nq, nk = s.shape[-2:]
        i = torch.arange(nq, device=s.device)[:, None]
        j = torch.arange(nk, device=s.device)[None, :]
        s = s.masked_fill(j > i + nk - nq, -math.inf)
    return (s.softmax(-1) @ vf).transpose(1, 2)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(autouse=True)
def _registered():
    from longflash.registry import REGISTRY

    REGISTRY.register(backend, replace=True)


def test_odd_strides_are_copied_not_misread():
    import longflash

    base = torch.randn(2, 200, 4, 130, device="cuda", dtype=torch.bfloat16)
    q = base[..., :128]  # head stride 130: not a multiple of 8 elements, TMA cannot read it
    k = torch.randn(2, 200, 4, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 200, 4, 128, device="cuda", dtype=torch.bfloat16)
    out = longflash.attention(q, k, v, causal=True, backend="cuda")
    assert _rel(out, _ref(q, k, v, True)) < 2e-2


def test_deterministic_backward_repeats_bitwise():
    from longflash.frontends import torch as lft
    from longflash_cuda import _torch

    q = torch.randn(1, 700, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 700, 2, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 700, 2, 128, device="cuda", dtype=torch.bfloat16)
    call = lft.make_call(q, k, v, causal=True)
    out, lse = _torch.forward(call, q, k, v)
    dout = torch.randn_like(out)
    first = _torch.backward(call, dout, q, k, v, out, lse, deterministic=True)
    for _ in range(3):
        again = _torch.backward(call, dout, q, k, v, out, lse, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    loose = _torch.backward(call, dout, q, k, v, out, lse, deterministic=False)
    assert all(_rel(a, b) < 1e-2 for a, b in zip(loose, first))


def test_no_keys_gives_zero_output_and_minus_inf_lse():
    import longflash

    q = torch.randn(1, 5, 2, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 0, 2, 64, device="cuda", dtype=torch.float16)
    out, lse = longflash.attention(q, k, k, return_lse=True, backend="cuda")
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_cuda_graph_and_compile():
    import longflash

    q, k, v = (
        torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )

    def f(a, b, c):
        return longflash.attention(a, b, c, causal=True, backend="cuda")

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.equal(eager, compiled)
    static = [x.detach().clone() for x in (q, k, v)]
    f(*static)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = f(*static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager.detach())


@pytest.mark.parametrize("variant", ["v2", "v3", "v5"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "nq,nk,hq,hk,causal,window",
    [
        (300, 300, 4, 4, False, None),
        (555, 200, 8, 2, True, None),  # bottom-right causal with empty query rows, GQA
        (40, 40, 2, 1, True, None),  # one 128-key block whose second half is past the keys
        (700, 700, 2, 2, False, (10, 10)),  # narrow band: half-blocks that see nothing
        (129, 1000, 4, 1, True, None),  # MQA, one query past a 128-query step (v5 at hd64)
    ],
)
def test_backward_variants_match_float64(monkeypatch, variant, d, nq, nk, hq, hk, causal, window):
    """Every LONGFLASH_CUDA_BWD variant (v5: 128-key blocks, hd64 and hd128) against float64
    autograd, with NaN-poisoned memory under the outputs so an unwritten element fails."""
    from longflash.frontends import torch as lft
    from longflash_cuda import _lib, _torch

    if (d, d) not in _lib.compiled_head_dims(_lib.load()[0])["bfloat16"]:
        pytest.skip(f"hd{d} bf16 is not in this build")
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", variant)
    torch.manual_seed(0)
    q = torch.randn(1, nq, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, nk, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, nk, hk, d, device="cuda", dtype=torch.bfloat16)
    call = lft.make_call(q, k, v, causal=causal, window=window)
    out, lse = _torch.forward(call, q, k, v)
    dout = torch.randn_like(out)
    poison = torch.full((1 << 26,), float("nan"), device="cuda")
    del poison
    grads = _torch.backward(call, dout, q, k, v, out, lse)

    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    g = hq // hk
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(g, 2)) * call.scale
    i = torch.arange(nq, device="cuda")[:, None]
    j = torch.arange(nk, device="cuda")[None, :]
    vis = torch.ones(nq, nk, dtype=torch.bool, device="cuda")
    if call.window is not None:
        left, right = call.window
        if right is not None:
            vis &= j - i <= nk - nq + right
        if left is not None:
            vis &= j - i >= nk - nq - left
    p = torch.softmax(s.masked_fill(~vis, -math.inf), -1).nan_to_num(0.0)
    ref = torch.einsum("bhqk,bkhd->bqhd", p, vd.repeat_interleave(g, 2))
    ref.backward(dout.double())
    for got, want in zip(grads, (qd.grad, kd.grad, vd.grad)):
        assert not torch.isnan(got).any()
        assert _rel(got, want) < 3e-2
