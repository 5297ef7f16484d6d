"""Exceptions raised by LongFlash."""

from __future__ import annotations


class UnsupportedError(ValueError):
    """The chosen backend cannot run this call.

    The message lists every reason, one per line, so that a user sees at once what
    to change (head dim, dtype, feature) or which backend to pick instead.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]] | None = None):
        super().__init__(message)
        #: backend name -> the reasons it declined (empty when unknown)
        self.reasons: dict[str, list[str]] = dict(reasons or {})
