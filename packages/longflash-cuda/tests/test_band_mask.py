"""The band mask's integer ranges (cuda/src/sm90/band_mask.h: the key blocks a query tile meets,
the query blocks a key tile meets, the tiles that need no per-element mask, and the per-row key and
per-key query intervals the kernels mask scores with) against brute force over small shapes:
causal and windows, Nq != Nk, rows before the sequence. The header is plain C++ as well as CUDA,
so a host compiler checks it on any machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_band_mask_ranges_equal_brute_force(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    exe = tmp_path / "band_mask_check"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'cuda/src/sm90'}",
         str(Path(__file__).with_name("band_mask_check.cpp")), "-o", str(exe)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok ")
    assert int(run.stdout.split()[1]) > 10_000_000  # every loop ran
