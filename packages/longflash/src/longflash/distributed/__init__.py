"""Sequence parallelism: one attention whose sequence is split over several devices.

- ``ring_attention``: K/V shards travel around a ring of P devices; each step's block is
  computed while the next shard is in flight. Layout "zigzag" (2P chunks, rank r holds
  r and 2P-1-r) balances causal work; "contiguous" is the plain split.
- ``ulysses_attention``: all-to-all from sequence shards to head shards, full attention,
  all-to-all back. Needs heads divisible by P.
- ``shard_sequence`` / ``unshard_sequence``: the layouts' cut and paste.

PyTorch: pass a process group as ``group`` (default: the world). JAX: call inside
``shard_map`` with the mesh axis as ``axis_name``. The framework is read from the array
type; neither framework is imported unless its arrays are passed.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from longflash.distributed.schedule import LAYOUTS, Block, schedule, step_blocks
from longflash.distributed.sharding import shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "Block",
    "ring_attention",
    "schedule",
    "shard_sequence",
    "step_blocks",
    "ulysses_attention",
    "unshard_sequence",
]


def _impl(q: Any, group: Any, axis_name: Any, fn: str) -> tuple[ModuleType, dict[str, Any]]:
    """The implementation for q's framework and where its ranks are (group or axis)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(q, torch.Tensor):
        if axis_name is not None:
            raise ValueError(
                f"{fn}: axis_name is for JAX (inside shard_map); with torch tensors pass a "
                "process group as group="
            )
        from longflash.distributed import torch as impl

        return impl, {"group": group}
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(q, jax.Array):
        if group is not None:
            raise ValueError(
                f"{fn}: group is a torch.distributed process group; with JAX arrays call "
                "inside shard_map and pass the mesh axis as axis_name="
            )
        if axis_name is None:
            raise ValueError(
                f"{fn}: with JAX arrays, call inside shard_map and pass the mesh axis "
                "over which the sequence is sharded as axis_name="
            )
        from longflash.distributed import jax as impl

        return impl, {"axis_name": axis_name}
    raise TypeError(
        f"q must be a torch.Tensor or a jax.Array, got {type(q).__module__}.{type(q).__name__}"
    )


def ring_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    group: Any = None,
    axis_name: Any = None,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    backend: str | None = None,
) -> Any:
    """Exact attention over a sequence sharded across ranks, by a K/V ring.

    Args:
        q: this rank's query shard, (batch, seqlen/P, heads_q, head_dim), cut from the
            global sequence by ``shard_sequence(x, rank, P, layout)``. Every rank passes
            shards of the same shape.
        k: this rank's key shard, (batch, seqlen/P, heads_k, head_dim).
        v: this rank's value shard, (batch, seqlen/P, heads_k, head_dim_v).
        group: torch process group (default: the world). JAX: leave None.
        axis_name: JAX mesh axis the sequence is sharded over (inside shard_map).
        causal: causal mask over the global sequence.
        scale: multiplies q·k; defaults to 1/sqrt(head_dim).
        window: (left, right) sliding window over the global sequence, either side
            None (unbounded): query i sees key j iff i - left <= j <= i + right (with
            causal, right = 0). Ring steps whose K/V the band misses compute nothing.
        softcap: c > 0 replaces each score s by c·tanh(s/c).
        layout: "zigzag" (default; balances causal work) or "contiguous".
        return_lse: also return this shard's lse, float32 (batch, heads_q, seqlen/P).
        backend: the backend that runs every block (any backend that returns the lse);
            defaults to the one set by set_backend/use_backend.

    Returns:
        This rank's shard of the output, in the same layout, or (out, lse).
    """
    impl, where = _impl(q, group, axis_name, "ring_attention")
    return impl.ring_attention(
        q,
        k,
        v,
        **where,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
        layout=layout,
        return_lse=return_lse,
        backend=backend,
    )


def ulysses_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    group: Any = None,
    axis_name: Any = None,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Any:
    """Exact attention over a sequence sharded across ranks, by all-to-all (Ulysses).

    Shards are in the contiguous layout. Heads (q's and k/v's) must be divisible by P.
    Every mask the backend supports works, windows included: after the exchange each rank
    runs full attention over the whole sequence for 1/P of the heads.
    """
    impl, where = _impl(q, group, axis_name, "ulysses_attention")
    return impl.ulysses_attention(
        q,
        k,
        v,
        **where,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
        return_lse=return_lse,
        backend=backend,
    )
