"""The shared conformance suite every LongFlash backend runs (DESIGN §4).

In a backend package's tests, one line::

    TestTritonConformance = longflash.testing.conformance_suite("triton", framework="torch")

What is here:

- :func:`conformance_suite`: the pytest class factory (cases, dtypes, must-raise logic).
- :func:`check_case`: one case against one backend, usable outside pytest.
- :func:`attention_oracle` / :func:`blockwise_oracle`: exact attention in float64 on the
  host, and in float32 on the device block by block for long sequences; both written
  from the API's definition, independent of every backend.
- :data:`TOLERANCES` and :func:`compare`: relative Frobenius error bounds per dtype.
- :func:`poisoned`: NaN-fill every torch allocation so unwritten outputs fail.

Importing this package imports neither a framework nor pytest nor hypothesis; they load
when a suite is built or run.
"""

from __future__ import annotations

from longflash.testing.cases import Case
from longflash.testing.oracle import OracleResult, attention_oracle, blockwise_oracle
from longflash.testing.poison import poisoned
from longflash.testing.suite import DEFAULT_DTYPES, check_case, conformance_suite
from longflash.testing.tolerances import TOLERANCES, compare, rel_error

__all__ = [
    "DEFAULT_DTYPES",
    "TOLERANCES",
    "Case",
    "OracleResult",
    "attention_oracle",
    "blockwise_oracle",
    "check_case",
    "compare",
    "conformance_suite",
    "poisoned",
    "rel_error",
]
