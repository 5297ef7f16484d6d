"""Focused tests of the reference backend: both paths, both frameworks.

The yardstick is `naive`, a float64 PyTorch attention written from the mask rule of
DESIGN §2 (an explicit (i, j) predicate, sequences looped over one by one) and
differentiated by torch.autograd; it shares no code with the backend. The shared
conformance suite (longflash.testing) covers the full feature matrix; these tests pin the
backend's own machinery: the blockwise tiling and tile skipping, the closed-form
backward, rows that see no key, float64 accuracy, path selection, and JAX tracing.
"""

from __future__ import annotations

import subprocess
import sys

import longflash
import numpy as np
import pytest
import torch
from longflash import reference
from longflash.frontends import torch as torch_frontend
from longflash.reference import _torch as ref_torch

# Small tiles so that tiny inputs span several tiles with ragged edges.
BLOCKS = {"block_q": 8, "block_k": 16}
PATHS = ["exact", "blockwise"]


# -- the yardstick -----------------------------------------------------------------------
def naive(q, k, v, *, causal=False, window=None, softcap=None, scale=None):
    """Float64 attention over (B, N, H, D) with the mask of DESIGN §2; (out, lse)."""
    b, nq, hq, d = q.shape
    nk, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    kk = k.repeat_interleave(hq // hk, dim=2)
    vv = v.repeat_interleave(hq // hk, dim=2)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0
    off = nk - nq
    vis = torch.tensor(
        [
            [
                (left is None or j >= i + off - left) and (right is None or j <= i + off + right)
                for j in range(nk)
            ]
            for i in range(nq)
        ],
        dtype=torch.bool,
    ).reshape(nq, nk)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    # The max only stabilises exp; detaching it leaves the gradient exact.
    m = s.masked_fill(~vis, float("-inf")).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), 0.0, m)
    e = torch.exp(s - m) * vis
    rowsum = e.sum(-1, keepdim=True)
    out = torch.einsum("bhij,bjhd->bihd", e / torch.where(rowsum == 0, 1.0, rowsum), vv)
    lse = torch.where(rowsum == 0, float("-inf"), m + torch.log(rowsum)).squeeze(-1)
    return out, lse


def naive_varlen(q, k, v, cu_q, cu_k, **kwargs):
    """Each packed sequence through `naive` on its own: (out (Tq, H, Dv), lse (H, Tq))."""
    outs, lses = [], []
    for (a, b), (c, d) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        if b == a:
            continue
        if d == c:
            outs.append(q.new_zeros((b - a, q.shape[1], v.shape[2])))
            lses.append(q.new_full((q.shape[1], b - a), float("-inf")))
            continue
        o, lse = naive(q[None, a:b], k[None, c:d], v[None, c:d], **kwargs)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def rel(a, b) -> float:
    """Relative Frobenius error of a against b (both finite)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "non-finite values"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_lse(lse, expected, tol):
    lse, expected = np.asarray(lse, np.float64), np.asarray(expected, np.float64)
    assert not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected))
    seen = np.isfinite(expected)
    assert rel(lse[seen], expected[seen]) < tol


def _t(x, dtype=torch.float64):
    return torch.as_tensor(np.asarray(x)).to(dtype)


# Dense cases: (Nq, Nk, Hq, Hk, Dqk, Dv, kwargs). Lengths are not multiples of the tiles.
CASES = {
    "plain": (37, 53, 4, 4, 16, 16, {}),
    "causal-Nq<Nk-gqa-dv": (37, 53, 4, 2, 16, 8, {"causal": True}),
    "causal-Nq>Nk-empty-rows": (53, 37, 2, 2, 8, 8, {"causal": True}),
    "window-mqa": (29, 41, 4, 1, 8, 8, {"window": (5, 3)}),
    "left-only-softcap": (41, 29, 2, 1, 8, 12, {"window": (7, None), "softcap": 1.5}),
    "right-only-scale": (29, 41, 2, 2, 8, 8, {"window": (None, 2), "scale": 0.7}),
    "causal-window-softcap": (
        40,
        40,
        2,
        2,
        8,
        8,
        {"causal": True, "window": (6, 4), "softcap": 2.0},
    ),
}
# Varlen: lengths with an empty sequence, a key-less sequence and length-1 sequences.
CU_Q = [0, 5, 5, 6, 20, 21]
CU_K = [0, 9, 12, 12, 30, 31]
VARLEN_KWARGS = {
    "none": {},
    "causal": {"causal": True},
    "window-softcap": {"window": (2, 1), "softcap": 3.0},
}


def _inputs(rng, nq, nk, hq, hk, dqk, dv, batch=(2,)):
    return (
        rng.standard_normal((*batch, nq, hq, dqk)),
        rng.standard_normal((*batch, nk, hk, dqk)),
        rng.standard_normal((*batch, nk, hk, dv)),
    )


def _torch_run(path, q, k, v, dout, cu=None, **kwargs):
    """out, lse, (dq, dk, dv) from the reference through the public torch API."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    with reference.force_path(path, **BLOCKS):
        if cu is None:
            out, lse = longflash.attention(q, k, v, return_lse=True, backend="reference", **kwargs)
        else:
            cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in cu)
            out, lse = longflash.attention_varlen(
                q, k, v, cu_q, cu_k, return_lse=True, backend="reference", **kwargs
            )
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), lse, grads


def _naive_run(q, k, v, dout, cu=None, **kwargs):
    q, k, v = (x.detach().to(torch.float64).requires_grad_(True) for x in (q, k, v))
    if cu is None:
        out, lse = naive(q, k, v, **kwargs)
    else:
        out, lse = naive_varlen(q, k, v, *cu, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(torch.float64))
    return out.detach(), lse.detach(), grads


# -- the backend object and path selection -----------------------------------------------
def test_import_longflash_imports_no_framework():
    code = (
        "import sys, longflash, longflash.reference as r\n"
        "from longflash.call import AttentionCall\n"
        "call = AttentionCall('torch', 'cpu', 'float32', 1, 8, 8, 2, 2, 4, 4, False, 0.5)\n"
        "assert r.backend.available() == (True, '') and r.backend.check(call) == []\n"
        "assert r.choose_path(call) == 'exact'\n"
        "bad = [m for m in ('torch', 'jax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_backend_declares_itself():
    b = reference.backend
    assert b.name == "reference" and b.priority == -100
    assert b.frameworks == {"torch", "jax"}
    assert {"cpu", "cuda"} <= b.devices
    assert b.available() == (True, "")
    info = {i.name: i for i in longflash.backends()}["reference"]
    assert info.available and info.frameworks == b.frameworks


def test_check_gives_reasons():
    q = torch.zeros(1, 4, 2, 8)
    call = torch_frontend.make_call(q, q, q)
    assert reference.backend.check(call) == []
    reasons = reference.backend.check(call.replace(device="mps", dtype="int8"))
    assert any("mps" in r for r in reasons) and any("int8" in r for r in reasons)


def test_choose_path(monkeypatch):
    q = torch.zeros(2, 64, 4, 8)
    small = torch_frontend.make_call(q, q, q)
    big = small.replace(Nq=4096, Nk=4096, Hq=8)  # 2*8*4096**2 = 2**28 scores
    monkeypatch.delenv(reference.PATH_ENV, raising=False)
    assert reference.choose_path(small, reference.settings().path) == "exact"
    assert reference.choose_path(big, reference.settings().path) == "blockwise"
    with reference.force_path("blockwise", block_q=4):
        assert reference.settings() == reference.Settings("blockwise", 4, 1024)
        assert reference.choose_path(small, reference.settings().path) == "blockwise"
        with reference.force_path("exact"):  # inner block keeps the outer tile sizes
            assert reference.settings() == reference.Settings("exact", 4, 1024)
    monkeypatch.setenv(reference.PATH_ENV, "blockwise")
    assert reference.settings().path == "blockwise"
    with reference.force_path("auto"):  # code beats the environment
        assert reference.choose_path(small, reference.settings().path) == "exact"
    monkeypatch.setenv(reference.PATH_ENV, "fast")
    with pytest.raises(ValueError, match=reference.PATH_ENV):
        reference.settings()
    with pytest.raises(ValueError, match="path"):
        with reference.force_path("tiled"):
            pass
    with pytest.raises(ValueError, match="block_k"):
        with reference.force_path("exact", block_k=0):
            pass


def test_env_var_reaches_the_call(monkeypatch):
    """LONGFLASH_REFERENCE_PATH picks the path a real call takes."""
    taken = []
    for name in ("_forward_exact", "_forward_blockwise"):
        fn = getattr(ref_torch, name)
        monkeypatch.setattr(
            ref_torch, name, lambda *a, _fn=fn, _n=name, **kw: taken.append(_n) or _fn(*a, **kw)
        )
    q = torch.randn(1, 8, 2, 4)
    for path in PATHS:
        monkeypatch.setenv(reference.PATH_ENV, path)
        longflash.attention(q, q, q, backend="reference")
    assert taken == ["_forward_exact", "_forward_blockwise"]


# -- torch -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_torch_float64_matches_naive(path, case):
    nq, nk, hq, hk, dqk, dv, kwargs = CASES[case]
    rng = np.random.default_rng(0)
    q, k, v = (_t(x) for x in _inputs(rng, nq, nk, hq, hk, dqk, dv))
    dout = _t(rng.standard_normal((2, nq, hq, dv)))
    out, lse, grads = _torch_run(path, q, k, v, dout, **kwargs)
    n_out, n_lse, n_grads = _naive_run(q, k, v, dout, **kwargs)
    assert out.dtype == torch.float64 and lse.dtype == torch.float32
    assert rel(out, n_out) < 1e-12
    assert_lse(lse, n_lse, 1e-6)  # lse is float32 by contract
    for g, n in zip(grads, n_grads):
        assert g.dtype == torch.float64
        assert rel(g, n) < 1e-12


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mask", list(VARLEN_KWARGS))
def test_torch_varlen_float64_matches_naive(path, mask):
    kwargs = VARLEN_KWARGS[mask]
    rng = np.random.default_rng(1)
    q, k, v = (_t(x) for x in _inputs(rng, CU_Q[-1], CU_K[-1], 4, 2, 8, 8, batch=()))
    dout = _t(rng.standard_normal((CU_Q[-1], 4, 8)))
    out, lse, grads = _torch_run(path, q, k, v, dout, cu=(CU_Q, CU_K), **kwargs)
    n_out, n_lse, n_grads = _naive_run(q, k, v, dout, cu=(CU_Q, CU_K), **kwargs)
    assert lse.shape == (4, CU_Q[-1])
    assert rel(out, n_out) < 1e-12
    assert_lse(lse, n_lse, 1e-6)
    for g, n in zip(grads, n_grads):
        assert rel(g, n) < 1e-12


@pytest.mark.parametrize("path", PATHS)
def test_torch_gradcheck(path):
    """The closed-form backward against finite differences, tiny float64 inputs, with
    rows that see no key (Nq > Nk under causal), GQA, softcap and a window."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    def dense(q, k, v):
        return longflash.attention(
            q, k, v, causal=True, window=(3, None), softcap=1.2, backend="reference"
        )

    cu_q, cu_k = (
        torch.tensor([0, 3, 3, 7], dtype=torch.int32),
        torch.tensor([0, 2, 5, 9], dtype=torch.int32),
    )

    def packed(q, k, v):
        return longflash.attention_varlen(q, k, v, cu_q, cu_k, window=(1, 2), backend="reference")

    with reference.force_path(path, block_q=2, block_k=3):
        assert torch.autograd.gradcheck(
            dense, (rand(1, 7, 4, 3), rand(1, 5, 2, 3), rand(1, 5, 2, 2))
        )
        assert torch.autograd.gradcheck(packed, (rand(7, 2, 3), rand(9, 1, 3), rand(9, 1, 2)))


@pytest.mark.parametrize(
    "mask",
    [{"causal": True}, {"window": (4, 0)}, {"window": (None, 5), "softcap": 2.0}],
    ids=["causal", "window", "right-softcap"],
)
@pytest.mark.parametrize("gqa", [(6, 3), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("lens", [(77, 130), (130, 77)], ids=["Nq<Nk", "Nq>Nk"])
def test_torch_blockwise_equals_exact_float32(mask, gqa, lens):
    nq, nk = lens
    hq, hk = gqa
    rng = np.random.default_rng(2)
    q, k, v = (_t(x, torch.float32) for x in _inputs(rng, nq, nk, hq, hk, 16, 24))
    dout = _t(rng.standard_normal((2, nq, hq, 24)), torch.float32)
    out_e, lse_e, grads_e = _torch_run("exact", q, k, v, dout, **mask)
    with reference.force_path("blockwise", block_q=32, block_k=16):
        out_b, lse_b, grads_b = _torch_run("blockwise", q, k, v, dout, **mask)
    assert rel(out_b, out_e) < 1e-6
    assert_lse(lse_b, lse_e, 1e-6)
    for b, e in zip(grads_b, grads_e):
        assert b.dtype == torch.float32
        assert rel(b, e) < 1e-5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_rows_that_see_no_key(path, dtype):
    """Rows with an empty window: out exactly 0, lse -inf, zero dq, no NaN anywhere, and
    the other rows unaffected by them."""
    rng = np.random.default_rng(3)
    nq, nk = 10, 4
    q, k, v = (_t(x, dtype) for x in _inputs(rng, nq, nk, 2, 1, 8, 8))
    dout = _t(rng.standard_normal((2, nq, 2, 8)), dtype)
    # off = -6 and window (0, 0): query i sees key i - 6 only; rows 0..5 see nothing.
    out, lse, (dq, dk, dv) = _torch_run(path, q, k, v, dout, window=(0, 0))
    for x in (out, dq, dk, dv):
        assert not torch.isnan(x).any()
    assert (out[:, :6] == 0).all() and (dq[:, :6] == 0).all()
    assert torch.isneginf(lse[:, :, :6]).all() and torch.isfinite(lse[:, :, 6:]).all()
    # Each later row sees exactly one key: its output is that key's value row.
    torch.testing.assert_close(
        out[:, 6:].float(), v.repeat_interleave(2, 2).float(), rtol=0, atol=0
    )


@pytest.mark.parametrize("path", PATHS)
def test_torch_no_keys_at_all(path):
    q, k = torch.randn(2, 3, 2, 4, requires_grad=True), torch.randn(2, 0, 2, 4, requires_grad=True)
    v = torch.randn(2, 0, 2, 5, requires_grad=True)
    with reference.force_path(path):
        out, lse = longflash.attention(q, k, v, return_lse=True, backend="reference")
        out.sum().backward()
    assert out.shape == (2, 3, 2, 5) and (out == 0).all() and torch.isneginf(lse).all()
    assert (q.grad == 0).all() and k.grad.shape == k.shape


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_torch_half_precision(path, dtype, tol):
    """16-bit inputs: outputs and gradients in the input dtype, lse in float32, computed
    in float32 (so only the final rounding separates them from float64)."""
    nq, nk, hq, hk, dqk, dv, kwargs = CASES["causal-Nq<Nk-gqa-dv"]
    rng = np.random.default_rng(4)
    q, k, v = (_t(x, dtype) for x in _inputs(rng, nq, nk, hq, hk, dqk, dv))
    dout = _t(rng.standard_normal((2, nq, hq, dv)), dtype)
    out, lse, grads = _torch_run(path, q, k, v, dout, **kwargs)
    n_out, n_lse, n_grads = _naive_run(q, k, v, dout, **kwargs)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel(out.double(), n_out) < tol
    assert_lse(lse, n_lse, 1e-6)
    for g, n in zip(grads, n_grads):
        assert g.dtype == dtype
        assert rel(g.double(), n) < tol


def test_torch_strided_inputs():
    """Inputs with non-standard strides (heads-first storage) give the same result."""
    rng = np.random.default_rng(5)
    q, k, v = (_t(x, torch.float32) for x in _inputs(rng, 20, 24, 4, 2, 8, 8))
    qs, ks, vs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qs.is_contiguous()
    for path in PATHS:
        with reference.force_path(path, **BLOCKS):
            a = longflash.attention(q, k, v, causal=True, backend="reference")
            b = longflash.attention(qs, ks, vs, causal=True, backend="reference")
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tile_count(plan):
    return sum(len(kblocks) for _, _, kblocks in plan)


def _problem(nq, nk, **kwargs):
    q, k = torch.zeros(1, nq, 1, 4), torch.zeros(1, nk, 1, 4)
    call = torch_frontend.make_call(q, k, k, **kwargs)
    return ref_torch._problem(call, q, k)


def test_plan_skips_invisible_tiles():
    dev = torch.device("cpu")
    # Causal 64 x 64 in 16 x 16 tiles: the lower triangle, masks only on the diagonal.
    plan = ref_torch._plan(_problem(64, 64, causal=True), 16, 16, dev)
    assert _tile_count(plan) == 10
    assert [(k0, k1, m) for k0, k1, m in plan[1][2]] == [(0, 16, False), (16, 32, True)]
    # Nq > Nk: the first 32 query rows see nothing and get no tile at all.
    plan = ref_torch._plan(_problem(64, 32, causal=True), 16, 16, dev)
    assert plan[0][2] == [] and plan[1][2] == []
    # A sliding window visits O(N * window) tiles, not O(N^2).
    plan = ref_torch._plan(_problem(1024, 1024, window=(16, 0)), 64, 64, dev)
    assert _tile_count(plan) <= 2 * 1024 // 64
    # No mask: every tile, none masked.
    plan = ref_torch._plan(_problem(40, 40), 16, 16, dev)
    assert _tile_count(plan) == 9 and not any(m for *_, kb in plan for *_, m in kb)


def test_plan_varlen_stays_block_diagonal():
    cu_q = torch.tensor([0, 32, 32, 64], dtype=torch.int32)
    cu_k = torch.tensor([0, 32, 40, 72], dtype=torch.int32)
    q = torch.zeros(64, 1, 4)
    k = torch.zeros(72, 1, 4)
    call = torch_frontend.make_call(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    p = ref_torch._problem(call, q[None], k[None])
    plan = ref_torch._plan(p, 32, 16, torch.device("cpu"))
    # Sequence 0 (queries 0-31) sees keys 0-31 only; sequence 2 (queries 32-63) sees
    # keys 40-71 only, in key blocks aligned to 16; no block pairs a sequence's queries
    # with another sequence's keys alone.
    assert [(k0, k1) for k0, k1, _ in plan[0][2]] == [(0, 16), (16, 32)]
    assert [(k0, k1) for k0, k1, _ in plan[1][2]] == [(32, 48), (48, 64), (64, 72)]


def test_blockwise_never_holds_the_score_matrix():
    """Every tensor the blockwise path creates is O(N): the largest is one tile of
    scores, far below the Nq x Nk matrix."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    n, h, d, bq, bk = 512, 2, 16, 64, 32
    q, k, v, dout = (torch.randn(1, n, h, d) for _ in range(4))
    call = torch_frontend.make_call(q, k, v, causal=True)
    settings = reference.Settings("blockwise", bq, bk)
    with Largest():
        out, lse = ref_torch.forward(call, q, k, v, "blockwise", settings)
        ref_torch.backward(call, dout, q, k, v, out, lse, "blockwise", settings)
    assert Largest.numel <= max(h * bq * bk, n * h * d)
    assert Largest.numel < h * n * n // 16


# -- jax ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jax_mods():
    jax = pytest.importorskip("jax")
    return jax, jax.numpy


def _jax_run(jax, path, q, k, v, dout, cu=None, **kwargs):
    jnp = jax.numpy
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, dout)]
    cus = [jnp.asarray(c, jnp.int32) for c in cu] if cu is not None else [None, None]

    def fn(q, k, v, dout, cu_q, cu_k):
        def f(q, k, v):
            if cu is not None:
                return longflash.attention_varlen(
                    q, k, v, cu_q, cu_k, return_lse=True, backend="reference", **kwargs
                )
            return longflash.attention(q, k, v, return_lse=True, backend="reference", **kwargs)

        (out, lse), vjp = jax.vjp(f, q, k, v)
        return out, lse, vjp((dout, jnp.zeros_like(lse)))

    with reference.force_path(path, **BLOCKS):  # jit traces here, fixing the path
        return jax.jit(fn)(*args, *cus)


JAX_CASES = {
    "causal-Nq<Nk-gqa-softcap": (
        CASES["causal-Nq<Nk-gqa-dv"][:6],
        {"causal": True, "softcap": 2.0},
    ),
    "Nq>Nk-empty-rows-window": (
        CASES["causal-Nq>Nk-empty-rows"][:6],
        {"causal": True, "window": (4, None)},
    ),
    "varlen-causal-window": (None, {"causal": True, "window": (3, 1)}),
}


@pytest.mark.parametrize("case", list(JAX_CASES))
def test_jax_both_paths_match_naive(jax_mods, case):
    """jit(vjp) through the public API, both paths, against float64 naive; blockwise
    against exact; rows that see no key give 0 / -inf / zero dq. Varlen cu_seqlens are
    jit arguments (tracers), with an empty, a key-less and length-1 sequences."""
    jax, _ = jax_mods
    shape, kwargs = JAX_CASES[case]
    rng = np.random.default_rng(6)
    if shape is None:
        cu = (CU_Q, CU_K)
        q, k, v = _inputs(rng, CU_Q[-1], CU_K[-1], 4, 2, 8, 8, batch=())
        dout = rng.standard_normal((CU_Q[-1], 4, 8))
    else:
        cu = None
        nq, nk, hq, hk, dqk, dv = shape
        q, k, v = _inputs(rng, nq, nk, hq, hk, dqk, dv)
        dout = rng.standard_normal((2, nq, hq, dv))
    q, k, v, dout = (np.float32(x) for x in (q, k, v, dout))
    n_out, n_lse, n_grads = _naive_run(*(_t(x) for x in (q, k, v, dout)), cu=cu, **kwargs)
    results = {path: _jax_run(jax, path, q, k, v, dout, cu=cu, **kwargs) for path in PATHS}
    for path, (out, lse, grads) in results.items():
        assert out.dtype == np.float32 and lse.dtype == np.float32
        assert rel(out, n_out) < 1e-5, path
        assert_lse(lse, n_lse, 1e-6)
        for g, n in zip(grads, n_grads):
            assert rel(g, n) < 1e-5, path
        empty = np.isneginf(np.asarray(lse))  # (.., H, N): rows that see nothing
        assert empty.any() == (case != "causal-Nq<Nk-gqa-softcap")
        out_rows = np.moveaxis(np.asarray(out), -1, 0)  # (Dv, .., N, H)
        dq_rows = np.moveaxis(np.asarray(grads[0]), -1, 0)
        empty_rows = np.swapaxes(empty, -1, -2)
        assert (out_rows[:, empty_rows] == 0).all() and (dq_rows[:, empty_rows] == 0).all()
    (out_e, lse_e, grads_e), (out_b, lse_b, grads_b) = results["exact"], results["blockwise"]
    assert rel(out_b, out_e) < 1e-6
    assert_lse(lse_b, lse_e, 1e-6)
    for b, e in zip(grads_b, grads_e):
        assert rel(b, e) < 1e-5


def test_jax_float64_grad_under_jit(jax_mods):
    """float64 end to end (lse recomputed in float64 for the backward) through jax.grad
    of a loss, both paths, against naive float64 to 1e-12."""
    jax, jnp = jax_mods
    nq, nk, hq, hk, dqk, dv, kwargs = CASES["left-only-softcap"]
    rng = np.random.default_rng(7)
    q, k, v = _inputs(rng, nq, nk, hq, hk, dqk, dv)
    w = rng.standard_normal((2, nq, hq, dv))
    n_out, _, n_grads = _naive_run(*(_t(x) for x in (q, k, v, w)), **kwargs)
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
        for path in PATHS:

            def loss(q, k, v):
                out = longflash.attention(q, k, v, backend="reference", **kwargs)
                return jnp.sum(out * w), out

            with reference.force_path(path, **BLOCKS):
                grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
            assert out.dtype == jnp.float64
            assert rel(out, n_out) < 1e-12, path
            for g, n in zip(grads, n_grads):
                assert g.dtype == jnp.float64
                assert rel(g, n) < 1e-12, path


def test_jax_vmap_over_batch(jax_mods):
    """vmap over a leading axis (blockwise path, GQA, causal) equals a Python loop."""
    jax, jnp = jax_mods
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in _inputs(rng, 21, 30, 4, 2, 8, 8, batch=(3, 2)))

    def f(q, k, v):
        return longflash.attention(q, k, v, causal=True, backend="reference")

    with reference.force_path("blockwise", **BLOCKS):
        batched = jax.jit(jax.vmap(f))(q, k, v)
        single = jax.jit(f)
        looped = jnp.stack([single(q[i], k[i], v[i]) for i in range(3)])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-6, atol=1e-6)


def test_jax_bfloat16(jax_mods):
    jax, jnp = jax_mods
    nq, nk, hq, hk, dqk, dv, kwargs = CASES["window-mqa"]
    rng = np.random.default_rng(9)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(rng, nq, nk, hq, hk, dqk, dv))
    n_out, n_lse = naive(*(_t(np.asarray(x, np.float32)) for x in (q, k, v)), **kwargs)
    out, lse = longflash.attention(q, k, v, return_lse=True, backend="reference", **kwargs)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert rel(np.asarray(out, np.float32), n_out) < 1e-2
    assert_lse(lse, n_lse, 1e-6)
