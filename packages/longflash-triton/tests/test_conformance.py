"""The shared conformance suite (DESIGN §4), parameterised by this backend."""

from __future__ import annotations

import pytest

testing = pytest.importorskip("longflash.testing")
if not hasattr(testing, "conformance_suite"):
    pytest.skip("longflash.testing.conformance_suite has not landed yet", allow_module_level=True)

TestConformance = testing.conformance_suite("triton", framework="torch")
