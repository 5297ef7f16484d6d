"""LongFlash backend "pallas": exact attention written in JAX Pallas.

Importing this package is cheap and never fails: it imports neither jax nor the kernels.
They load on the first ``forward``/``backward`` call.
"""

from __future__ import annotations

from longflash_jax.backend import CAPABILITIES, INTERPRET_ENV, Capabilities, PallasBackend

backend = PallasBackend()

__version__ = "0.1.0"

__all__ = ["CAPABILITIES", "INTERPRET_ENV", "Capabilities", "PallasBackend", "backend"]
