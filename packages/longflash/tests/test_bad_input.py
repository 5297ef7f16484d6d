"""Bad input gets a clear exception naming the argument, before any kernel runs
(DESIGN §2), in both front-ends. Every call goes to a spy backend that would accept
anything, so "before any kernel" is checked too."""

from __future__ import annotations

import math

import longflash
import numpy as np
import pytest
from longflash.registry import REGISTRY

FRAMEWORKS = ["torch", "jax"]


class Spy:
    name = "spy"
    frameworks = frozenset({"torch", "jax"})
    devices = frozenset({"cpu"})
    priority = -(10**6)

    def __init__(self):
        self.calls = 0
        self.allowed = False  # tests that expect a run set this

    def available(self):
        return True, ""

    def check(self, call):
        return []

    def forward(self, call, q, k, v):
        self.calls += 1
        from longflash import reference

        return reference.backend.forward(call, q, k, v)

    def backward(self, call, dout, q, k, v, out, lse):
        self.calls += 1
        from longflash import reference

        return reference.backend.backward(call, dout, q, k, v, out, lse)


@pytest.fixture(autouse=True)
def spy():
    s = Spy()
    REGISTRY.register(s)
    yield s
    REGISTRY.unregister("spy")
    assert s.calls == 0 or s.allowed, "a kernel ran although the input was rejected"


class FW:
    """Array factory for one framework."""

    def __init__(self, name):
        self.name = name
        if name == "torch":
            self.mod = pytest.importorskip("torch")
        else:
            pytest.importorskip("jax")
            import jax.numpy as jnp

            self.mod = jnp

    def x(self, *shape, dtype="float32"):
        rng = np.random.default_rng(sum(shape) + len(shape))
        a = rng.standard_normal(shape).astype(np.float32)
        if self.name == "torch":
            return self.mod.from_numpy(a).to(getattr(self.mod, dtype))
        return self.mod.asarray(a).astype(getattr(self.mod, dtype))

    def ints(self, values, dtype="int32"):
        if self.name == "torch":
            return self.mod.tensor(values, dtype=getattr(self.mod, dtype))
        return self.mod.asarray(np.asarray(values, dtype=dtype))

    def qkv(self, b=2, nq=8, nk=8, hq=4, hk=2, d=16, dv=16):
        return self.x(b, nq, hq, d), self.x(b, nk, hk, d), self.x(b, nk, hk, dv)

    def packed(self, tq=8, tk=8, hq=4, hk=2, d=16):
        return self.x(tq, hq, d), self.x(tk, hk, d), self.x(tk, hk, d)


@pytest.fixture(params=FRAMEWORKS)
def fw(request):
    return FW(request.param)


def attn(*args, **kwargs):
    kwargs.setdefault("backend", "spy")
    return longflash.attention(*args, **kwargs)


def attn_varlen(*args, **kwargs):
    kwargs.setdefault("backend", "spy")
    return longflash.attention_varlen(*args, **kwargs)


# -- shapes ----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank(fw, which):
    arrays = dict(zip("qkv", fw.qkv()))
    arrays[which] = arrays[which][0]  # drop the batch axis
    with pytest.raises(ValueError, match=rf"{which} must have rank 4"):
        attn(arrays["q"], arrays["k"], arrays["v"])


def test_varlen_wrong_rank(fw):
    q, k, v = fw.qkv()
    cu = fw.ints([0, 8])
    with pytest.raises(ValueError, match=r"q must have rank 3"):
        attn_varlen(q, k, v, cu, cu)


def test_batch_mismatch(fw):
    q, _, _ = fw.qkv(b=2)
    _, k, v = fw.qkv(b=3)
    with pytest.raises(ValueError, match=r"batch size"):
        attn(q, k, v)


def test_seqlen_of_k_and_v_differ(fw):
    q, k, _ = fw.qkv(nk=8)
    _, _, v = fw.qkv(nk=9)
    with pytest.raises(ValueError, match=r"k and v must have the same sequence length"):
        attn(q, k, v)


def test_head_dim_of_q_and_k_differ(fw):
    q, _, v = fw.qkv(d=16)
    _, k, _ = fw.qkv(d=32)
    with pytest.raises(ValueError, match=r"k head_dim 32 must equal q head_dim 16"):
        attn(q, k, v)


def test_heads_of_k_and_v_differ(fw):
    q, k, _ = fw.qkv(hk=2)
    _, _, v = fw.qkv(hk=1)
    with pytest.raises(ValueError, match=r"v has 1 heads but k has 2"):
        attn(q, k, v)


def test_query_heads_not_a_multiple_of_kv_heads(fw):
    q, k, v = fw.qkv(hq=3, hk=2)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k/v heads \(2\)"):
        attn(q, k, v)


# -- dtypes and devices -------------------------------------------------------------
def test_dtypes_differ(fw):
    q, k, v = fw.qkv()
    k = fw.x(*k.shape, dtype="bfloat16")
    with pytest.raises(TypeError, match=r"q, k and v must share one dtype.*k bfloat16"):
        attn(q, k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_integer_dtype(fw, which):
    arrays = dict(zip("qkv", fw.qkv()))
    arrays[which] = fw.ints(np.zeros(arrays[which].shape, dtype=np.int32))
    with pytest.raises(TypeError, match=rf"{which} has dtype int32; expected a floating"):
        attn(arrays["q"], arrays["k"], arrays["v"])


def test_devices_differ():
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 8, 2, 16)
    k = torch.empty(1, 8, 2, 16, device="meta")
    with pytest.raises(ValueError, match=r"q, k and v must be on one device.*k meta"):
        attn(q, k, q)


def test_cu_seqlens_on_another_device():
    torch = pytest.importorskip("torch")
    q = torch.randn(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be on q's device"):
        attn_varlen(q, q, q, cu, cu.to("meta"))


def test_not_an_array():
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor or a jax.Array"):
        attn(np.zeros((1, 2, 1, 4)), np.zeros((1, 2, 1, 4)), np.zeros((1, 2, 1, 4)))


def test_mixed_frameworks():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    q = torch.randn(1, 8, 2, 16)
    k = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor"):
        attn(q, k, q)


# -- cu_seqlens -------------------------------------------------------------------------
def test_cu_seqlens_not_int32(fw):
    q, k, v = fw.packed()
    good = fw.ints([0, 3, 8])
    # int16, not int64: JAX without x64 silently stores int64 requests as int32
    with pytest.raises(TypeError, match=r"cu_seqlens_q must be int32, got int16"):
        attn_varlen(q, k, v, fw.ints([0, 3, 8], dtype="int16"), good)
    with pytest.raises(TypeError, match=r"cu_seqlens_k must be int32, got float32"):
        attn_varlen(q, k, v, good, fw.x(3))


def test_cu_seqlens_not_monotone(fw):
    q, k, v = fw.packed()
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be non-decreasing"):
        attn_varlen(q, k, v, fw.ints([0, 5, 3, 8]), fw.ints([0, 3, 5, 8]))


def test_cu_seqlens_not_starting_at_zero(fw):
    q, k, v = fw.packed()
    with pytest.raises(ValueError, match=r"cu_seqlens_k must start at 0, got 1"):
        attn_varlen(q, k, v, fw.ints([0, 4, 8]), fw.ints([1, 4, 8]))


def test_cu_seqlens_not_matching_packed_length(fw):
    q, k, v = fw.packed(tq=8, tk=8)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] = 7 must equal the packed length 8"):
        attn_varlen(q, k, v, fw.ints([0, 4, 7]), fw.ints([0, 4, 8]))
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] = 9 must equal the packed length 8"):
        attn_varlen(q, k, v, fw.ints([0, 4, 8]), fw.ints([0, 4, 9]))


def test_cu_seqlens_of_different_lengths(fw):
    q, k, v = fw.packed()
    with pytest.raises(ValueError, match=r"cu_seqlens_q and cu_seqlens_k must have the same"):
        attn_varlen(q, k, v, fw.ints([0, 8]), fw.ints([0, 4, 8]))


def test_cu_seqlens_too_short(fw):
    q, k, v = fw.packed()
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be a 1-D array of length batch\+1"):
        attn_varlen(q, k, v, fw.ints([0]), fw.ints([0]))


def test_max_seqlen_negative(fw):
    q, k, v = fw.packed()
    cu = fw.ints([0, 8])
    with pytest.raises(ValueError, match=r"max_seqlen_q must be >= 0"):
        attn_varlen(q, k, v, cu, cu, max_seqlen_q=-2)


# -- options ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "window, side", [((-1, None), "left"), ((None, -3), "right"), ((4, -1), "right")]
)
def test_window_negative(fw, window, side):
    with pytest.raises(ValueError, match=rf"window {side} must be >= 0"):
        attn(*fw.qkv(), window=window)


@pytest.mark.parametrize("window", [(1, 2, 3), 5, "left"])
def test_window_not_a_pair(fw, window):
    with pytest.raises(ValueError, match=r"window must be a pair"):
        attn(*fw.qkv(), window=window)


def test_window_not_int(fw):
    with pytest.raises(TypeError, match=r"window left must be an int"):
        attn(*fw.qkv(), window=(1.5, None))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_scale_not_finite(fw, value):
    with pytest.raises(ValueError, match=r"scale must be finite"):
        attn(*fw.qkv(), scale=value)


def test_scale_not_a_number(fw):
    with pytest.raises(TypeError, match=r"scale must be a Python float"):
        attn(*fw.qkv(), scale="0.1")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_softcap_not_finite(fw, value):
    with pytest.raises(ValueError, match=r"softcap must be finite"):
        attn(*fw.qkv(), softcap=value)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_softcap_not_positive(fw, value):
    with pytest.raises(ValueError, match=r"softcap must be > 0"):
        attn(*fw.qkv(), softcap=value)


def test_causal_not_bool(fw):
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        attn(*fw.qkv(), causal=1)


# -- backends -------------------------------------------------------------------------------
def test_unknown_backend_lists_registered_names(fw):
    with pytest.raises(ValueError) as exc:
        attn(*fw.qkv(), backend="flashy")
    assert "unknown backend 'flashy'" in str(exc.value)
    for name in ("reference", "cuda", "triton", "pallas", "spy"):
        assert name in str(exc.value)


def test_backend_not_a_string(fw):
    with pytest.raises(TypeError, match=r"backend must be a str"):
        attn(*fw.qkv(), backend=1)


class Declines:
    name = "declines"
    frameworks = frozenset({"torch", "jax"})
    devices = frozenset({"cpu"})
    priority = 10**6  # would win "auto" if it accepted

    def __init__(self):
        self.calls = 0

    def available(self):
        return True, ""

    def check(self, call):
        return [f"head_dim {call.Dqk} > 8", "softcap not supported"]

    def forward(self, *args):
        self.calls += 1
        raise AssertionError("forward of a declining backend ran")

    backward = forward


def test_named_backend_that_cannot_run_raises_every_reason(fw):
    d = Declines()
    REGISTRY.register(d)
    try:
        with pytest.raises(longflash.UnsupportedError) as exc:
            attn(*fw.qkv(), backend="declines")
        assert "head_dim 16 > 8" in str(exc.value)
        assert "softcap not supported" in str(exc.value)
        assert exc.value.reasons["declines"] == ["head_dim 16 > 8", "softcap not supported"]
        # the same through use_backend: obeyed, no fallback
        with longflash.use_backend("declines"), pytest.raises(longflash.UnsupportedError):
            longflash.attention(*fw.qkv())
        assert d.calls == 0
    finally:
        REGISTRY.unregister("declines")


def test_unavailable_backend_by_name_says_why(fw):
    infos = {b.name: b for b in longflash.backends()}
    if infos["cuda"].available:
        pytest.skip("the cuda backend is available here")
    with pytest.raises(longflash.UnsupportedError) as exc:
        attn(*fw.qkv(), backend="cuda")
    assert infos["cuda"].reason in str(exc.value)


# -- non-contiguous inputs: handled or copied, never misread --------------------------------
def _torch_views(torch, base_q, base_k, base_v, kind):
    def view(t):
        if kind == "transposed":
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        if kind == "sliced_heads":
            wide = torch.full(t.shape[:2] + (2 * t.shape[2], t.shape[3]), math.nan)
            wide[:, :, ::2] = t
            return wide[:, :, ::2]
        if kind == "strided_dim":
            wide = torch.full(t.shape[:3] + (2 * t.shape[3],), math.nan)
            wide[..., 1::2] = t
            return wide[..., 1::2]
        if kind == "padded_dim":
            wide = torch.full(t.shape[:3] + (t.shape[3] + 5,), math.nan)
            wide[..., 2:-3] = t
            return wide[..., 2:-3]
        if kind == "expanded":
            return t[:1].expand(t.shape)
        raise AssertionError(kind)

    if kind == "expanded":  # k and v broadcast over the batch; q as it is
        return base_q, view(base_k), view(base_v)
    return view(base_q), view(base_k), view(base_v)


@pytest.mark.parametrize(
    "kind", ["transposed", "sliced_heads", "strided_dim", "padded_dim", "expanded"]
)
def test_noncontiguous_torch_matches_contiguous(spy, kind):
    torch = pytest.importorskip("torch")
    spy.allowed = True
    torch.manual_seed(0)
    q0, k0, v0 = torch.randn(2, 19, 4, 16), torch.randn(2, 23, 2, 16), torch.randn(2, 23, 2, 8)
    if kind == "expanded":
        k0, v0 = k0[:1].expand(k0.shape).contiguous(), v0[:1].expand(v0.shape).contiguous()
    views = _torch_views(torch, q0, k0, v0, kind)
    assert not all(t.is_contiguous() for t in views)
    dout = torch.randn(2, 19, 4, 8).transpose(1, 2).contiguous().transpose(1, 2)

    def run(q, k, v):
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out, lse = longflash.attention(q, k, v, causal=True, return_lse=True, backend="spy")
        return (out, lse) + torch.autograd.grad(out, (q, k, v), dout)

    got = run(*views)
    want = run(q0.clone(), k0.clone(), v0.clone())
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


def test_jax_transposed_inputs_match(spy):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    spy.allowed = True
    rng = np.random.default_rng(0)
    # (B, H, N, D) storage transposed inside jit: XLA may hand the backend any layout
    q = jnp.asarray(rng.standard_normal((2, 4, 19, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 2, 23, 16)), jnp.float32)

    @jax.jit
    def f(q, k):
        qt, kt = jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2)
        return longflash.attention(qt, kt, kt, causal=True, backend="spy")

    got = f(q, k)
    want = longflash.attention(
        jnp.swapaxes(q, 1, 2).copy(),
        jnp.swapaxes(k, 1, 2).copy(),
        jnp.swapaxes(k, 1, 2).copy(),
        causal=True,
        backend="spy",
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
