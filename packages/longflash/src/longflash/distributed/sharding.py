"""shard_sequence / unshard_sequence: cut a global sequence into rank shards and back.

Works on torch tensors, JAX arrays and NumPy arrays; the framework is read from the array
type without importing another one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from longflash.distributed.schedule import check_length, chunks_per_rank, rank_chunks


def _concat(parts: Sequence[Any], dim: int) -> Any:
    first = parts[0]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(first, torch.Tensor):
        return torch.cat(list(parts), dim=dim)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(first, jax.Array):
        return jax.numpy.concatenate(list(parts), axis=dim)
    import numpy as np

    return np.concatenate(list(parts), axis=dim)


def _axis(x: Any, dim: int) -> int:
    ndim = len(x.shape)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for an array of rank {ndim}")
    return dim % ndim


def _take(x: Any, dim: int, start: int, stop: int) -> Any:
    return x[(slice(None),) * dim + (slice(start, stop),)]


def shard_sequence(x: Any, rank: int, world_size: int, layout: str = "zigzag", dim: int = 1) -> Any:
    """This rank's shard of ``x`` along the sequence axis ``dim``.

    layout "contiguous": tokens [rank·N/P, (rank+1)·N/P). layout "zigzag": the sequence is
    cut into 2P chunks and the shard is chunk ``rank`` followed by chunk 2P-1-rank.
    N must be divisible by P (contiguous) or 2P (zigzag).
    """
    dim = _axis(x, dim)
    chunk = check_length(x.shape[dim], world_size, layout)
    parts = [
        _take(x, dim, c * chunk, (c + 1) * chunk) for c in rank_chunks(rank, world_size, layout)
    ]
    return parts[0] if len(parts) == 1 else _concat(parts, dim)


def unshard_sequence(shards: Sequence[Any], layout: str = "zigzag", dim: int = 1) -> Any:
    """The global sequence from every rank's shard, given in rank order."""
    shards = list(shards)
    if not shards:
        raise ValueError("shards must hold one array per rank, got none")
    world_size = len(shards)
    dim = _axis(shards[0], dim)
    per = chunks_per_rank(layout)
    local = shards[0].shape[dim]
    for r, s in enumerate(shards):
        if s.shape[dim] != local:
            raise ValueError(
                f"every shard must have the same length along dim {dim}; shard 0 has "
                f"{local}, shard {r} has {s.shape[dim]}"
            )
    if local % per:
        raise ValueError(f"shard length {local} must be divisible by {per} for layout {layout!r}")
    chunk = local // per
    pieces: list[Any] = [None] * (world_size * per)
    for r, s in enumerate(shards):
        for i, c in enumerate(rank_chunks(r, world_size, layout)):
            pieces[c] = _take(s, dim, i * chunk, (i + 1) * chunk)
    return _concat(pieces, dim)
