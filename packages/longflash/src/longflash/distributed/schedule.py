"""Sequence layouts and the ring's per-step block schedule, in plain Python.

The global sequence is cut into equal chunks. A layout says which chunks each rank holds,
always in ascending global order (so a rank's shard is its chunks concatenated):

- "contiguous": P chunks, rank r holds chunk r.
- "zigzag": 2P chunks, rank r holds chunks r and 2P-1-r. Under a causal mask every rank
  then does the same amount of work (an early chunk paired with a late one).

At ring step s, rank r holds the K/V shard of rank (r - s) mod P. ``step_blocks`` turns the
visibility between the rank's queries and that K/V shard into as few attention calls as
possible, each a rectangle of the local shards with a mask the backends take as it is:
none, causal, or a window band, aligned to the rectangle's bottom-right corner. Pairs that
see nothing are not computed. Front-ends (torch, JAX) and the benchmark's schedule
simulation all use these blocks, so what is timed is what runs.

Sliding windows. Over the global sequence (Nq = Nk, so the offset is 0) query t sees key u
iff t - left <= u <= t + right. A block of global rows [r0, r1) and keys [c0, c1) whose
corner is shifted by c = c1 - r1 from the global diagonal sees the same band as a
bottom-right aligned window (left + c, right - c). Cropping each (query run, key run) pair
of globally contiguous tokens to the bounding box of its visible pairs makes c lie in
[-left, right], so both sides are >= 0: an ordinary window that every backend accepts
(none needs to honour a negative side; the cuda backend reads one as unbounded). Inside
the box every row sees at least one key, since the band is convex.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from longflash.call import Window, normalize_window

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
    this step, under ``window`` in AttentionCall form: None (every pair visible) or
    (left, right), None = unbounded side, aligned to the block's bottom-right corner, so
    (None, 0) is causal. A side is set only where it cuts the block. Blocks of one step
    share query rows only when a window reaches two key runs (see ``lse_slots``).
    """

    q0: int
    q1: int
    k0: int
    k1: int
    window: Window | None = None

    @property
    def nq(self) -> int:
        return self.q1 - self.q0

    @property
    def nk(self) -> int:
        return self.k1 - self.k0

    @property
    def causal(self) -> bool:
        return self.window == (None, 0)

    def pairs(self) -> int:
        """Number of visible (query, key) pairs: the block's share of the work."""
        if self.window is None:
            return self.nq * self.nk
        left, right = self.window
        off = self.nk - self.nq
        total = 0
        for i in range(self.nq):
            lo = 0 if left is None else max(0, i + off - left)
            hi = self.nk if right is None else min(self.nk, i + off + right + 1)
            total += max(0, hi - lo)
        return total


def step_blocks(
    rank: int,
    step: int,
    world_size: int,
    layout: str,
    causal: bool,
    local_len: int,
    window: Window | None = None,
) -> tuple[Block, ...]:
    """The attention calls rank ``rank`` makes at ring step ``step``.

    ``local_len`` is the length of one rank's shard (queries and keys alike); ``causal``
    and ``window`` are the mask over the global sequence, as ``ring_attention`` takes them.
    """
    per = chunks_per_rank(layout)
    if local_len % per:
        raise ValueError(
            f"local sequence length {local_len} must be divisible by {per} for layout {layout!r}"
        )
    chunk = local_len // per
    band = normalize_window(causal, window)
    if band is not None and band != (None, 0):
        return _band_blocks(rank, step, world_size, layout, chunk, band)
    return tuple(
        Block(b.q0 * chunk, b.q1 * chunk, b.k0 * chunk, b.k1 * chunk, b.window)
        for b in _chunk_blocks(rank, step, world_size, layout, band is not None)
    )


def lse_slots(blocks: tuple[Block, ...]) -> tuple[int, ...]:
    """A slot per block such that blocks sharing a query row get different slots.

    The forward keeps each block's lse for the backward in a per-step array of
    (slots, rows); a row is in at most one block per key run, so a step needs at most
    chunks_per_rank slots, and usually one (none when the step computes nothing).
    """
    slots: list[int] = []
    for i, b in enumerate(blocks):
        taken = {slots[j] for j in range(i) if blocks[j].q0 < b.q1 and b.q0 < blocks[j].q1}
        slots.append(min(set(range(len(taken) + 1)) - taken))
    return tuple(slots)


def n_slots(blocks: tuple[Block, ...]) -> int:
    return max(lse_slots(blocks), default=-1) + 1


@functools.lru_cache(maxsize=4096)
def _chunk_blocks(
    rank: int, step: int, world_size: int, layout: str, causal: bool
) -> tuple[Block, ...]:
    """step_blocks in chunk units without a window (cached: it runs for every call)."""
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
                blocks[-1] = Block(last.q0, row.q1, row.k0, row.k1, None)
            else:
                blocks.append(row)
    return tuple(blocks)


@functools.lru_cache(maxsize=4096)
def _band_blocks(
    rank: int, step: int, world_size: int, layout: str, chunk: int, band: Window
) -> tuple[Block, ...]:
    """step_blocks under a window band (not plain causal): one block per (query run, key
    run) pair that sees anything, cropped to its visible bounding box (cached)."""
    if not 0 <= step < world_size:
        raise ValueError(f"step must be in [0, {world_size}), got {step}")
    left, right = band
    mine = _runs(rank_chunks(rank, world_size, layout), chunk)
    theirs = _runs(rank_chunks(source_rank(rank, step, world_size), world_size, layout), chunk)
    blocks = []
    for lq, gq, nq in mine:
        for lk, gk, nk in theirs:
            # Global rows that see some key of the run, and keys that some row sees.
            r0 = gq if right is None else max(gq, gk - right)
            r1 = gq + nq if left is None else min(gq + nq, gk + nk + left)
            c0 = gk if left is None else max(gk, gq - left)
            c1 = gk + nk if right is None else min(gk + nk, gq + nq + right)
            if r0 >= r1 or c0 >= c1:
                continue  # the band misses this pair: nothing to compute
            shift = c1 - r1  # the box's bottom-right corner relative to the diagonal
            # A side that does not cut the box is left unbounded: fewer masked tiles.
            bl = None if left is None or left + shift >= c1 - c0 - 1 else left + shift
            br = None if right is None or right - shift >= r1 - r0 - 1 else right - shift
            blocks.append(
                Block(
                    lq + r0 - gq,
                    lq + r1 - gq,
                    lk + c0 - gk,
                    lk + c1 - gk,
                    None if bl is None and br is None else (bl, br),
                )
            )
    return _join_full(blocks)


def _runs(chunks: tuple[int, ...], chunk: int) -> list[tuple[int, int, int]]:
    """(local start, global start, length) of each run of globally consecutive chunks
    of a shard: a band is one band only over tokens that are contiguous globally."""
    runs: list[tuple[int, int, int]] = []
    for i, c in enumerate(chunks):
        if runs and runs[-1][1] + runs[-1][2] == c * chunk:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + chunk)
        else:
            runs.append((i * chunk, c * chunk, chunk))
    return runs


def _join_full(blocks: list[Block]) -> tuple[Block, ...]:
    """Join fully visible blocks that together form one rectangle of the local shards
    (same rows and adjacent keys, or same keys and adjacent rows): one call, not two."""
    blocks = list(blocks)
    joined = True
    while joined:
        joined = False
        for i, a in enumerate(blocks):
            for j in range(i + 1, len(blocks)):
                b = blocks[j]
                if a.window is not None or b.window is not None:
                    continue
                if (a.q0, a.q1) == (b.q0, b.q1) and (a.k1 == b.k0 or b.k1 == a.k0):
                    new = Block(a.q0, a.q1, min(a.k0, b.k0), max(a.k1, b.k1))
                elif (a.k0, a.k1) == (b.k0, b.k1) and (a.q1 == b.q0 or b.q1 == a.q0):
                    new = Block(min(a.q0, b.q0), max(a.q1, b.q1), a.k0, a.k1)
                else:
                    continue
                blocks[i] = new
                del blocks[j]
                joined = True
                break
            if joined:
                break
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
        return Block(0, 0, 0, 0, None)
    i0, i1 = min(i for i, _ in cells), max(i for i, _ in cells) + 1
    j0, j1 = min(j for _, j in cells), max(j for _, j in cells) + 1
    box = [[vis[i][j] for j in range(j0, j1)] for i in range(i0, i1)]
    if all(v == _FULL for r in box for v in r):
        return Block(i0, i1, j0, j1, None)
    off = (j1 - j0) - (i1 - i0)
    want = [
        [_FULL if j < i + off else _DIAG if j == i + off else _NONE for j in range(j1 - j0)]
        for i in range(i1 - i0)
    ]
    if box == want:
        return Block(i0, i1, j0, j1, (None, 0))
    return None


@functools.lru_cache(maxsize=1024)
def ring_steps(
    world_size: int,
    layout: str,
    causal: bool,
    local_len: int,
    window: Window | None = None,
) -> int:
    """How many steps the ring runs: through the last step in which some rank computes.

    P without a window. A window can leave every rank's later steps empty (contiguous
    layout, a band narrower than a shard: only the neighbours' K/V are needed); the ring
    then stops passing K/V there and sends the dK/dV sums home in one hop. Every rank
    computes the same number from the same arguments, so the transfers still pair up.
    """
    return 1 + max(
        (
            s
            for rank_steps in schedule(world_size, layout, causal, local_len, window)
            for s, blocks in enumerate(rank_steps)
            if blocks
        ),
        default=0,
    )


def schedule(
    world_size: int,
    layout: str,
    causal: bool,
    local_len: int,
    window: Window | None = None,
) -> list[list[tuple[Block, ...]]]:
    """schedule[rank][step]: every rank's blocks at every step."""
    return [
        [
            step_blocks(r, s, world_size, layout, causal, local_len, window)
            for s in range(world_size)
        ]
        for r in range(world_size)
    ]


def work_per_rank(
    world_size: int,
    layout: str,
    causal: bool,
    local_len: int,
    window: Window | None = None,
) -> list[int]:
    """Visible (query, key) pairs each rank computes over the whole ring: its compute load."""
    return [
        sum(b.pairs() for step in rank_steps for b in step)
        for rank_steps in schedule(world_size, layout, causal, local_len, window)
    ]
