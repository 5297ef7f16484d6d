"""Developer and CI sessions. `nox -t ci` is what CI runs on a machine without a GPU.

Sessions (names fixed by DESIGN §6): tests, tests-triton, tests-pallas, tests-cuda,
tests-distributed, lint, docs, bench.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

# NumPy's BLAS threads compete with torch's on small CPUs (measured: ~60% more CPU time).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

CORE = "packages/longflash"
TRITON = "packages/longflash-triton"
PALLAS = "packages/longflash-jax"
CUDA = "packages/longflash-cuda"


def _gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


# On a machine without a GPU, pin the CPU builds (an unpinned torch is a multi-GB CUDA build).
PIN = [] if _gpu() else ["-c", "ci/constraints-cpu.txt"]
# Fewer hypothesis-drawn shapes on a CPU-only machine (the parametrised cases stay complete).
if not _gpu():
    os.environ.setdefault("LONGFLASH_HYPOTHESIS_EXAMPLES", "8")
# pytest-xdist: use both cores of the CI machine.
XDIST = ["-n", os.environ.get("LONGFLASH_TEST_WORKERS", "2")]


def _install(session: nox.Session, *pkgs: str, extras: str = "test", jax: bool = False) -> None:
    # The `jax` extra of longflash pulls the pallas backend package; sessions that test the
    # core alone install the jax framework directly instead.
    session.install(
        *PIN,
        "-e",
        f"{CORE}[{extras}]",
        *(["jax"] if jax else []),
        *(a for p in pkgs for a in ("-e", p)),
    )


@nox.session(tags=["ci"])
def tests(session: nox.Session) -> None:
    """Core, reference backend and conformance suite, torch and jax, on the CPU."""
    _install(session, extras="torch,bench,test", jax=True)
    session.run(
        "pytest",
        "-q",
        *XDIST,
        f"{CORE}/tests",
        "--ignore",
        f"{CORE}/tests/distributed",
        *session.posargs,
    )


@nox.session(name="tests-triton", tags=["ci"])
def tests_triton(session: nox.Session) -> None:
    """Triton backend: the interpreter on the CPU, the GPU when present."""
    _install(session, TRITON, extras="torch,test")
    env = {} if _gpu() else {"TRITON_INTERPRET": "1"}
    session.run("pytest", "-q", *XDIST, f"{TRITON}/tests", *session.posargs, env=env)


@nox.session(name="tests-pallas", tags=["ci"])
def tests_pallas(session: nox.Session) -> None:
    """Pallas backend: interpret mode on the CPU, the GPU when present."""
    _install(session, PALLAS, extras="test", jax=True)
    env = {} if _gpu() else {"LONGFLASH_PALLAS_INTERPRET": "1"}
    session.run("pytest", "-q", *XDIST, f"{PALLAS}/tests", *session.posargs, env=env)


@nox.session(name="tests-cuda", tags=["ci"])
def tests_cuda(session: nox.Session) -> None:
    """CUDA backend: build it (a reduced set of instantiations without a GPU), then test."""
    _install(session, extras="torch,test", jax=True)
    # Without a GPU, compile one head dim (both dtypes) so the build fits CI's budget.
    build_args = [] if _gpu() else ["-C", "cmake.define.LONGFLASH_HEAD_DIMS=128"]
    session.install(*PIN, "-v", *build_args, f"./{CUDA}")
    session.run("pytest", "-q", f"{CUDA}/tests", *session.posargs)


@nox.session(name="tests-distributed", tags=["ci"])
def tests_distributed(session: nox.Session) -> None:
    """Sequence parallelism: torch gloo with 2-4 processes and JAX with 4 host devices."""
    _install(session, extras="torch,test", jax=True)
    session.run("pytest", "-q", f"{CORE}/tests/distributed", *session.posargs)


@nox.session(tags=["ci"])
def lint(session: nox.Session) -> None:
    session.install(*PIN, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["ci"])
def docs(session: nox.Session) -> None:
    """Build the documentation site; warnings are errors."""
    session.install(*PIN, "-r", "docs/requirements.txt", "-e", f"{CORE}")
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "build/site", env={"NO_MKDOCS_2_WARNING": "1"}
    )


@nox.session
def bench(session: nox.Session) -> None:
    """`longflash bench` with every backend installed here."""
    session.install(*PIN, "-e", f"{CORE}[torch,bench]", "jax", "-e", TRITON, "-e", PALLAS)
    session.run("longflash", "bench", *session.posargs)
