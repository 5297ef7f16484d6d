"""The conformance suite against the reference backend, in both front-ends."""

from __future__ import annotations

import pytest
from longflash.testing import conformance_suite

pytest.importorskip("hypothesis")

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - a jax-only environment
    pass
else:
    TestReferenceTorch = conformance_suite("reference", framework="torch")

try:
    import jax  # noqa: F401
except ImportError:  # pragma: no cover - a torch-only environment
    pass
else:
    TestReferenceJax = conformance_suite("reference", framework="jax")
