"""The forward's stream-K tail (cuda/src/sm90/stream_k.h: the persistent grid's last tiles shared
by key blocks) against exhaustive checks over small grids: every (tile, key block) computed once,
each split tile written by one CTA and merged by the next, the CTAs' work within one key block.
The header is plain C++ as well as CUDA, so a host compiler checks it on any machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_stream_k_tail_covers_every_block_once_and_pairs_the_splits(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    exe = tmp_path / "stream_k_check"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Werror", f"-I{ROOT / 'cuda/src/sm90'}",
         str(Path(__file__).with_name("stream_k_check.cpp")), "-o", str(exe)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok ")
    assert int(run.stdout.split()[1]) > 100_000  # every loop ran
