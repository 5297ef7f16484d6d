"""LongFlash: IO-aware exact attention for PyTorch and JAX.

Importing longflash imports no framework and no backend: backends are discovered on
first use through the ``longflash.backends`` entry points.
"""

from __future__ import annotations

from longflash.api import attention, attention_varlen, explain
from longflash.call import AttentionCall
from longflash.errors import UnsupportedError
from longflash.registry import (
    Backend,
    BackendInfo,
    backends,
    get_backend,
    set_backend,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionCall",
    "Backend",
    "BackendInfo",
    "UnsupportedError",
    "attention",
    "attention_varlen",
    "backends",
    "explain",
    "get_backend",
    "set_backend",
    "use_backend",
    "__version__",
]


def __getattr__(name: str):
    # `longflash.distributed` and `longflash.testing` load on first access.
    if name in ("distributed", "testing"):
        import importlib

        return importlib.import_module(f"longflash.{name}")
    raise AttributeError(f"module 'longflash' has no attribute {name!r}")
