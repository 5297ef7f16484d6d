"""Tests of the conformance suite itself: the oracles are right, and the suite fails
backends that are wrong in each of the ways it claims to catch."""

from __future__ import annotations

import math

import longflash
import numpy as np
import pytest
from longflash.registry import REGISTRY
from longflash.testing import Case, attention_oracle, blockwise_oracle, check_case
from longflash.testing import cases as C
from longflash.testing.oracle import visible

torch = pytest.importorskip("torch")


# -- the float64 oracle ------------------------------------------------------------------
def test_mask_follows_the_api_definition():
    # causal, Nq < Nk: bottom-right aligned (query i sees j <= i + 2)
    assert visible(2, 4, True, None).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # causal, Nq > Nk: the first rows see nothing
    assert visible(3, 1, True, None).tolist() == [[0], [0], [1]]
    # window (1, 0) with Nq == Nk; causal forces right = 0 even when a window says 5
    assert visible(3, 3, False, (1, 0)).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert visible(3, 3, True, (1, 5)).tolist() == visible(3, 3, False, (1, 0)).tolist()
    assert visible(2, 3, False, (None, 0)).tolist() == [[1, 1, 0], [1, 1, 1]]
    assert visible(2, 2, False, None).all()


def test_oracle_on_a_worked_example():
    # one head, d = 1: scores of row 0 are (0, 1), row 1 sees only key 0 (causal)
    q = np.array([[[[1.0]], [[2.0]]]])
    k = np.array([[[[0.0]], [[1.0]]]])
    v = np.array([[[[10.0]], [[20.0]]]])
    res = attention_oracle(q[:, :1], k, v, scale=1.0)
    p1 = math.e / (1 + math.e)
    assert res.out[0, 0, 0, 0] == pytest.approx(10 * (1 - p1) + 20 * p1, rel=1e-14)
    assert res.lse[0, 0, 0] == pytest.approx(math.log(1 + math.e), rel=1e-14)
    res = attention_oracle(q, k, v, np.ones((1, 2, 1, 1)), scale=1.0, window=(None, 0))
    # window (None, 0) with Nq == Nk is causal: row 0 sees key 0 only
    assert res.out[0, 0, 0, 0] == 10.0 and res.lse[0, 0, 0] == 0.0
    # row 0 has a single key: its dq is exactly zero, and so is the cancelling part
    assert res.dq[0, 0, 0, 0] == 0.0


def _torch_autograd_attention(q, k, v, dout, causal, scale, window, softcap):
    q, k, v = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    ke, ve = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, ke) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    seen = torch.tensor(visible(q.shape[1], k.shape[1], causal, window))
    s = s.masked_fill(~seen, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]).masked_fill(~seen, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", p, ve)
    grads = torch.autograd.grad(out, (q, k, v), torch.tensor(dout))
    return out.detach().numpy(), lse.detach().numpy(), [g.numpy() for g in grads]


def _random_config(rng):
    hk = int(rng.integers(1, 3))
    return dict(
        B=int(rng.integers(1, 3)),
        Nq=int(rng.integers(1, 30)),
        Nk=int(rng.integers(1, 30)),
        Hk=hk,
        Hq=hk * int(rng.integers(1, 3)),
        D=int(rng.integers(1, 9)),
        Dv=int(rng.integers(1, 9)),
        causal=bool(rng.integers(2)),
        window=None
        if rng.integers(2)
        else (
            None if rng.integers(3) == 0 else int(rng.integers(0, 8)),
            None if rng.integers(3) == 0 else int(rng.integers(0, 8)),
        ),
        softcap=None if rng.integers(2) else float(rng.uniform(0.5, 3)),
        scale=None if rng.integers(2) else float(rng.uniform(0.1, 2)),
    )


@pytest.mark.parametrize("seed", range(12))
def test_oracle_matches_torch_autograd(seed):
    rng = np.random.default_rng(seed)
    c = _random_config(rng)
    q = rng.standard_normal((c["B"], c["Nq"], c["Hq"], c["D"]))
    k = rng.standard_normal((c["B"], c["Nk"], c["Hk"], c["D"]))
    v = rng.standard_normal((c["B"], c["Nk"], c["Hk"], c["Dv"]))
    do = rng.standard_normal((c["B"], c["Nq"], c["Hq"], c["Dv"]))
    opts = {key: c[key] for key in ("causal", "scale", "window", "softcap")}
    res = attention_oracle(q, k, v, do, **opts)
    out, lse, (dq, dk, dv) = _torch_autograd_attention(q, k, v, do, **opts)
    np.testing.assert_allclose(res.out, out, rtol=1e-12, atol=1e-12)
    assert np.array_equal(np.isneginf(res.lse), np.isneginf(lse))
    np.testing.assert_allclose(res.lse[np.isfinite(lse)], lse[np.isfinite(lse)], rtol=1e-12)
    for mine, theirs in ((res.dq, dq), (res.dk, dk), (res.dv, dv)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-10, atol=1e-12)
    seen = visible(c["Nq"], c["Nk"], c["causal"], c["window"]).any(axis=0)
    assert np.array_equal(res.key_seen, np.broadcast_to(seen, res.key_seen.shape))


def test_oracle_varlen_is_per_sequence():
    rng = np.random.default_rng(3)
    cq, ck = [0, 3, 3, 10, 11], [0, 5, 5, 5, 20]
    q, k = rng.standard_normal((11, 4, 8)), rng.standard_normal((20, 2, 8))
    v, do = rng.standard_normal((20, 2, 6)), rng.standard_normal((11, 4, 6))
    res = attention_oracle(q, k, v, do, causal=True, softcap=2.0, cu_seqlens_q=cq, cu_seqlens_k=ck)
    assert res.out.shape == (11, 4, 6) and res.lse.shape == (4, 11)
    for b in range(4):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        one = attention_oracle(
            q[None, sq], k[None, sk], v[None, sk], do[None, sq], causal=True, softcap=2.0
        )
        np.testing.assert_array_equal(one.out[0], res.out[sq])
        np.testing.assert_array_equal(one.lse[0], res.lse[:, sq])
        np.testing.assert_array_equal(one.dk[0], res.dk[sk])
    # sequence 2 has queries but no keys: out 0, lse -inf, zero grads
    assert (res.out[3:10] == 0).all() and np.isneginf(res.lse[:, 3:10]).all()
    assert (res.dq[3:10] == 0).all()


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_blockwise_oracle_matches_the_float64_one(framework):
    rng = np.random.default_rng(5)
    if framework == "torch":
        arr = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    else:
        jnp = pytest.importorskip("jax.numpy")
        arr = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    configs = [
        dict(causal=True, window=None, softcap=None, nq=37, nk=53),
        dict(causal=False, window=(3, 5), softcap=2.0, nq=41, nk=29),
        dict(causal=True, window=(4, None), softcap=None, nq=40, nk=12),  # dead rows
    ]
    if framework == "jax":
        # the JAX path shares every line but the array adaptor with the torch one, and
        # eager JAX compiles each new block shape: one configuration is enough
        configs = configs[1:2]
    for cfg in configs:
        nq, nk = cfg.pop("nq"), cfg.pop("nk")
        q = rng.standard_normal((2, nq, 4, 16)).astype(np.float32)
        k = rng.standard_normal((2, nk, 2, 16)).astype(np.float32)
        v = rng.standard_normal((2, nk, 2, 8)).astype(np.float32)
        do = rng.standard_normal((2, nq, 4, 8)).astype(np.float32)
        want = attention_oracle(q, k, v, do, **cfg)
        got = blockwise_oracle(arr(q), arr(k), arr(v), arr(do), block_q=7, **cfg)
        for name in ("out", "dq", "dk", "dv", "dq_terms", "dk_terms"):
            a, b = getattr(got, name), getattr(want, name)
            assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-30), name
        assert np.array_equal(np.isneginf(got.lse), np.isneginf(want.lse))
        live = np.isfinite(want.lse)
        np.testing.assert_allclose(got.lse[live], want.lse[live], rtol=1e-5)
        assert np.array_equal(got.key_seen, want.key_seen)
    if framework == "jax":
        return
    # packed
    cq, ck = [0, 30, 30, 47], [0, 20, 25, 60]
    q = rng.standard_normal((47, 2, 16)).astype(np.float32)
    k = rng.standard_normal((60, 1, 16)).astype(np.float32)
    v = rng.standard_normal((60, 1, 16)).astype(np.float32)
    do = rng.standard_normal((47, 2, 16)).astype(np.float32)
    want = attention_oracle(q, k, v, do, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck)
    got = blockwise_oracle(
        arr(q), arr(k), arr(v), arr(do), causal=True, block_q=8, cu_seqlens_q=cq, cu_seqlens_k=ck
    )
    for name in ("out", "dq", "dk", "dv"):
        a, b = getattr(got, name), getattr(want, name)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name
    assert np.array_equal(got.key_seen, want.key_seen)


# -- poisoning -------------------------------------------------------------------------------
def test_poisoned_fills_nan_and_restores():
    import torch.utils.deterministic as det
    from longflash.testing import poisoned

    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        det.fill_uninitialized_memory,
    )
    with poisoned():
        assert torch.isnan(torch.empty(4)).all()
        assert torch.isnan(torch.empty(3, dtype=torch.bfloat16)).all()
        assert torch.isnan(torch.ones(2).new_empty(5)).all()
    after = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        det.fill_uninitialized_memory,
    )
    assert after == before


# -- the suite fails wrong backends ----------------------------------------------------------
class Wrapped:
    """The reference backend with one defect switched on."""

    frameworks = frozenset({"torch"})
    devices = frozenset({"cpu"})
    priority = -(10**6)

    def __init__(self, name, defect):
        self.name = name
        self.defect = defect
        from longflash import reference

        self.ref = reference.backend

    def available(self):
        return True, ""

    def check(self, call):
        if self.defect == "declines-float32" and call.dtype == "float32":
            return ["float32 not supported"]
        return []

    def forward(self, call, q, k, v):
        d = self.defect
        if d == "top-left-causal" and call.causal and call.Nk > call.Nq:
            # the mask aligned to the top-left corner: causal over the first Nq keys
            out, lse = self.ref.forward(
                call.replace(Nk=call.Nq), q, k[:, : call.Nq], v[:, : call.Nq]
            )
            return out, lse
        if d == "gqa-modulo":  # query head h reads kv head h % Hk instead of h // group
            idx = torch.arange(call.Hq) % call.Hk
            full = call.replace(Hk=call.Hq)
            return self.ref.forward(full, q, k[:, :, idx], v[:, :, idx])
        if d == "ignores-strides":
            q = torch.as_strided(q, q.shape, _contiguous_strides(q.shape))
        out, lse = self.ref.forward(call, q, k, v)
        if d == "unwritten-row":
            partial = torch.empty_like(out)
            partial[..., :-1, :, :] = out[..., :-1, :, :]
            return partial, lse
        if d == "dead-rows-nan":
            dead = torch.isneginf(lse).transpose(-1, -2)
            return out.masked_fill(dead[..., None], math.nan), lse
        if d == "dead-rows-lse-zero":
            return out, lse.masked_fill(torch.isneginf(lse), 0.0)
        if d == "bf16-output":
            return out.to(torch.bfloat16).to(out.dtype), lse
        return out, lse

    def backward(self, call, dout, q, k, v, out, lse):
        if self.defect == "softcap-ignored-in-backward":
            call = call.replace(softcap=None)
        if self.defect == "top-left-causal" and call.causal and call.Nk > call.Nq:
            n = call.Nq
            dq, dk, dv = self.ref.backward(
                call.replace(Nk=n), dout, q, k[:, :n], v[:, :n], out, lse
            )
            pad = torch.zeros_like(k[:, n:])
            return dq, torch.cat([dk, pad], 1), torch.cat([dv, torch.zeros_like(v[:, n:])], 1)
        if self.defect == "gqa-modulo":
            idx = torch.arange(call.Hq) % call.Hk
            dq, dk, dv = self.ref.backward(
                call.replace(Hk=call.Hq), dout, q, k[:, :, idx], v[:, :, idx], out, lse
            )
            dk = torch.zeros_like(k).index_add_(2, idx, dk)
            dv = torch.zeros_like(v).index_add_(2, idx, dv)
            return dq, dk, dv
        return self.ref.backward(call, dout, q, k, v, out, lse)


def _contiguous_strides(shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _case(group, name):
    return next(c for c in C.GROUPS[group](False) if c.name == name)


DEFECTS = [
    # defect, (group, case), dtype, what the failure report must say
    ("unwritten-row", ("head_dims", "d32"), "float32", "NaN"),
    ("top-left-causal", ("lengths", "nq17-nk113-causal"), "float32", "out: relative error"),
    ("dead-rows-nan", ("no_key_rows", "causal-nq64-nk16"), "float16", "NaN"),
    (
        "dead-rows-lse-zero",
        ("no_key_rows", "causal-nq64-nk16"),
        "float32",
        "rows that see no key have lse other than -inf",
    ),
    ("gqa-modulo", ("gqa", "gqa-6-2"), "bfloat16", "out: relative error"),
    ("softcap-ignored-in-backward", ("softcap_scale", "softcap2"), "float32", "dq: relative error"),
    ("bf16-output", ("head_dims", "d64"), "float32", "out: relative error"),
    ("ignores-strides", ("layouts", "transposed-gqa-causal"), "float32", "out:"),
]


@pytest.mark.parametrize("defect, where, dtype, message", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_suite_fails_a_defective_backend(defect, where, dtype, message):
    name = f"defect-{defect}"
    REGISTRY.register(Wrapped(name, defect))
    try:
        case = _case(*where)
        # the same case passes on the reference: the defect is what fails it
        assert check_case("reference", case, dtype) == "passed"
        with pytest.raises(AssertionError, match=message):
            check_case(name, case, dtype)
    finally:
        REGISTRY.unregister(name)


def test_declined_dtype_becomes_a_must_raise_case():
    REGISTRY.register(Wrapped("defect-declines", "declines-float32"))
    try:
        case = _case("head_dims", "d32")
        assert check_case("defect-declines", case, "float32") == "declined"
        assert check_case("defect-declines", case, "bfloat16") == "passed"
    finally:
        REGISTRY.unregister("defect-declines")


class Liar(Wrapped):
    """check() declines, but the front-end would be made to run it anyway: simulated by
    a check that says no to the suite's pre-check and yes afterwards."""

    def __init__(self):
        super().__init__("liar", None)
        self.asked = 0

    def check(self, call):
        self.asked += 1
        return ["softcap not supported"] if self.asked == 1 else []


def test_must_raise_case_fails_when_the_call_runs():
    REGISTRY.register(Liar())
    try:
        with pytest.raises(AssertionError, match="but it ran"):
            check_case("liar", _case("head_dims", "d32"), "float32")
    finally:
        REGISTRY.unregister("liar")


# -- the factory ----------------------------------------------------------------------------------
def test_factory_builds_the_expected_tests():
    cls = longflash.testing.conformance_suite("reference", framework="torch", device="cpu")
    tests = {n for n in dir(cls) if n.startswith("test_")}
    assert {
        "test_head_dims",
        "test_lengths",
        "test_masks",
        "test_softcap_scale",
        "test_gqa",
        "test_dv",
        "test_varlen",
        "test_no_key_rows",
        "test_layouts",
        "test_random_shapes",
    } == tests
    assert cls.dtypes == ("float16", "bfloat16", "float32")
    marks = cls.test_masks.pytestmark[0]
    ids = [p.id for p in marks.args[1]]
    assert "float16-win-left16" in ids and "float32-causal-win32" in ids

    large = longflash.testing.conformance_suite(
        "reference", framework="torch", device="cpu", size="large", dtypes=["bfloat16"]
    )
    assert hasattr(large, "test_long") and large.dtypes == ("bfloat16",)
    pytest.importorskip("jax")
    jx = longflash.testing.conformance_suite("reference", framework="jax", device="cpu")
    assert {"test_jax_eager", "test_jax_jit", "test_jax_grad", "test_jax_vmap"} <= set(dir(jx))
    assert not hasattr(jx, "test_layouts")
    with pytest.raises(ValueError):
        longflash.testing.conformance_suite("reference", framework="numpy")
    with pytest.raises(ValueError):
        longflash.testing.conformance_suite("reference", size="huge")


def test_case_lists_cover_the_required_features():
    small = [c for g in C.GROUPS if g != "long" for c in C.GROUPS[g](False)]
    assert any(c.Nq > 1024 for c in small) and any(c.varlen and c.causal for c in small)
    assert {1, 17, 113, 1000} <= {c.Nq for c in small}
    assert any(c.window == (16, None) for c in small)  # left only
    assert any(c.window == (None, 16) for c in small)  # right only
    assert any(c.window == (8, 4) for c in small)  # both
    assert any(c.varlen and any(a != b for a, b in c.seqlens) and c.causal for c in small)
    assert any(c.varlen and (0, 0) in c.seqlens for c in small)
    assert any(c.varlen and (1, 1) in c.seqlens for c in small)
    assert any(c.Hk == 1 and c.Hq > 1 for c in small) and any(1 < c.Hk < c.Hq for c in small)
    assert any(c.dv != c.Dqk for c in small)
    assert {32, 64, 96} <= {c.Dqk for c in small}
    gpu = [c for g in C.GROUPS for c in C.GROUPS[g](True)]
    assert {128, 256} <= {c.Dqk for c in gpu}
    assert max(c.Nk for c in C.long_cases(True)) == 131072
    assert Case("x", seqlens=((3, 4), (5, 2))).cu_seqlens == ([0, 3, 8], [0, 4, 6])


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_long_cases_compare_against_the_blockwise_oracle(monkeypatch, framework):
    """On a GPU, long cases use the on-device blockwise oracle; force that path here."""
    if framework == "jax":
        pytest.importorskip("jax")
    import longflash.testing.oracle as oracle_mod
    import longflash.testing.suite as suite_mod

    calls = []
    real = oracle_mod.blockwise_oracle

    def spy(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens_q") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(oracle_mod, "blockwise_oracle", spy)
    monkeypatch.setattr(suite_mod, "HOST_ORACLE_MAX_SCORES", 0)
    for group, name in (("lengths", "nq17-nk113-causal"), ("varlen", "varlen-qk-differ-win")):
        assert (
            check_case("reference", _case(group, name), "float32", framework=framework) == "passed"
        )
    assert calls == [False, True]
    if framework == "torch":
        REGISTRY.register(Wrapped("defect-long", "top-left-causal"))
        try:
            with pytest.raises(AssertionError, match="out: relative error"):
                check_case("defect-long", _case("lengths", "nq17-nk113-causal"), "float32")
        finally:
            REGISTRY.unregister("defect-long")
