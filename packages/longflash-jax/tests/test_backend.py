"""The Backend object: registration, availability, what check() declines, and selection."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import jax.numpy as jnp
import longflash
import pytest
from longflash.call import AttentionCall
from longflash.registry import REGISTRY
from longflash_jax import CAPABILITIES, INTERPRET_ENV, backend


def _call(**kw) -> AttentionCall:
    base = dict(
        framework="jax",
        device="cuda",
        dtype="bfloat16",
        B=1,
        Nq=64,
        Nk=64,
        Hq=2,
        Hk=2,
        Dqk=64,
        Dv=64,
        causal=False,
        scale=0.125,
    )
    base.update(kw)
    return AttentionCall(**base)


def test_entry_point_is_registered():
    eps = metadata.entry_points(group="longflash.backends")
    assert any(ep.name == "pallas" and ep.value == "longflash_jax:backend" for ep in eps)
    assert REGISTRY.get("pallas") is backend
    assert backend.priority == 50 and backend.frameworks == frozenset({"jax"})


def test_import_is_cheap():
    code = "import sys, longflash_jax; assert 'jax' not in sys.modules, 'jax imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_available():
    assert backend.available() == (True, "")


def test_accepts_every_feature_on_cuda():
    for kw in [
        dict(causal=True, window=(None, 0)),
        dict(window=(8, 3)),
        dict(softcap=30.0),
        dict(Hq=8, Hk=1),
        dict(Dqk=256, Dv=96),
        dict(Nq=5, Nk=900),
        dict(dtype="float16"),
    ]:
        assert backend.check(_call(**kw)) == [], kw


def test_declines_with_reasons():
    reasons = backend.check(_call(dtype="float32", Dqk=320, Dv=512, device="rocm"))
    text = "\n".join(reasons)
    assert len(reasons) == 4
    assert "float32" in text and "head_dim 320 > 256" in text and "512" in text
    assert "rocm" in text


def test_cpu_needs_interpret_opt_in(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    [reason] = backend.check(_call(device="cpu"))
    assert INTERPRET_ENV in reason
    monkeypatch.setenv(INTERPRET_ENV, "1")
    assert backend.check(_call(device="cpu")) == []


def test_auto_on_cpu_picks_reference(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    assert REGISTRY.select(_call(device="cpu"), "auto").name == "reference"
    assert REGISTRY.select(_call(device="cuda"), "auto").name in ("cuda", "pallas")


def test_named_backend_raises_when_declined():
    q = jnp.zeros((1, 8, 2, 32), jnp.float32)
    with pytest.raises(longflash.UnsupportedError, match="float32"):
        longflash.attention(q, q, q, backend="pallas")


def test_capabilities_are_the_single_source():
    assert "bfloat16" in CAPABILITIES.dtypes and "float16" in CAPABILITIES.dtypes
    assert backend.check(_call(Dqk=CAPABILITIES.max_head_dim)) == []
    assert backend.check(_call(Dqk=CAPABILITIES.max_head_dim + 1)) != []
