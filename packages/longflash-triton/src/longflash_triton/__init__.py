"""LongFlash backend "triton": FlashAttention forward and backward kernels in Triton.

Importing this package is cheap and needs no GPU: torch and triton are imported when the
backend is first asked to run (``available()``, ``forward``, ``backward``).
"""

from __future__ import annotations

from longflash_triton.backend import CAPABILITIES, Capabilities, TritonBackend

backend = TritonBackend()

__version__ = "0.1.0"
__all__ = ["CAPABILITIES", "Capabilities", "TritonBackend", "backend", "__version__"]
