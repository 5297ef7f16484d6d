"""Spread of one backend's speed-up over a peer across several `longflash bench` runs, and a
check of those speed-ups against targets.

One bench is one sample: between runs the GPU's clock under load, and with it each ratio, moves
by about 1%. A target is met here when the median over the runs meets it and no single run
misses it by more than `--slack` (1% by default). Ratios are only ever taken within one run.

  python benchmarks/bench_spread.py benchmarks/results/bench-nvidia-h200-20261130-1*.json \\
      --target '*=1.5' --target fwd:d128=1.75

Exits 1 when a target is missed. Only the standard library is needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def _target_for(targets: dict[str, float], direction: str, d: int) -> float | None:
    """The most specific target that names this case: `fwd:d128`, then `fwd`, `d128`, `*`."""
    for spec in (f"{direction}:d{d}", direction, f"d{d}", "*"):
        if spec in targets:
            return targets[spec]
    return None


def parse_targets(specs: list[str]) -> dict[str, float]:
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise SystemExit(f"--target {spec!r}: expected SPEC=RATIO, e.g. fwd:d128=1.75")
        out[name.strip()] = float(value)
    return out


def collect(
    paths: list[Path], backend: str, peer: str, min_n: int
) -> dict[tuple[int, str, bool, int], list[float]]:
    """(head dim, direction, causal, Nq) -> the speed-up of `backend` over `peer` in each run,
    in the order of `paths`."""
    spread: dict[tuple[int, str, bool, int], list[float]] = {}
    for path in paths:
        doc = json.loads(path.read_text())
        cases = {c["key"]: c for c in doc["cases"]}
        for r in doc["ratios"]:
            c = cases[r["case"]]
            if r["backend"] != backend or r["peer"] != peer or c["Nq"] < min_n:
                continue
            key = (c["Dqk"], c["direction"], c["causal"], c["Nq"])
            spread.setdefault(key, []).append(r["speedup"])
    return spread


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="bench-*.json files of `longflash bench`")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--peer", default="sdpa-flash")
    ap.add_argument("--min-n", type=int, default=4096, help="leave out cases with fewer queries")
    ap.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="SPEC=RATIO",
        help="SPEC is *, fwd, bwd, d128 or fwd:d128; the most specific one applies",
    )
    ap.add_argument("--slack", type=float, default=0.01, help="how far one run may fall short")
    args = ap.parse_args(argv)
    targets = parse_targets(args.target)
    spread = collect(args.files, args.backend, args.peer, args.min_n)
    if not spread:
        print(f"no {args.backend} / {args.peer} ratios at N >= {args.min_n} in those files")
        return 1
    print(f"{args.backend} / {args.peer} over {len(args.files)} runs (N >= {args.min_n})")
    print(f"{'case':<24} {'median':>7} {'min':>6} {'max':>6} {'target':>6}  per run")
    missed = 0
    for (d, direction, causal, n), ratios in sorted(spread.items()):
        med, lo, hi = statistics.median(ratios), min(ratios), max(ratios)
        target = _target_for(targets, direction, d)
        verdict = ""
        if target is not None:
            ok = med >= target and lo >= target * (1 - args.slack)
            missed += not ok
            verdict = "" if ok else "  MISSED"
        name = f"d{d} {direction}{' causal' if causal else ''} N={n}"
        shown = f"{target:.2f}" if target is not None else "-"
        runs = " ".join(f"{x:.3f}" for x in ratios)
        print(f"{name:<24} {med:7.3f} {lo:6.3f} {hi:6.3f} {shown:>6}  {runs}{verdict}")
    if targets:
        print(f"{missed} case(s) missed a target" if missed else "every target met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
