"""Shared test setup for the cuda backend's tests.

JAX takes 75% of the GPU's memory when it first touches it. The conformance suite runs under
pytest-xdist, one process per worker, each with JAX and PyTorch on the same GPU. With 12 workers
on the H200 (session 11) 121 JAX cases failed and workers aborted inside XLA (in jnp.asarray);
with XLA_PYTHON_CLIENT_PREALLOCATE=false all 236 passed. So JAX allocates on demand here, unless
the caller set the variable.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
