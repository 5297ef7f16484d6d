"""The ring's block schedule and the layouts, checked token by token (no communication)."""

from __future__ import annotations

import longflash.distributed as lfd
import numpy as np
import pytest
from longflash.call import normalize_window
from longflash.distributed.schedule import (
    Block,
    lse_slots,
    rank_chunks,
    source_rank,
    step_blocks,
    work_per_rank,
)


def _global_tokens(rank: int, world: int, layout: str, total: int) -> np.ndarray:
    """Global token index of each position of rank's shard, via shard_sequence itself."""
    return lfd.shard_sequence(np.arange(total)[None], rank, world, layout)[0]


def _visible(b: Block) -> np.ndarray:
    """(nq, nk) bool: the pairs a backend computes for block b (bottom-right aligned)."""
    i, j = np.arange(b.nq)[:, None], np.arange(b.nk)[None, :]
    off = b.nk - b.nq
    vis = np.ones((b.nq, b.nk), dtype=bool)
    if b.window is not None:
        left, right = b.window
        assert left is None or left >= 0, b  # a side every backend takes as it is
        assert right is None or right >= 0, b
        if left is not None:
            vis &= j >= i + off - left
        if right is not None:
            vis &= j <= i + off + right
    return vis


def _coverage(world, layout, causal, window, chunk, blocks=step_blocks):
    """Raise unless rank r's blocks over the P steps compute every (query, key) pair its
    queries see in the global sequence exactly once, and nothing else."""
    local = chunk * (2 if layout == "zigzag" else 1)
    total = local * world
    band = normalize_window(causal, window)
    left, right = (None, None) if band is None else band
    for rank in range(world):
        mine = _global_tokens(rank, world, layout, total)
        seen = np.zeros((local, total), dtype=int)
        for step in range(world):
            theirs = _global_tokens(source_rank(rank, step, world), world, layout, total)
            plan = blocks(rank, step, world, layout, causal, local, window)
            slots = lse_slots(plan)
            for a, sa in zip(plan, slots):
                for b, sb in zip(plan, slots):
                    if a is not b and a.q0 < b.q1 and b.q0 < a.q1:
                        assert sa != sb, "blocks sharing rows share an lse slot"
            for b in plan:
                vis = _visible(b)
                # No row of a block sees nothing: the kernels never meet an empty row.
                assert vis.any(axis=1).all(), b
                rows, cols = np.nonzero(vis)
                np.add.at(seen, (b.q0 + rows, theirs[b.k0 + cols]), 1)
        t, u = mine[:, None], np.arange(total)[None, :]
        want = np.ones_like(seen, dtype=bool)
        if left is not None:
            want &= u >= t - left
        if right is not None:
            want &= u <= t + right
        np.testing.assert_array_equal(seen, want.astype(int), err_msg=f"rank {rank}")


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("layout", lfd.LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_blocks_cover_each_visible_pair_once(world, layout, causal):
    _coverage(world, layout, causal, None, chunk=3)
    if world > 1:
        # The blocks of one step never share a row without a window.
        for rank in range(world):
            for step in range(world):
                assert set(lse_slots(step_blocks(rank, step, world, layout, causal, 6))) <= {0}


# Windows against chunks of 4 tokens: inside a chunk, exactly a chunk, across several,
# one-sided, degenerate (0, 0), wider than the sequence.
WINDOWS = [(0, 0), (1, 2), (3, 0), (4, 4), (2, 9), (None, 5), (6, None), (13, 1), (50, 50)]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("layout", lfd.LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_window_blocks_cover_each_visible_pair_once(world, layout, causal):
    for window in WINDOWS:
        _coverage(world, layout, causal, window, chunk=4)


def test_unshifted_window_blocks_fail_coverage():
    """The coverage check catches blocks that apply the window as given, relative to
    their own corner, instead of shifted by their offset from the global diagonal."""

    def unshifted(rank, step, world, layout, causal, local, window):
        band = normalize_window(causal, window)
        return tuple(
            Block(b.q0, b.q1, b.k0, b.k1, None if b.window is None else band)
            for b in step_blocks(rank, step, world, layout, causal, local, window)
        )

    _coverage(4, "zigzag", False, (2, 9), chunk=4)
    with pytest.raises(AssertionError):
        _coverage(4, "zigzag", False, (2, 9), chunk=4, blocks=unshifted)


def test_window_skips_steps_the_band_misses():
    # Contiguous, P = 8, chunks of 16: a causal window of 5 needs this rank's own shard
    # and its left neighbour's; the other six steps compute nothing.
    steps = [step_blocks(3, s, 8, "contiguous", True, 16, (5, None)) for s in range(8)]
    assert steps[0] == (Block(0, 16, 0, 16, (5, 0)),)
    # Queries 0..4 see the last 5 - i keys of the previous shard: cropped to 5 x 5, whose
    # corner sits 5 tokens left of the diagonal, the band (5, 0) becomes (5 - 5, 0 + 5):
    # key j >= query i, the right side no longer cuts.
    assert steps[1] == (Block(0, 5, 11, 16, (0, None)),)
    assert all(s == () for s in steps[2:])
    # Zigzag, rank 1 of 4 (chunks 1 and 6 of 8, 4 tokens each): its own step is the two
    # diagonal chunks, not one call (chunk 6 must not see chunk 1); a side as wide as
    # the block (right = 3 on 4 rows) does not cut it and is left unbounded.
    assert step_blocks(1, 0, 4, "zigzag", False, 8, (2, 1)) == (
        Block(0, 4, 0, 4, (2, 1)),
        Block(4, 8, 4, 8, (2, 1)),
    )
    assert step_blocks(1, 0, 4, "zigzag", False, 8, (2, 3))[0] == Block(0, 4, 0, 4, (2, None))
    work = work_per_rank(8, "contiguous", True, 16, (5, None))
    assert work[0] == sum(min(t, 5) + 1 for t in range(16))
    assert all(w == 16 * 6 for w in work[1:])  # every later query sees 6 keys


@pytest.mark.parametrize("world", [2, 3, 4, 8, 16])
def test_zigzag_balances_causal_work(world):
    zig = work_per_rank(world, "zigzag", True, 8)
    con = work_per_rank(world, "contiguous", True, 8)
    assert len(set(zig)) == 1
    assert sum(zig) == sum(con)  # the same pairs, spread differently
    assert con == sorted(con) and con[-1] > con[0]


def test_step_shapes():
    # Step 0 is the rank's own causal block; later zigzag steps are half blocks.
    assert lfd.step_blocks(1, 0, 4, "zigzag", True, 8) == (lfd.Block(0, 8, 0, 8, (None, 0)),)
    assert lfd.step_blocks(2, 1, 4, "zigzag", True, 8) == (lfd.Block(0, 8, 0, 4),)
    assert lfd.step_blocks(1, 2, 4, "zigzag", True, 8) == (lfd.Block(4, 8, 0, 8),)
    # Contiguous causal: K/V from later ranks are skipped entirely.
    assert lfd.step_blocks(1, 2, 4, "contiguous", True, 8) == ()
    assert rank_chunks(1, 4, "zigzag") == (1, 6)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", lfd.LAYOUTS)
def test_shard_unshard_round_trip_numpy(world, layout):
    x = np.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = [lfd.shard_sequence(x, r, world, layout) for r in range(world)]
    assert all(s.shape == (2, 24 // world, 3) for s in shards)
    np.testing.assert_array_equal(lfd.unshard_sequence(shards, layout), x)
    # lse-style: sequence on the last axis
    y = np.moveaxis(x, 1, 2)
    shards = [lfd.shard_sequence(y, r, world, layout, dim=-1) for r in range(world)]
    np.testing.assert_array_equal(lfd.unshard_sequence(shards, layout, dim=2), y)


def test_zigzag_shard_is_chunks_r_and_2p_minus_1_minus_r():
    x = np.arange(16)[None]
    assert lfd.shard_sequence(x, 1, 4, "zigzag")[0].tolist() == [2, 3, 12, 13]
    assert lfd.shard_sequence(x, 1, 4, "contiguous")[0].tolist() == [4, 5, 6, 7]


def test_shard_frameworks_keep_their_types():
    import torch

    t = torch.arange(24.0).reshape(1, 12, 2)
    s = [lfd.shard_sequence(t, r, 3, "zigzag") for r in range(3)]
    assert isinstance(s[0], torch.Tensor)
    assert torch.equal(lfd.unshard_sequence(s, "zigzag"), t)
    import jax.numpy as jnp

    j = jnp.arange(24.0).reshape(1, 12, 2)
    s = [lfd.shard_sequence(j, r, 3, "zigzag") for r in range(3)]
    np.testing.assert_array_equal(np.asarray(lfd.unshard_sequence(s, "zigzag")), np.asarray(j))


def test_shard_errors():
    x = np.zeros((1, 10, 2))
    with pytest.raises(ValueError, match="divisible by 8 for layout 'zigzag'"):
        lfd.shard_sequence(x, 0, 4, "zigzag")
    with pytest.raises(ValueError, match="divisible by 4 for layout 'contiguous'"):
        lfd.shard_sequence(x, 0, 4, "contiguous")
    with pytest.raises(ValueError, match="rank must be in"):
        lfd.shard_sequence(x, 5, 5, "contiguous")
    with pytest.raises(ValueError, match="layout must be one of"):
        lfd.shard_sequence(x, 0, 2, "stripe")
    with pytest.raises(ValueError, match="same length"):
        lfd.unshard_sequence([np.zeros((1, 4)), np.zeros((1, 6))], "contiguous")
