"""Shared test setup for the cuda backend's tests.

JAX takes 75% of the GPU's memory when it first touches it. The conformance suite runs under
pytest-xdist, one process per worker, each with JAX and PyTorch on the same GPU. With 12 workers
on the H200 (session 11) 121 JAX cases failed and workers aborted inside XLA (in jnp.asarray);
with XLA_PYTHON_CLIENT_PREALLOCATE=false all 236 passed. So JAX allocates on demand here, unless
the caller set the variable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture
def host_check(tmp_path):
    """Compile tests/<name>.cpp against cuda/src/sm90's plain-C++ headers with the host compiler,
    run it, and return the number after its "ok" (how many checks ran); any failure fails the
    test. Skips where no C++ compiler is installed."""

    def run(name: str) -> int:
        cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if cxx is None:
            pytest.skip("no C++ compiler on this machine")
        here = Path(__file__).resolve().parent
        exe = tmp_path / name
        build = subprocess.run(
            [cxx, "-std=c++17", "-O2", "-Wall", "-Werror",
             f"-I{here.parents[2] / 'cuda/src/sm90'}", str(here / f"{name}.cpp"), "-o", str(exe)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert build.returncode == 0, build.stderr
        done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("ok ")
        return int(done.stdout.split()[1])

    return run
