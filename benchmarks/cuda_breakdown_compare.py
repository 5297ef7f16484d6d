"""Compare libraries from `cuda_breakdown.py --json` files named `bd_<lib>_<run>.json`: for each
shape and direction, the main kernel's and the whole call's TFLOP/s, median over each library's
runs, and the call's ratio of the second library to the first.

Alternate the libraries' runs on the GPU (lib A, lib B, lib A, lib B) so that drift falls on both:

    for k in 1 2; do for x in A B; do
      LONGFLASH_CUDA_LIB=lib$x/liblongflash_cuda.so python benchmarks/cuda_breakdown.py \\
          --json bd_${x}_$k.json
    done; done
    python benchmarks/cuda_breakdown_compare.py bd_*.json
"""

from __future__ import annotations

import collections
import json
import re
import statistics
import sys


def main(paths: list[str]) -> None:
    runs: dict[str, list[dict]] = collections.defaultdict(list)
    for path in paths:
        lib = re.search(r"bd_([^_/]+)_[^/]*\.json$", path).group(1)
        rows = json.load(open(path))["rows"]
        runs[lib].append({(r["d"], r["n"], r["causal"], r["direction"]): r for r in rows})
    libs = sorted(runs)
    keys = sorted(set().union(*(set(run) for rs in runs.values() for run in rs)))

    def median(lib: str, key: tuple, field: str) -> float | None:
        vals = [run[key][field] for run in runs[lib] if key in run]
        return statistics.median(vals) if vals else None

    print("main-kernel TFLOP/s (call TFLOP/s), median over runs:", " / ".join(libs))
    for key in keys:
        cells = []
        for lib in libs:
            main_, call = median(lib, key, "tflops_main"), median(lib, key, "tflops_call")
            cells.append("   -" if main_ is None else f"{main_:5.0f} ({call:5.0f})")
        ratio = ""
        if len(libs) == 2:
            a, b = (median(lib, key, "tflops_call") for lib in libs)
            ratio = f"  {b / a:.3f}" if a and b else ""
        d, n, causal, direction = key
        shape = f"hd{d:<3} N={n:>5} {'causal' if causal else 'full  '} {direction}"
        print(f"{shape}: " + " | ".join(cells) + ratio)


if __name__ == "__main__":
    main(sys.argv[1:])
