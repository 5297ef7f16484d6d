"""List-scheduling model of the forward's tile schedules under a bottom-right causal mask: the
largest CTA's work over the mean (1.0 = perfectly balanced), for
- the static persistent snake (fwd.cuh FwdTiles: head-major, query blocks last to first, round r
  reversed on odd rounds),
- a greedy dynamic claim of the same order (the hardware's dispatch of a one-CTA-per-tile grid, or
  `+dynamic`),
- the same greedy claim over groups of G heads in longest-first order within each group (query
  blocks of all G heads interleaved, last block first).
A tile costs its key blocks plus a fixed per-tile overhead (--overhead, in key blocks; 1.66 fits
the hd64 192-query CTA's 4K-vs-16K dense rates). No memory effects: an order that spreads the CTAs
over many heads loses L2 reuse, which this model does not see.

    python benchmarks/fwd_schedule_model.py [--sms 132] [--overhead 1.66]
"""

from __future__ import annotations

import argparse
import heapq
import math


def tile_costs(
    n: int, block_m: int, block_n: int, end_aligned: bool, overhead: float
) -> list[float]:
    """Key blocks (plus overhead) of each query block, first to last."""
    blocks = math.ceil(n / block_m)
    costs = []
    for m in range(blocks):
        last_row = n - (blocks - 1 - m) * block_m if end_aligned else min(n, (m + 1) * block_m)
        costs.append(math.ceil(last_row / block_n) + overhead)
    return costs


def static_snake(order: list[float], ctas: int) -> float:
    load = [0.0] * ctas
    for start in range(0, len(order), ctas):
        rnd = start // ctas
        for c, cost in enumerate(order[start : start + ctas]):
            load[ctas - 1 - c if rnd % 2 else c] += cost
    return max(load)


def greedy(order: list[float], ctas: int) -> float:
    heap = [0.0] * ctas
    for cost in order:
        heapq.heappush(heap, heapq.heappop(heap) + cost)
    return max(heap)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--overhead", type=float, default=1.66)
    args = ap.parse_args()
    # (N, rows per CTA, heads × batch) at the bench grid's 16K tokens: hd64 H=32, hd128 H=16
    shapes = [(1024, 192, 512), (2048, 192, 256), (4096, 192, 128), (8192, 192, 64),
              (16384, 192, 32), (4096, 128, 64), (16384, 128, 16)]  # fmt: skip
    print("N      rows  pairs | static snake | greedy | greedy, grouped longest-first: G=2 4 8 16")
    for n, rows, pairs in shapes:
        costs = tile_costs(n, rows, 128, rows == 192, args.overhead)
        head_major = [c for _ in range(pairs) for c in reversed(costs)]
        mean = sum(head_major) / args.sms
        grouped = []
        for g in (2, 4, 8, 16):
            order = []
            for first in range(0, pairs, g):
                size = min(g, pairs - first)
                order += sorted((c for _ in range(size) for c in costs), reverse=True)
            grouped.append(greedy(order, args.sms) / mean)
        print(
            f"{n:<6} {rows:<5} {pairs:<5} | {static_snake(head_major, args.sms) / mean:12.3f} | "
            f"{greedy(head_major, args.sms) / mean:6.3f} | " + " ".join(f"{x:.3f}" for x in grouped)
        )


if __name__ == "__main__":
    main()
