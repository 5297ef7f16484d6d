"""Benchmarks: every LongFlash backend against the attention a user would use instead,
timed side by side in one process (DESIGN §7). ``longflash bench`` is the command line;
:func:`run` is the same from Python.

Importing this package imports no framework: the harness for the chosen framework loads
when a run starts.
"""

from __future__ import annotations

from longflash.bench.cases import Case, attention_flops, build_cases
from longflash.bench.core import Contender, Measurement, Skip
from longflash.bench.report import compare, load, print_summary, write_json
from longflash.bench.runner import SCHEMA, BenchConfig, compute_ratios, run

__all__ = [
    "SCHEMA",
    "BenchConfig",
    "Case",
    "Contender",
    "Measurement",
    "Skip",
    "attention_flops",
    "build_cases",
    "compare",
    "compute_ratios",
    "load",
    "print_summary",
    "run",
    "write_json",
]
