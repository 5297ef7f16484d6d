"""The A/B scripts' timing (benchmarks/cuda_check.py interleaved, env_setter): every case is timed
once per round, in turn, and reported as its median over the rounds. CPU-runnable: bench is
replaced by a table of made-up times."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def _cuda_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import cuda_check
    finally:
        sys.path.remove(str(BENCHMARKS))
    return cuda_check


def test_interleaved_takes_each_cases_median_over_rounds_in_turn(monkeypatch):
    cuda_check = _cuda_check()
    seen = []
    times = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 9.0, 4.0])}  # per case, in its order

    def fake_bench(fn):
        name = fn()
        seen.append((name, os.environ.get("LF_TEST_VARIANT")))
        return next(times[name])

    monkeypatch.setattr(cuda_check, "bench", fake_bench)
    monkeypatch.setenv("LF_TEST_VARIANT", "stale")
    cases = {
        "a": (cuda_check.env_setter("LF_TEST_VARIANT", "x"), lambda: "a"),
        "b": (cuda_check.env_setter("LF_TEST_VARIANT", "default"), lambda: "b"),
    }
    assert cuda_check.interleaved(cases, rounds=3) == {"a": 2.0, "b": 5.0}
    # Round by round, each case after its own setup ("default" unsets the variable), the
    # starting case rotating so that no case always runs first.
    assert seen == [("a", "x"), ("b", None), ("b", None), ("a", "x"), ("a", "x"), ("b", None)]
