"""NaN-poisoning of the memory a backend allocates, so that unwritten elements fail.

PyTorch: under ``torch.use_deterministic_algorithms(True)`` with
``torch.utils.deterministic.fill_uninitialized_memory = True``, every ``torch.empty``
(Python or C++ ``at::empty``, CPU or CUDA) comes back filled with NaN for floating dtypes
and with the largest value for integer ones. An output element a kernel forgets to write
then reads as NaN, and the suite fails on any NaN. ``warn_only=True`` keeps operations
that have no deterministic implementation running (with a warning, which is silenced
here: it says nothing about the backend's correctness).

One side effect to know about: a backend that consults
``torch.are_deterministic_algorithms_enabled()`` runs its deterministic path under the
suite.

JAX: nothing to poison. JAX arrays are immutable values and XLA defines every element of
every result, so there is no uninitialised buffer to fill. (A Pallas kernel running in
interpret mode can ask for NaN-filled uninitialised memory through its own interpret
parameters; that is the backend's business.)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """NaN-fill every ``torch.empty`` inside the block; restore the settings after."""
    import torch
    import torch.utils.deterministic as det

    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            for message in (
                ".*does not have a deterministic implementation.*",
                ".*CUBLAS_WORKSPACE_CONFIG.*",
            ):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        det.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
