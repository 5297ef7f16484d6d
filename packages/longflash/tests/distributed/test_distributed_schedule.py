"""The ring's block schedule and the layouts, checked token by token (no communication)."""

from __future__ import annotations

import longflash.distributed as lfd
import numpy as np
import pytest
from longflash.distributed.schedule import rank_chunks, source_rank, work_per_rank


def _global_tokens(rank: int, world: int, layout: str, total: int) -> np.ndarray:
    """Global token index of each position of rank's shard, via shard_sequence itself."""
    return lfd.shard_sequence(np.arange(total)[None], rank, world, layout)[0]


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("layout", lfd.LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_blocks_cover_each_visible_pair_once(world, layout, causal):
    """Over the P steps, rank r's blocks compute every (query, key) pair its queries see
    in the global sequence exactly once, and nothing else."""
    chunk = 3
    local = chunk * (2 if layout == "zigzag" else 1)
    total = local * world
    for rank in range(world):
        mine = _global_tokens(rank, world, layout, total)
        seen = np.zeros((local, total), dtype=int)
        for step in range(world):
            theirs = _global_tokens(source_rank(rank, step, world), world, layout, total)
            rows_used = np.zeros(local, dtype=bool)
            for b in lfd.step_blocks(rank, step, world, layout, causal, local):
                assert not rows_used[b.q0 : b.q1].any(), "blocks of one step share rows"
                rows_used[b.q0 : b.q1] = True
                off = b.nk - b.nq  # bottom-right aligned, as the backends apply it
                for i in range(b.nq):
                    for j in range(b.nk):
                        if not b.causal or j <= i + off:
                            seen[b.q0 + i, theirs[b.k0 + j]] += 1
        want = (np.arange(total)[None, :] <= mine[:, None]) if causal else np.ones_like(seen)
        np.testing.assert_array_equal(seen, want.astype(int))


@pytest.mark.parametrize("world", [2, 3, 4, 8, 16])
def test_zigzag_balances_causal_work(world):
    zig = work_per_rank(world, "zigzag", True, 8)
    con = work_per_rank(world, "contiguous", True, 8)
    assert len(set(zig)) == 1
    assert sum(zig) == sum(con)  # the same pairs, spread differently
    assert con == sorted(con) and con[-1] > con[0]


def test_step_shapes():
    # Step 0 is the rank's own causal block; later zigzag steps are half blocks.
    assert lfd.step_blocks(1, 0, 4, "zigzag", True, 8) == (lfd.Block(0, 8, 0, 8, True),)
    assert lfd.step_blocks(2, 1, 4, "zigzag", True, 8) == (lfd.Block(0, 8, 0, 4, False),)
    assert lfd.step_blocks(1, 2, 4, "zigzag", True, 8) == (lfd.Block(4, 8, 0, 8, False),)
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
