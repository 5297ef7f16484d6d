"""The backend registry: lazy discovery, selection, per-thread choice, plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from importlib import metadata
from pathlib import Path

import longflash
import pytest
from longflash import registry as reg

HERE = Path(__file__).resolve().parent


def _python(code: str, *, path: list[str] | None = None, timeout: float = 120) -> str:
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- import cost -------------------------------------------------------------------
HEAVY = ("torch", "jax", "jaxlib", "triton", "pytest", "hypothesis")


@pytest.mark.parametrize("module", ["longflash", "longflash.testing"])
def test_import_loads_no_framework_and_no_backend(module):
    out = _python(f"""
        import json, sys
        import {module}
        heavy = {HEAVY!r}
        print(json.dumps(sorted(
            m for m in sys.modules
            if m.split(".")[0] in heavy or m.startswith("longflash_"))))
    """)
    assert json.loads(out) == []


# -- listing -------------------------------------------------------------------------
def test_backends_lists_first_party_backends_with_reasons():
    infos = {b.name: b for b in longflash.backends()}
    assert {"reference", "cuda", "triton", "pallas"} <= set(infos)
    ref = infos["reference"]
    assert ref.available and ref.frameworks == frozenset({"torch", "jax"})
    for name, (dist, extra) in reg.KNOWN_PACKAGES.items():
        info = infos[name]
        assert isinstance(info, longflash.BackendInfo)
        if info.available:
            continue
        assert info.reason, f"{name} is unavailable without a reason"
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            assert f"pip install 'longflash[{extra}]'" in info.reason
            assert dist in info.reason


# -- choosing ------------------------------------------------------------------------
@pytest.fixture
def restore_choice():
    before = longflash.get_backend()
    longflash.set_backend("auto")
    yield
    longflash.set_backend(before)


def test_default_is_auto():
    # in a fresh interpreter: other tests in this process may have chosen a backend
    assert _python("import longflash; print(longflash.get_backend())").strip() == "auto"


def test_set_backend(restore_choice):
    longflash.set_backend("reference")
    assert longflash.get_backend() == "reference"
    longflash.set_backend("auto")
    assert longflash.get_backend() == "auto"


def test_set_backend_unknown_name_lists_registered_names(restore_choice):
    with pytest.raises(ValueError) as exc:
        longflash.set_backend("no-such-backend")
    message = str(exc.value)
    assert "no-such-backend" in message
    for name in ("reference", "cuda", "triton", "pallas"):
        assert name in message
    assert longflash.get_backend() == "auto"
    with pytest.raises(TypeError):
        longflash.set_backend(3)


def test_use_backend_nests_and_restores(restore_choice):
    with longflash.use_backend("reference"):
        assert longflash.get_backend() == "reference"
        with longflash.use_backend("auto"):
            assert longflash.get_backend() == "auto"
        assert longflash.get_backend() == "reference"
    assert longflash.get_backend() == "auto"
    with pytest.raises(ValueError, match="no-such-backend"):
        with longflash.use_backend("no-such-backend"):
            pass
    with pytest.raises(RuntimeError), longflash.use_backend("reference"):
        raise RuntimeError("unwinds")
    assert longflash.get_backend() == "auto"


def test_use_backend_is_per_thread(restore_choice):
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        inside.wait(10)
        seen["during"] = longflash.get_backend()
        release.set()

    t = threading.Thread(target=worker)
    t.start()
    with longflash.use_backend("reference"):
        inside.set()
        assert release.wait(10)
        assert longflash.get_backend() == "reference"
    t.join(10)
    assert seen["during"] == "auto"

    # set_backend, by contrast, is global
    longflash.set_backend("reference")
    t = threading.Thread(target=lambda: seen.__setitem__("global", longflash.get_backend()))
    t.start()
    t.join(10)
    assert seen["global"] == "reference"


# -- explain ------------------------------------------------------------------------
class Picky:
    """Accepts head_dim <= 32 without softcap; torch only."""

    name = "picky"
    frameworks = frozenset({"torch"})
    devices = frozenset({"cpu"})
    priority = 1000  # above everything: auto must still skip it when it declines

    def __init__(self):
        self.calls = 0

    def available(self):
        return True, ""

    def check(self, call):
        reasons = []
        if call.Dqk > 32:
            reasons.append(f"head_dim {call.Dqk} > 32")
        if call.softcap is not None:
            reasons.append("softcap not supported")
        return reasons

    def forward(self, call, q, k, v):
        self.calls += 1
        from longflash import reference

        return reference.backend.forward(call, q, k, v)

    def backward(self, call, dout, q, k, v, out, lse):
        from longflash import reference

        return reference.backend.backward(call, dout, q, k, v, out, lse)


@pytest.fixture
def picky():
    b = Picky()
    reg.REGISTRY.register(b)
    yield b
    reg.REGISTRY.unregister("picky")


def test_explain_lists_each_backend(picky):
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 8, 2, 64)
    text = longflash.explain(q, q, q, softcap=5.0)
    lines = {line.split(":")[0].strip(): line for line in text.splitlines()}
    assert "declines" in lines["picky"]
    assert "head_dim 64 > 32" in lines["picky"] and "softcap not supported" in lines["picky"]
    assert "accepts" in lines["reference"] and "auto picks this" in lines["reference"]
    for name in ("cuda", "triton", "pallas"):
        assert name in lines

    small = torch.randn(1, 8, 2, 32)
    text = longflash.explain(small, small, small)
    picky_line = [ln for ln in text.splitlines() if ln.strip().startswith("picky")][0]
    assert "accepts" in picky_line and "auto picks this" in picky_line


def test_auto_prefers_priority_and_skips_decliners(picky, restore_choice):
    torch = pytest.importorskip("torch")
    small = torch.randn(1, 8, 2, 32)
    longflash.attention(small, small, small)
    assert picky.calls == 1
    big = torch.randn(1, 8, 2, 64)
    longflash.attention(big, big, big)  # picky declines: auto falls to the reference
    assert picky.calls == 1


def test_named_backend_that_declines_raises_every_reason(picky):
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 8, 2, 64)
    with pytest.raises(longflash.UnsupportedError) as exc:
        longflash.attention(q, q, q, softcap=5.0, backend="picky")
    assert "head_dim 64 > 32" in str(exc.value)
    assert "softcap not supported" in str(exc.value)
    assert exc.value.reasons == {"picky": ["head_dim 64 > 32", "softcap not supported"]}
    assert isinstance(exc.value, ValueError)
    assert picky.calls == 0  # no fallback ran in its place
    with longflash.use_backend("picky"), pytest.raises(longflash.UnsupportedError):
        longflash.attention(q, q, q)
    assert picky.calls == 0


def test_named_backend_of_another_framework_is_refused(picky):
    jnp = pytest.importorskip("jax.numpy")
    q = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(longflash.UnsupportedError, match="jax front-end not supported"):
        longflash.attention(q, q, q, backend="picky")


def test_register_rejects_non_backends_and_duplicates(picky):
    with pytest.raises(TypeError):
        reg.REGISTRY.register(object())
    with pytest.raises(ValueError, match="already registered"):
        reg.REGISTRY.register(Picky())
    reg.REGISTRY.register(Picky(), replace=True)


# -- discovery failures ---------------------------------------------------------------
class _NotABackend:
    name = "odd"


def _registry_with(monkeypatch, *eps: metadata.EntryPoint) -> reg.Registry:
    monkeypatch.setattr(
        reg.metadata, "entry_points", lambda group: [ep for ep in eps if ep.group == group]
    )
    return reg.Registry()


def test_entry_point_whose_import_fails_becomes_unavailable(monkeypatch):
    r = _registry_with(
        monkeypatch,
        metadata.EntryPoint(
            "broken", "longflash_no_such_module_xyz:backend", reg.ENTRY_POINT_GROUP
        ),
    )
    infos = {b.name: b for b in r.info()}
    assert not infos["broken"].available
    assert "longflash_no_such_module_xyz" in infos["broken"].reason
    assert "ModuleNotFoundError" in infos["broken"].reason
    assert infos["reference"].available
    # choosing it by name explains why it cannot run
    backend = r.get("broken")
    assert r.available("broken") == (False, infos["broken"].reason)
    assert backend.check(None) == [infos["broken"].reason]


def test_entry_point_giving_something_else_becomes_unavailable(monkeypatch):
    mod = type(sys)("longflash_test_odd_plugin")
    mod.odd = _NotABackend()
    mod.renamed = Picky()  # its name is "picky", the entry point says "renamed"
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    r = _registry_with(
        monkeypatch,
        metadata.EntryPoint("odd", f"{mod.__name__}:odd", reg.ENTRY_POINT_GROUP),
        metadata.EntryPoint("renamed", f"{mod.__name__}:renamed", reg.ENTRY_POINT_GROUP),
    )
    infos = {b.name: b for b in r.info()}
    assert not infos["odd"].available and "Backend protocol" in infos["odd"].reason
    assert not infos["renamed"].available and "'picky'" in infos["renamed"].reason


def test_entry_points_load_lazily(monkeypatch):
    loaded = []
    mod = type(sys)("longflash_test_lazy_plugin")

    def factory():
        loaded.append(1)
        b = Picky()
        b.name = "lazy"
        return b

    mod.factory = factory
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    r = _registry_with(
        monkeypatch, metadata.EntryPoint("lazy", f"{mod.__name__}:factory", reg.ENTRY_POINT_GROUP)
    )
    assert "lazy" in r.names() and loaded == []  # listed, not loaded
    assert r.get("lazy").name == "lazy" and loaded == [1]
    r.get("lazy")
    assert loaded == [1]  # loaded once


# -- a third-party plugin, installed with pip ------------------------------------------
@pytest.fixture(scope="module")
def toy_site(tmp_path_factory):
    """packages/longflash/tests/plugin_pkg installed into a private target directory
    (built from a copy, so that the build leaves nothing in the source tree)."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("toy")
    src = tmp / "src"
    shutil.copytree(
        HERE / "plugin_pkg",
        src,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    site = tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield site
    shutil.rmtree(tmp, ignore_errors=True)


def test_third_party_plugin_via_entry_point(toy_site):
    pytest.importorskip("torch")
    out = _python(
        """
        import json
        import torch
        import longflash, longflash_toy

        info = {b.name: b for b in longflash.backends()}["toy"]
        longflash.set_backend("toy")
        torch.manual_seed(0)
        q = torch.randn(2, 33, 4, 16, requires_grad=True)
        k = torch.randn(2, 40, 2, 16, requires_grad=True)
        v = torch.randn(2, 40, 2, 8, requires_grad=True)
        out = longflash.attention(q, k, v, causal=True)
        out.sum().backward()
        ref = longflash.attention(q.detach(), k.detach(), v.detach(), causal=True,
                                  backend="reference")
        try:
            longflash.attention(q, k, v, softcap=2.0)
            declined = None
        except longflash.UnsupportedError as exc:
            declined = str(exc)
        print(json.dumps({
            "calls": longflash_toy.CALLS,
            "available": info.available,
            "frameworks": sorted(info.frameworks),
            "priority": info.priority,
            "max_diff": (out - ref).abs().max().item(),
            "grad": q.grad is not None and bool(torch.isfinite(q.grad).all()),
            "declined": declined,
        }))
    """,
        path=[str(toy_site)],
    )
    res = json.loads(out.strip().splitlines()[-1])
    assert res["calls"] == {"forward": 1, "backward": 1}
    assert res["available"] and res["frameworks"] == ["torch"] and res["priority"] == -200
    assert res["max_diff"] < 1e-5
    assert res["grad"]
    assert "softcap not supported" in res["declined"]
