"""Test-session settings for the core tests.

NumPy's OpenBLAS starts one busy-waiting thread per core. The oracle's matrix products
run between the backend's PyTorch/XLA work, whose own thread pools then compete with
those spinning threads: on a 2-core machine the conformance suite spent about 60% more
CPU time that way. OpenBLAS reads the variable when NumPy is first imported, which has
not happened yet when pytest loads this file.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
