"""Tile configurations, kept as data in configs.json and chosen per architecture.

Keys are ``<kernel>/<head-dim block>/<mask>`` with kernel in fwd, dkdv, dq; head-dim block
the padded power of two (16 … 256); mask "full" or "band" (causal or a window). A key may
use ``*`` for the head dim or the mask, and end in ``@T`` to serve sequences of T or more.
Lookup goes from the most specific key of the device's architecture to the ``default``
table. benchmarks/triton_tune.py measures the candidates on a GPU and prints the table to
paste here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class TileConfig:
    BM: int  # query rows per block
    BN: int  # key rows per block
    warps: int
    stages: int  # software-pipelining depth of the K/V (or Q/dO) loop
    tma: bool = False  # tensor descriptors (TMA) for the streamed tiles; sm90+ only
    ws: bool = False  # warp specialisation of the mask-free loop; sm90+ only
    # dK/dV only: queries as MMA rows, dK^T/dV^T accumulated, P and dS staged in shared
    # memory (bwd._dkdv_blocks says why); fewer live registers for the same products
    qmajor: bool = False


@functools.cache
def _tables() -> dict[str, dict[str, dict[str, Any]]]:
    text = resources.files("longflash_triton").joinpath("configs.json").read_text()
    return json.loads(text)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _arch_of(index: int) -> str:
    import torch

    if torch.version.hip is not None:
        return "rocm"
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm{major}{minor}"


def arch(device: Any) -> str:
    """Table name for a torch device: interpret, sm90, sm80, rocm, …"""
    if interpreting() or device.type != "cuda":
        return "interpret"
    return _arch_of(device.index if device.index is not None else 0)


def interpreter_tiles(cfg: TileConfig, rows: int, cols: int) -> TileConfig:
    """The interpreter pays per operation, not per element: grow its 16x16 tiles so that a
    sequence spans at most ~8 blocks (tiles up to 128). Short sequences keep 16x16, so the
    tests still cross many block edges."""

    def tile(n: int, base: int) -> int:
        t = base
        while t < 128 and t * 8 < n:
            t *= 2
        return t

    return dataclasses.replace(cfg, BM=tile(rows, cfg.BM), BN=tile(cols, cfg.BN))


@functools.lru_cache(maxsize=1024)
def pick(kernel: str, arch_name: str, head_block: int, band: bool, n: int = 0) -> TileConfig:
    """The config for a kernel; ``n`` is the length of the streamed sequence. A key may end
    in ``@T``: it then serves n >= T only, and the largest such T wins (short sequences
    favour smaller tiles: more programs, shorter prologues and tails)."""
    tables = _tables()
    mask = "band" if band else "full"
    names = [arch_name, "default"]
    for name in names:
        table = tables.get(name, {})
        for key in (
            f"{kernel}/{head_block}/{mask}",
            f"{kernel}/{head_block}/*",
            f"{kernel}/*/{mask}",
            f"{kernel}/*/*",
        ):
            fits = [int(k[len(key) + 1 :]) for k in table if k.startswith(key + "@")]
            fits = [t for t in fits if t <= n]
            if fits:
                return TileConfig(**table[f"{key}@{max(fits)}"])
            if key in table:
                return TileConfig(**table[key])
    raise KeyError(f"no tile config for {kernel}/{head_block}/{mask} on {arch_name}")
