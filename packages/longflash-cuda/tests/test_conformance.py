"""The shared conformance suite (DESIGN §4) for the cuda backend, torch and jax front-ends.

It needs an sm_90 GPU; elsewhere the module is skipped with the backend's own reason."""

from __future__ import annotations

import importlib.util

import pytest
from longflash_cuda import _lib, backend

testing = pytest.importorskip("longflash.testing")
if not hasattr(testing, "conformance_suite"):
    pytest.skip("longflash.testing.conformance_suite has not landed yet", allow_module_level=True)
_ok, _why = backend.available()
if not _ok:
    pytest.skip(f"cuda backend unavailable: {_why}", allow_module_level=True)

# Without a pip install (sources on PYTHONPATH, library from $LONGFLASH_CUDA_LIB) there is no
# entry point: register the object itself so the suite finds the real backend.
from longflash.registry import REGISTRY  # noqa: E402

REGISTRY.register(backend, replace=True)

TestConformanceTorch = testing.conformance_suite("cuda", framework="torch")

_lib_handle, _ = _lib.load()
if importlib.util.find_spec("jax") is not None and _lib.has_xla_ffi(_lib_handle):
    TestConformanceJax = testing.conformance_suite("cuda", framework="jax")
