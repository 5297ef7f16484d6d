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


def _backward_inputs(nq, nk, hq, hk, d, **mask):
    """Random bf16 q, k, v, the forward's out and lse, and a random dout."""
    from longflash.frontends import torch as lft
    from longflash_cuda import _torch

    q = torch.randn(1, nq, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, nk, hk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, nk, hk, d, device="cuda", dtype=torch.bfloat16)
    call = lft.make_call(q, k, v, **mask)
    out, lse = _torch.forward(call, q, k, v)
    return call, q, k, v, out, lse, torch.randn_like(out)


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
    from longflash_cuda import _torch

    call, q, k, v, out, lse, dout = _backward_inputs(700, 700, 8, 2, 128, causal=True)
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


@pytest.mark.parametrize(
    "variant,d",
    # Each variant at the head dims where it is its own kernel (v5, v7: hd64/hd128, v6, v8:
    # hd256); v2 at hd256 too, as v6's reference path.
    [(v, d) for v in ("v2", "v3", "v5", "v7") for d in (64, 128)]
    + [("v2", 256), ("v6", 256), ("v8", 256)]
    # both CTA orders (api.cpp bwd_head_group) whatever the mask
    + [(v, d) for v in ("v7+group3", "v7+heads") for d in (64, 128)]
    + [("v8+group3", 256), ("v8+heads", 256)],
)
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
    """Every LONGFLASH_CUDA_BWD variant (v5: 128-key blocks, hd64 and hd128; v7: v5 with the
    per-tile dQ accumulator; v6: hd256; v8: v6 with the per-tile accumulator) against float64
    autograd, with NaN-poisoned memory under the outputs so an unwritten element fails."""
    from longflash_cuda import _lib, _torch

    if (d, d) not in _lib.compiled_head_dims(_lib.load()[0])["bfloat16"]:
        pytest.skip(f"hd{d} bf16 is not in this build")
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", variant)
    torch.manual_seed(0)
    call, q, k, v, out, lse, dout = _backward_inputs(
        nq, nk, hq, hk, d, causal=causal, window=window
    )
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


@pytest.mark.parametrize("variant", ["timing-v6-no-dq-add", "timing-v6-no-dq"])
def test_hd256_dq_timing_variants_change_only_dq(monkeypatch, variant):
    """The hd256 timing variants (NOTES-cuda.md "hd256: what the dQ REDs cost") drop v6's dQ
    REDs, or its dQ GEMM too, and nothing else: dK and dV bitwise v6's, dQ left at zero."""
    from longflash_cuda import _lib, _torch

    if (256, 256) not in _lib.compiled_head_dims(_lib.load()[0])["bfloat16"]:
        pytest.skip("hd256 bf16 is not in this build")
    torch.manual_seed(0)
    call, q, k, v, out, lse, dout = _backward_inputs(555, 300, 4, 2, 256, causal=True)
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", "v6")
    dq6, dk6, dv6 = _torch.backward(call, dout, q, k, v, out, lse)
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", variant)
    dq, dk, dv = _torch.backward(call, dout, q, k, v, out, lse)
    assert torch.equal(dk, dk6) and torch.equal(dv, dv6)
    assert dq6.abs().max() > 0 and not dq.any()


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_backward_cta_order_changes_only_dq_summation(monkeypatch, d, causal):
    """Head-major and grouped grids (LONGFLASH_CUDA_BWD "+heads" / "+group<G>", api.cpp
    bwd_head_group) run the same CTAs in another order: dK and dV, each written by one CTA, are
    bitwise equal; dQ, summed in fp32 by reduces whose order follows the CTAs', agrees to
    rounding. 3 sequences x 2 kv heads make groups of 4 leave a short last group and groups of
    6 hold every pair; NaN-poisoned memory under the outputs catches a CTA that never ran."""
    from longflash.frontends import torch as lft
    from longflash_cuda import _lib, _torch

    if (d, d) not in _lib.compiled_head_dims(_lib.load()[0])["bfloat16"]:
        pytest.skip(f"hd{d} bf16 is not in this build")
    torch.manual_seed(0)
    q = torch.randn(3, 700, 8, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(3, 900, 2, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    call = lft.make_call(q, k, v, causal=causal)
    out, lse = _torch.forward(call, q, k, v)
    dout = torch.randn_like(out)
    grads = {}
    for order in ("heads", "group4", "group6", "group1"):
        monkeypatch.setenv("LONGFLASH_CUDA_BWD", f"default+{order}")
        poison = torch.full((1 << 26,), float("nan"), device="cuda")
        del poison
        grads[order] = _torch.backward(call, dout, q, k, v, out, lse)
    dq_h, dk_h, dv_h = grads.pop("heads")
    assert not any(torch.isnan(g).any() for g in (dq_h, dk_h, dv_h))
    for order, (dq, dk, dv) in grads.items():
        assert torch.equal(dk, dk_h) and torch.equal(dv, dv_h), order
        assert dq_h.abs().max() > 0 and _rel(dq, dq_h) < 1e-3, order


def _bwd_ref64(q, k, v, dout, scale, causal):
    """float64 (dq, dk, dv) of one dense (1, N, H, D) problem, bottom-right causal or unmasked."""
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(g, 2)) * scale
    if causal:
        nq, nk = q.shape[1], k.shape[1]
        i = torch.arange(nq, device=q.device)[:, None]
        j = torch.arange(nk, device=q.device)[None, :]
        s = s.masked_fill(j - i > nk - nq, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    torch.einsum("bhqk,bkhd->bqhd", p, vd.repeat_interleave(g, 2)).backward(dout.double())
    return qd.grad, kd.grad, vd.grad


@pytest.mark.parametrize(
    "variant,d", [("v7", 64), ("v7", 128), ("v8", 256), ("v7+heads", 64), ("v8+group2", 256)]
)
@pytest.mark.parametrize(
    "lq,lk,hq,hk,causal",
    [
        # Sequence starts off the tile grid (64 rows at hd128/hd256, 128 at hd64), lengths one
        # short of, at and one past a tile, an empty and a one-token sequence: v7/v8 pad each
        # sequence's tiles to floor(start / tile) + index, and the postprocess must skip the
        # padded rows.
        ([63, 65, 0, 1, 128, 129, 200], [70, 65, 9, 1, 128, 300, 200], 4, 2, True),
        ([127, 1, 64, 256, 3], [127, 40, 64, 256, 500], 2, 1, False),
    ],
)
def test_backward_tile_dq_varlen_matches_float64(monkeypatch, variant, d, lq, lk, hq, hk, causal):
    """LONGFLASH_CUDA_BWD=v7 (hd64/hd128) and v8 (hd256) on packed sequences whose starts and ends
    fall everywhere relative to their dQ tiles, against float64 per sequence, NaN-poisoned so an
    unwritten dq row fails."""
    from longflash_cuda import _lib, _torch

    if (d, d) not in _lib.compiled_head_dims(_lib.load()[0])["bfloat16"]:
        pytest.skip(f"hd{d} bf16 is not in this build")
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", variant)
    torch.manual_seed(0)
    q, k, v, call, (cu_q, cu_k) = _forward_inputs(
        d, 1, 0, 0, hq, hk, torch.bfloat16, (lq, lk), causal=causal
    )
    out, lse = _torch.forward(call, q, k, v)
    dout = torch.randn_like(out)
    poison = torch.full((1 << 26,), float("nan"), device="cuda")
    del poison
    dq, dk, dv = _torch.backward(call, dout, q, k, v, out, lse)
    torch.cuda.synchronize()
    want = [torch.zeros_like(x, dtype=torch.float64) for x in (q, k, v)]
    for i in range(len(lq)):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if qe > qs and ke > ks:
            a, b, c = _bwd_ref64(
                q[None, qs:qe],
                k[None, ks:ke],
                v[None, ks:ke],
                dout[None, qs:qe],
                call.scale,
                causal,
            )
            want[0][qs:qe], want[1][ks:ke], want[2][ks:ke] = a[0], b[0], c[0]
    for got, ref in zip((dq, dk, dv), want):
        assert not torch.isnan(got).any()
        assert _rel(got, ref) < 3e-2
    # Row by row too: a dq row of one sequence landing in another's would hide in the global norm.
    for i in range(len(lq)):
        qs, qe = int(cu_q[i]), int(cu_q[i + 1])
        if qe > qs and want[0][qs:qe].norm() > 0:
            assert _rel(dq[qs:qe], want[0][qs:qe]) < 3e-2


def _forward_inputs(d, b, nq, nk, hq, hk, dt, varlen, **kw):
    """Random (q, k, v) and their call: dense (b, n, h, d), or packed sequences of lengths
    varlen = (lq, lk). Returns q, k, v, call and the cu_seqlens pair (None when dense)."""
    from longflash.frontends import torch as lft

    if varlen is None:
        q = torch.randn(b, nq, hq, d, device="cuda", dtype=dt)
        k = torch.randn(b, nk, hk, d, device="cuda", dtype=dt)
        v = torch.randn(b, nk, hk, d, device="cuda", dtype=dt)
        return q, k, v, lft.make_call(q, k, v, **kw), None
    lq, lk = varlen
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32).cuda()
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32).cuda()
    q = torch.randn(sum(lq), hq, d, device="cuda", dtype=dt)
    k = torch.randn(sum(lk), hk, d, device="cuda", dtype=dt)
    v = torch.randn(sum(lk), hk, d, device="cuda", dtype=dt)
    call = lft.make_call(
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(lq),
        max_seqlen_k=max(lk),
        **kw,
    )
    return q, k, v, call, (cu_q, cu_k)


def _fwd_ref64(q, k, v, scale, window, softcap):
    """float64 forward on one dense (B, N, H, D) problem: (out, natural-log lse (B, H, Nq))."""
    qd, kd, vd = (x.double() for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(g, 2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    nq, nk = q.shape[1], k.shape[1]
    i = torch.arange(nq, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    vis = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if window is not None:
        left, right = window
        if right is not None:
            vis &= j - i <= nk - nq + right
        if left is not None:
            vis &= j - i >= nk - nq - left
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vd.repeat_interleave(g, 2)), lse


@pytest.mark.parametrize("variant", ["v3", "v3-no-pingpong", "v3-emu", "v3-ownkeys", "v2"])
@pytest.mark.parametrize(
    "dtype,b,nq,nk,hq,hk,causal,window,softcap,varlen",
    [
        ("bf16", 2, 300, 300, 4, 4, False, None, None, None),
        ("fp16", 1, 1000, 1000, 2, 2, False, None, None, None),
        # 192-query blocks: one past a block, exactly one, one short; bottom-right causal both ways
        # (Nq > Nk leaves rows with no key: out 0, lse -inf)
        ("bf16", 1, 193, 450, 4, 4, True, None, None, None),
        ("bf16", 1, 192, 192, 4, 2, True, None, None, None),
        ("fp16", 1, 385, 100, 8, 2, True, None, None, None),
        # narrow bands: whole warpgroups of a block see nothing in a key tile
        ("bf16", 1, 700, 700, 2, 2, False, (10, 10), None, None),
        ("fp16", 1, 576, 576, 2, 1, False, (0, 0), None, None),
        ("bf16", 1, 300, 700, 4, 1, False, (100, None), None, None),  # MQA, left-only window
        ("bf16", 1, 256, 256, 4, 2, True, None, 30.0, None),
        ("fp16", 1, 320, 700, 4, 2, False, None, 20.0, None),
        ("bf16", 1, 2048, 2048, 8, 2, True, None, None, None),  # the 4-stage ring wraps 4 times
        # varlen: empty, one-token and 192-edge sequences; causal, windowed + softcapped
        ("bf16", 1, 0, 0, 4, 2, True, None, None, ([192, 0, 193, 1, 383], [192, 50, 1, 1, 384])),
        ("fp16", 1, 0, 0, 4, 4, False, (90, 20), 15.0, ([129, 7, 300], [260, 7, 128])),
    ],
)
def test_forward_v3_hd64_matches_float64(
    monkeypatch, variant, dtype, b, nq, nk, hq, hk, causal, window, softcap, varlen
):
    """The hd64 forward kernels, each forced by LONGFLASH_CUDA_FWD (v3*: 192-query CTAs, three
    consumer warpgroups; v2: 128-query CTAs, two) against float64, out and lse, with
    NaN-poisoned memory under the outputs so an unwritten element fails."""
    from longflash_cuda import _lib, _torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float16
    key = "bfloat16" if dtype == "bf16" else "float16"
    if (64, 64) not in _lib.compiled_head_dims(_lib.load()[0])[key]:
        pytest.skip(f"hd64 {key} is not in this build")
    monkeypatch.setenv("LONGFLASH_CUDA_FWD", variant)
    torch.manual_seed(0)
    kw = dict(causal=causal, window=window, softcap=softcap)
    q, k, v, call, cu = _forward_inputs(64, b, nq, nk, hq, hk, dt, varlen, **kw)
    if varlen is not None:
        (lq, _), (cu_q, cu_k) = varlen, cu
    poison = torch.full((1 << 26,), float("nan"), device="cuda")
    del poison
    out, lse = _torch.forward(call, q, k, v)
    torch.cuda.synchronize()
    if varlen is None:
        ref, ref_lse = _fwd_ref64(q, k, v, call.scale, call.window, softcap)
    else:
        ref = torch.zeros_like(out, dtype=torch.float64)
        ref_lse = torch.full_like(lse, -math.inf, dtype=torch.float64)
        for i in range(len(lq)):
            qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            if qe > qs and ke > ks:
                o, l_ = _fwd_ref64(
                    q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], call.scale, call.window, softcap
                )
                ref[qs:qe], ref_lse[:, qs:qe] = o[0], l_[0]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel(out, ref) < (2e-2 if dtype == "bf16" else 5e-3)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out.transpose(-3, -2)[empty] == 0).all()  # rows that see no key: out exactly 0
    assert (lse.double()[~empty] - ref_lse[~empty]).abs().max().item() < 1e-2


def _lazy_events(s_log2, block, headroom=8.0):
    """(keeps above the reference, moves after the first block) of fwd.cuh's lazy rescale over
    scores s_log2 (rows x keys, log2 units, -inf hidden), key blocks visited last to first."""
    nk = s_log2.shape[-1]
    ref = torch.full(s_log2.shape[:-1], -math.inf, dtype=s_log2.dtype, device=s_log2.device)
    keeps_above = moves_late = 0
    for i, n in enumerate(reversed(range(0, nk, block))):
        mx = torch.maximum(ref, s_log2[..., n : n + block].amax(-1))
        move = mx > ref + headroom
        keeps_above += int((~move & (mx > ref)).sum())
        moves_late += int(move.sum()) if i > 0 else 0
        ref = torch.where(move, mx, ref)
    return keeps_above, moves_late


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "d, dv, block", [(256, 256, 64), (192, 192, 96), (192, 128, 96), (128, 128, 128)]
)
def test_lazy_rescale_follows_a_growing_maximum(dtype, causal, d, dv, block):
    """The hd128, hd192 and hd256 forwards keep each row's reference maximum until a score exceeds
    it by 2^8 (fwd.cuh kLazy). Random scores almost never move it after the first key block, so
    here they grow toward the first keys, which the kernel visits last, by ~5 (log2 units) a key
    block (64 keys at hd256, 96 at hd192, 128 at hd128): some blocks keep the reference with P up
    to 2^8, others move it and must rescale O. Dqk 192 with Dv 128 is eager (not measured lazy)
    and runs the same data as a check of its accuracy."""
    from longflash_cuda import _lib, _torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float16
    key = "bfloat16" if dtype == "bf16" else "float16"
    if (d, dv) not in _lib.compiled_head_dims(_lib.load()[0])[key]:
        pytest.skip(f"hd{d}x{dv} {key} is not in this build")
    torch.manual_seed(0)
    nq, nk, h = 300, 1000, 2
    u = torch.nn.functional.normalize(torch.randn(d, device="cuda"), dim=0)
    # q·k = 30·ramp along u, times the scale 1/sqrt(d), in log2 units: 5 per key block
    span = 5 * nk / block * math.log(2) * math.sqrt(d) / 30
    ramp = span * (1 - torch.arange(nk, device="cuda") / nk)
    q = (0.3 * torch.randn(1, nq, h, d, device="cuda") + 30 * u).to(dt)
    k = (0.3 * torch.randn(1, nk, h, d, device="cuda") + ramp[None, :, None, None] * u).to(dt)
    v = torch.randn(1, nk, h, dv, device="cuda", dtype=dt)
    from longflash.frontends import torch as lft

    call = lft.make_call(q, k, v, causal=causal)
    out, lse = _torch.forward(call, q, k, v)
    torch.cuda.synchronize()
    ref, ref_lse = _fwd_ref64(q, k, v, call.scale, call.window, None)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * call.scale / math.log(2)
    if causal:
        i = torch.arange(nq, device="cuda")[:, None]
        j = torch.arange(nk, device="cuda")[None, :]
        s = s.masked_fill(j > i + nk - nq, -math.inf)
    keeps_above, moves_late = _lazy_events(s, block)
    assert keeps_above > 1000 and moves_late > 1000  # the data does what the test is about
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert _rel(out, ref) < (2e-2 if dtype == "bf16" else 5e-3)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-2


@pytest.mark.parametrize(
    "b,nq,nk,hq,hk,causal,window,varlen",
    [
        (4, 4096, 4096, 4, 4, True, None, None),  # the bench's shape: 1.5 skipped blocks a tile
        (1, 1000, 3000, 4, 2, True, None, None),  # causal Nq < Nk
        (1, 3000, 1000, 4, 1, True, None, None),  # Nq > Nk: warpgroups with no key at all
        # a band: leading blocks skipped per warpgroup, the lowest ones left to the mask
        (1, 2000, 2000, 2, 2, False, (5, 60), None),
        (1, 0, 0, 4, 2, True, None, ([192, 0, 193, 1, 4000], [192, 50, 1, 1, 4100])),
    ],
)
def test_own_key_ranges_change_no_bit(monkeypatch, b, nq, nk, hq, hk, causal, window, varlen):
    """v3-ownkeys (fwd.cuh kOwnKeys) skips, per consumer warpgroup, the key blocks above its own
    rows, which the plain 192-query kernel computes masked to -inf. A row's state after such a
    block is its initial one (max -inf, sum 0, O 0), so out and lse must be bitwise those of
    v3-no-pingpong; a block skipped that a row needs changes them."""
    from longflash_cuda import _lib, _torch

    if (64, 64) not in _lib.compiled_head_dims(_lib.load()[0])["bfloat16"]:
        pytest.skip("hd64 bf16 is not in this build")
    torch.manual_seed(0)
    q, k, v, call, _ = _forward_inputs(
        64, b, nq, nk, hq, hk, torch.bfloat16, varlen, causal=causal, window=window
    )
    results = []
    for variant in ("v3-no-pingpong", "v3-ownkeys"):
        monkeypatch.setenv("LONGFLASH_CUDA_FWD", variant)
        poison = torch.full((1 << 26,), float("nan"), device="cuda")
        del poison
        results.append(_torch.forward(call, q, k, v))
        torch.cuda.synchronize()
    (out_a, lse_a), (out_b, lse_b) = results
    assert not torch.isnan(out_a).any()
    assert torch.equal(out_a, out_b)
    assert torch.equal(lse_a, lse_b)


_HD64_FWD_VARIANTS = ["default", "v3-no-pingpong", "v3", "v3-ownkeys", "v2"]
_PERSISTENT_CASES = [
    # d, b, nq, nk, hq, hk, causal, window, varlen
    # several rounds of the persistent grid (132 CTAs on an H200): 2 x 16 x 8 = 256 tiles
    (128, 2, 1000, 1000, 16, 16, True, None, None),
    (64, 3, 1500, 700, 16, 4, True, None, None),  # Nq > Nk: tiles with no key at all
    (128, 1, 700, 3000, 32, 8, False, (100, 0), None),
    (256, 2, 900, 900, 24, 24, True, None, None),
    (96, 2, 1200, 1200, 16, 2, False, None, None),
    # varlen: the grid is sized by the longest sequence, so most tiles of short ones are empty
    (128, 1, 0, 0, 24, 8, True, None, ([1500, 0, 1, 700, 129], [1500, 3, 1, 900, 128])),
    (64, 1, 0, 0, 32, 32, False, None, ([193, 2000, 0, 64], [400, 2000, 5, 64])),
]


_STREAM_K_CASES = [
    # d, b, nq, nk, hq, hk, fp16, ctas: tile counts that leave a partial last round
    (128, 2, 1000, 1000, 17, 17, False, None),  # 272 tiles on the whole GPU
    (128, 1, 1000, 1000, 7, 7, False, "5"),  # 56 tiles on 5 CTAs: tail pieces of 8 blocks
    (128, 1, 1000, 777, 7, 1, True, "3"),  # MQA, a partial key block, 56 tiles on 3 CTAs
    (64, 1, 4096, 4096, 7, 7, False, "5"),  # the 192-query kernel (22 tiles a head)
    (64, 2, 1500, 700, 16, 4, False, "7"),
    (256, 1, 640, 900, 9, 3, False, "4"),
    (96, 1, 1000, 1000, 5, 5, True, "6"),
]


@pytest.mark.parametrize("d, b, nq, nk, hq, hk, fp16, ctas", _STREAM_K_CASES)
def test_stream_k_forward_matches_the_static_schedule(
    monkeypatch, d, b, nq, nk, hq, hk, fp16, ctas
):
    """The stream-K tail (stream_k.h) computes the last tiles in two pieces on two CTAs and
    merges them, so out and lse equal the static schedule's to rounding, not bitwise; a split
    tile that nobody merges leaves NaN (the poisoned memory under the outputs) or a wrong row.
    Two runs are bitwise equal: the cut points depend on the shape and grid only."""
    import ctypes

    from longflash_cuda import _lib, _torch, make_params

    dt = torch.float16 if fp16 else torch.bfloat16
    if (d, d) not in _lib.compiled_head_dims(_lib.load()[0])[str(dt).removeprefix("torch.")]:
        pytest.skip(f"hd{d} is not in this build")
    torch.manual_seed(0)
    q, k, v, call, _ = _forward_inputs(d, b, nq, nk, hq, hk, dt, None, causal=False, window=None)
    if ctas is None:
        monkeypatch.delenv("LONGFLASH_CUDA_FWD_CTAS", raising=False)
    else:
        monkeypatch.setenv("LONGFLASH_CUDA_FWD_CTAS", ctas)
    results = {}
    for name in ("persistent", "streamk", "streamk"):
        monkeypatch.setenv("LONGFLASH_CUDA_FWD", f"+{name}")
        assert (
            _lib.load()[0]
            .lf_forward_plan(ctypes.byref(make_params(call)))
            .decode()
            .endswith(f"+{name}")
        )
        poison = torch.full((1 << 26,), float("nan"), device="cuda")
        del poison
        out, lse = _torch.forward(call, q, k, v)
        torch.cuda.synchronize()
        if name in results:
            assert torch.equal(out, results[name][0]) and torch.equal(lse, results[name][1])
        results[name] = (out, lse)
    (out_s, lse_s), (out_k, lse_k) = results["persistent"], results["streamk"]
    assert not torch.isnan(out_k).any() and not torch.isnan(lse_k).any()
    tol = 5e-3 if fp16 else 2e-2
    assert _rel(out_k, out_s) < tol / 4
    assert (lse_k - lse_s).abs().max().item() < 1e-4
    ref, ref_lse = _fwd_ref64(q, k, v, call.scale, call.window, None)
    assert _rel(out_k, ref) < tol
    assert (lse_k.double() - ref_lse).abs().max().item() < 1e-2


@pytest.mark.parametrize("sched", ["persistent", "dynamic", "dynamic+g3"])
@pytest.mark.parametrize(
    "fwd, d, b, nq, nk, hq, hk, causal, window, varlen",
    [
        (fwd, *case)
        for case in _PERSISTENT_CASES
        for fwd in (_HD64_FWD_VARIANTS if case[0] == 64 else ["default"])
    ],
)
def test_persistent_forward_equals_one_cta_per_tile(
    monkeypatch, sched, fwd, d, b, nq, nk, hq, hk, causal, window, varlen
):
    """The persistent forward (one CTA per SM walking the tiles, on the static or the dynamic
    schedule) computes each tile exactly as a grid of one CTA per tile does, so out and lse must
    be bitwise equal, also with the grid capped at 5 CTAs (LONGFLASH_CUDA_FWD_CTAS); NaN-poisoned
    memory under the outputs catches a tile that no CTA takes. "dynamic+g3" walks the dynamic
    schedule's longest-first order in groups of 3 (head, sequence) pairs, the last group short.
    (v3, v3-emu and v3-ownkeys have no dynamic schedule and run the static one for it.)"""
    from longflash_cuda import _lib, _torch

    if (d, d) not in _lib.compiled_head_dims(_lib.load()[0])["bfloat16"]:
        pytest.skip(f"hd{d} bf16 is not in this build")
    torch.manual_seed(0)
    q, k, v, call, _ = _forward_inputs(
        d, b, nq, nk, hq, hk, torch.bfloat16, varlen, causal=causal, window=window
    )
    results = []
    # the grid as sized for the GPU, then capped at 5 CTAs (dozens of tiles each), then one CTA
    # per tile
    for grid, ctas in ((sched, None), (sched, "5"), ("grid", None)):
        monkeypatch.setenv("LONGFLASH_CUDA_FWD", f"{fwd}+{grid}")
        if ctas is None:
            monkeypatch.delenv("LONGFLASH_CUDA_FWD_CTAS", raising=False)
        else:
            monkeypatch.setenv("LONGFLASH_CUDA_FWD_CTAS", ctas)
        poison = torch.full((1 << 26,), float("nan"), device="cuda")
        del poison
        out, lse = _torch.forward(call, q, k, v)
        torch.cuda.synchronize()
        results.append((out, lse))
    (out_p, lse_p), *others = results
    assert not torch.isnan(out_p).any() and not torch.isnan(lse_p).any()
    for out_g, lse_g in others:
        assert torch.equal(out_p, out_g)
        assert torch.equal(lse_p, lse_g)
    if varlen is None:  # and both equal the float64 reference
        ref, ref_lse = _fwd_ref64(q, k, v, call.scale, call.window, None)
        assert _rel(out_p, ref) < 2e-2
        empty = torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse_p), empty)
        assert (lse_p.double()[~empty] - ref_lse[~empty]).abs().max().item() < 1e-2
