"""Compatibility shim for Triton's interpreter (TRITON_INTERPRET=1), applied before launch.

Triton 3.6's interpreter keeps every scalar as a 1-element array and converts it with
``int(array)``, which NumPy >= 2.3 rejects for arrays of rank 1; so ``tl.range`` with
run-time bounds (every loop of ours) fails there. Converting through ``.item()`` is what
was meant. The patch only touches the interpreter and is undone with it after each launch.
"""

from __future__ import annotations

import functools


@functools.cache
def patch() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
