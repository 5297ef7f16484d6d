"""The public attention API: one entry point for PyTorch tensors and JAX arrays."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from longflash.registry import REGISTRY


def _frontend(x: Any) -> ModuleType:
    """The front-end for x's framework, found without importing a framework."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        from longflash.frontends import torch as fe

        return fe
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        from longflash.frontends import jax as fe

        return fe
    raise TypeError(
        f"q must be a torch.Tensor or a jax.Array, got {type(x).__module__}.{type(x).__name__}"
    )


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Any:
    """Exact softmax attention, computed without materialising the score matrix.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim) tensor or array.
        k: (batch, seqlen_k, heads_k, head_dim); heads_q must be a multiple of heads_k
            (multi-query and grouped-query attention).
        v: (batch, seqlen_k, heads_k, head_dim_v); head_dim_v may differ from head_dim.
        causal: query i sees key j iff j <= i + (seqlen_k - seqlen_q), i.e. the mask is
            aligned to the bottom-right corner when the lengths differ.
        scale: multiplies q·k; defaults to 1/sqrt(head_dim).
        window: (left, right) sliding window; either side may be None (unbounded).
            Query i sees key j iff i+off-left <= j <= i+off+right, off = seqlen_k -
            seqlen_q. With causal=True, right is 0.
        softcap: c > 0 replaces each score s by c·tanh(s/c).
        return_lse: also return the log-sum-exp of each row, float32, natural log,
            shape (batch, heads_q, seqlen_q).
        backend: a registered backend name or "auto"; defaults to the one set by
            set_backend/use_backend. A named backend that cannot run the call raises
            UnsupportedError listing why; there is no silent fallback.

    Returns:
        out with shape (batch, seqlen_q, heads_q, head_dim_v) in q's dtype, or (out, lse).
        Rows that see no key give out = 0 and lse = -inf.
    """
    return _frontend(q).attention(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
        return_lse=return_lse,
        backend=backend,
    )


def attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Any:
    """Attention over a packed batch of sequences of different lengths.

    Args:
        q: (total_q, heads_q, head_dim): the sequences concatenated along axis 0.
        k: (total_k, heads_k, head_dim).
        v: (total_k, heads_k, head_dim_v).
        cu_seqlens_q: int32, length batch+1, prefix sums of the query lengths starting at
            0; sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]].
        cu_seqlens_k: the same for keys and values.
        max_seqlen_q: the longest query sequence, if known (saves a device-to-host read).
        max_seqlen_k: the longest key sequence, if known.
        causal: as in attention(); the offset seqlen_k - seqlen_q is per sequence.
        scale: as in attention().
        window: as in attention(), per sequence.
        softcap: as in attention().
        return_lse: also return the log-sum-exp, float32, shape (heads_q, total_q).
        backend: as in attention().

    Returns:
        out (total_q, heads_q, head_dim_v), or (out, lse) with lse (heads_q, total_q).
    """
    return _frontend(q).attention_varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
        return_lse=return_lse,
        backend=backend,
    )


def explain(q: Any, k: Any, v: Any, **kwargs: Any) -> str:
    """For each backend: whether it accepts this call, or every reason it declines.

    Takes the arguments of attention() (or of attention_varlen() when cu_seqlens_q and
    cu_seqlens_k are given as keywords) without running anything.
    """
    kwargs.pop("return_lse", None)
    kwargs.pop("backend", None)
    call = _frontend(q).make_call(q, k, v, **kwargs)
    return REGISTRY.explain(call)
