"""The backend object: discovery, availability reasons and check() decisions. CPU-runnable."""

from __future__ import annotations

import subprocess
import sys

import longflash
import pytest
from longflash.call import AttentionCall
from longflash_cuda import HEAD_DIMS, _lib, backend

lib, why = _lib.load()


def make_call(**kw) -> AttentionCall:
    base = dict(
        framework="torch",
        device="cuda",
        dtype="bfloat16",
        B=2,
        Nq=128,
        Nk=128,
        Hq=8,
        Hk=2,
        Dqk=128,
        Dv=128,
        causal=False,
        scale=0.088,
    )
    base.update(kw)
    return AttentionCall(**base)


def test_missing_library_is_a_reason_not_an_error(tmp_path, monkeypatch):
    from longflash_cuda import CudaBackend

    monkeypatch.setattr(_lib, "_state", None)
    monkeypatch.setattr(_lib, "candidates", lambda: [tmp_path / "missing.so"])
    fresh = CudaBackend()
    ok, reason = fresh.available()
    assert not ok
    assert "not built or not found" in reason and "missing.so" in reason
    assert fresh.check(make_call()) == [reason]


def test_import_does_not_import_frameworks():
    code = "import sys, longflash_cuda; print('torch' in sys.modules, 'jax' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_registered_through_entry_point():
    from importlib import metadata

    try:
        metadata.distribution("longflash-cuda")
    except metadata.PackageNotFoundError:
        pytest.skip("longflash-cuda is not pip-installed (no entry point metadata)")
    names = [b.name for b in longflash.backends()]
    assert "cuda" in names
    info = {b.name: b for b in longflash.backends()}["cuda"]
    assert info.priority == 100
    assert info.frameworks == frozenset({"torch", "jax"})


def test_available_gives_a_reason_without_a_hopper_gpu():
    ok, reason = backend.available()
    if ok:
        pytest.skip("running on an sm_90 GPU")
    assert reason
    if lib is not None:
        # The library loaded, so the reason is about the device: which device, or no driver.
        assert "sm_" in reason or "CUDA" in reason or "device" in reason, reason


@pytest.mark.skipif(lib is None, reason=f"library not built: {why}")
class TestCheck:
    def compiled(self):
        return _lib.compiled_head_dims(lib)

    def test_accepts_compiled_call(self):
        for dtype, dims in self.compiled().items():
            for dqk, dv in dims:
                assert backend.check(make_call(dtype=dtype, Dqk=dqk, Dv=dv)) == []

    def test_declines_with_reasons(self):
        reasons = backend.check(make_call(device="cpu", dtype="float32", Dqk=320, Dv=320))
        text = " | ".join(reasons)
        assert "not a CUDA GPU" in text
        assert "float32" in text
        assert "head_dim (qk 320" in text
        assert len(reasons) == 3

    def test_declines_uncompiled_head_dim(self):
        compiled = self.compiled()
        for dtype in ("float16", "bfloat16"):
            for dims in HEAD_DIMS - compiled[dtype]:
                reasons = backend.check(make_call(dtype=dtype, Dqk=dims[0], Dv=dims[1]))
                assert any("not compiled in this build" in r for r in reasons)
                return
        pytest.skip("every head dim is compiled")

    def test_declines_nonpositive_scale_and_huge_grid(self):
        assert any("scale" in r for r in backend.check(make_call(scale=-1.0)))
        assert any("65535" in r for r in backend.check(make_call(Hq=70000, Hk=1)))

    def test_jax_needs_ffi_handlers(self):
        reasons = backend.check(make_call(framework="jax"))
        assert (reasons == []) == _lib.has_xla_ffi(lib)
