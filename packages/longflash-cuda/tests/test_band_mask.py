"""The band mask's integer ranges (cuda/src/sm90/band_mask.h: the key blocks a query tile meets,
the query blocks a key tile meets, the tiles that need no per-element mask, and the per-row key and
per-key query intervals the kernels mask scores with) against brute force over small shapes:
causal and windows, Nq != Nk, rows before the sequence. The header is plain C++ as well as CUDA,
so a host compiler checks it on any machine."""

from __future__ import annotations


def test_band_mask_ranges_equal_brute_force(host_check):
    assert host_check("band_mask_check") > 10_000_000  # every loop ran
