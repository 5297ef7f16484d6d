"""The forward's stream-K tail (cuda/src/sm90/stream_k.h: the persistent grid's last tiles shared
by key blocks) against exhaustive checks over small grids: every (tile, key block) computed once,
each split tile written by one CTA and merged by the next, the CTAs' work within one key block.
The header is plain C++ as well as CUDA, so a host compiler checks it on any machine."""

from __future__ import annotations


def test_stream_k_tail_covers_every_block_once_and_pairs_the_splits(host_check):
    assert host_check("stream_k_check") > 100_000  # every loop ran
