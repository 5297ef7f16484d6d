"""Sequence layouts and the ring's per-step block schedule, in plain Python.

The global sequence is cut into equal chunks. A layout says which chunks each rank holds,
always in ascending global order (so a rank's shard is its chunks concatenated):

- "contiguous": P chunks, rank r holds chunk r.
- "zigzag": 2P chunks, rank r holds chunks r and 2P-1-r. Under a causal mask every rank
  then does the same amount of work (an early chunk paired with a late one).

At ring step s, rank r holds the K/V shard of rank (r - s) mod P. ``step_blocks`` turns the
chunk-level visibility between the rank's queries and that K/V shard into as few attention
calls as possible, each a rectangle of the local shards that is either fully visible
(causal=False) or causal aligned to its bottom-right corner (causal=True). Pairs that see
nothing are not computed. Front-ends (torch, JAX) and the benchmark's schedule simulation
all use these blocks, so what is timed is what runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

LAYOUTS = ("contiguous", "zigzag")

# Chunk-pair visibility under the mask.
_NONE, _FULL, _DIAG = 0, 1, 2


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if check_layout(layout) == "zigzag" else 1


def rank_chunks(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """Global chunk ids held by ``rank``, in the order they sit in its shard."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if check_layout(layout) == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def check_length(total: int, world_size: int, layout: str, what: str = "sequence") -> int:
    """Chunk length for a global length ``total``; a clear error if it does not divide."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    n_chunks = world_size * chunks_per_rank(layout)
    if total % n_chunks:
        raise ValueError(
            f"{what} length {total} must be divisible by {n_chunks} for layout {layout!r} "
            f"with {world_size} ranks ({'2P chunks' if layout == 'zigzag' else 'P chunks'})"
        )
    return total // n_chunks


def source_rank(rank: int, step: int, world_size: int) -> int:
    """The rank whose K/V shard ``rank`` holds at ring ``step`` (K/V move to rank+1)."""
    return (rank - step) % world_size


@dataclass(frozen=True)
class Block:
    """One attention call of a ring step, in token offsets of the local shards.

    Queries [q0, q1) of this rank's shard against keys [k0, k1) of the K/V shard held at
    this step. causal=True means the causal mask aligned to the block's bottom-right
    corner; otherwise every pair in the rectangle is visible. The blocks of one step
    cover disjoint query rows.
    """

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool

    @property
    def nq(self) -> int:
        return self.q1 - self.q0

    @property
    def nk(self) -> int:
        return self.k1 - self.k0

    def pairs(self) -> int:
        """Number of visible (query, key) pairs: the block's share of the work."""
        if not self.causal:
            return self.nq * self.nk
        off = self.nk - self.nq
        return sum(max(0, min(self.nk, i + off + 1)) for i in range(self.nq))


def step_blocks(
    rank: int, step: int, world_size: int, layout: str, causal: bool, local_len: int
) -> tuple[Block, ...]:
    """The attention calls rank ``rank`` makes at ring step ``step``.

    ``local_len`` is the length of one rank's shard (queries and keys alike).
    """
    per = chunks_per_rank(layout)
    if local_len % per:
        raise ValueError(
            f"local sequence length {local_len} must be divisible by {per} for layout {layout!r}"
        )
    chunk = local_len // per
    return tuple(
        Block(b.q0 * chunk, b.q1 * chunk, b.k0 * chunk, b.k1 * chunk, b.causal)
        for b in _chunk_blocks(rank, step, world_size, layout, causal)
    )


@functools.lru_cache(maxsize=4096)
def _chunk_blocks(
    rank: int, step: int, world_size: int, layout: str, causal: bool
) -> tuple[Block, ...]:
    """step_blocks in chunk units (cached: it runs for every call)."""
    if not 0 <= step < world_size:
        raise ValueError(f"step must be in [0, {world_size}), got {step}")
    mine = rank_chunks(rank, world_size, layout)
    theirs = rank_chunks(source_rank(rank, step, world_size), world_size, layout)
    vis = [[_visibility(qc, kc, causal) for kc in theirs] for qc in mine]

    whole = _rectangle(vis, range(len(mine)))
    if whole is not None:
        return (whole,) if whole.nq else ()
    # Row by row, then adjacent fully visible rows over the same keys joined again. Each
    # row is one call at most, so a step's blocks never share a query row.
    blocks: list[Block] = []
    for i in range(len(mine)):
        row = _rectangle(vis, range(i, i + 1))
        if row is None:  # pragma: no cover - a chunk row of these layouts is contiguous
            raise RuntimeError(f"layout {layout!r} gives a query chunk no single block")
        if row.nq:
            last = blocks[-1] if blocks else None
            if (
                last is not None
                and not last.causal
                and not row.causal
                and last.q1 == row.q0
                and (last.k0, last.k1) == (row.k0, row.k1)
            ):
                blocks[-1] = Block(last.q0, row.q1, row.k0, row.k1, False)
            else:
                blocks.append(row)
    return tuple(blocks)


def _visibility(q_chunk: int, k_chunk: int, causal: bool) -> int:
    if not causal or k_chunk < q_chunk:
        return _FULL
    return _DIAG if k_chunk == q_chunk else _NONE


def _rectangle(vis: list[list[int]], rows: range) -> Block | None:
    """The bounding box of the visible pairs in ``rows`` as one call, if the pairs inside
    are exactly a fully visible or a bottom-right causal rectangle; else None. An empty
    selection gives an empty block."""
    cells = [(i, j) for i in rows for j, v in enumerate(vis[i]) if v]
    if not cells:
        return Block(0, 0, 0, 0, False)
    i0, i1 = min(i for i, _ in cells), max(i for i, _ in cells) + 1
    j0, j1 = min(j for _, j in cells), max(j for _, j in cells) + 1
    box = [[vis[i][j] for j in range(j0, j1)] for i in range(i0, i1)]
    if all(v == _FULL for r in box for v in r):
        return Block(i0, i1, j0, j1, False)
    off = (j1 - j0) - (i1 - i0)
    want = [
        [_FULL if j < i + off else _DIAG if j == i + off else _NONE for j in range(j1 - j0)]
        for i in range(i1 - i0)
    ]
    if box == want:
        return Block(i0, i1, j0, j1, True)
    return None


def schedule(
    world_size: int, layout: str, causal: bool, local_len: int
) -> list[list[tuple[Block, ...]]]:
    """schedule[rank][step]: every rank's blocks at every step."""
    return [
        [step_blocks(r, s, world_size, layout, causal, local_len) for s in range(world_size)]
        for r in range(world_size)
    ]


def work_per_rank(world_size: int, layout: str, causal: bool, local_len: int) -> list[int]:
    """Visible (query, key) pairs each rank computes over the whole ring: its compute load."""
    return [
        sum(b.pairs() for step in rank_steps for b in step)
        for rank_steps in schedule(world_size, layout, causal, local_len)
    ]
