"""Install LongFlash and the backends that make sense on this machine.

    python ci/install.py            # core + torch + jax + triton/pallas backends (+ cuda on a GPU)
    python ci/install.py --test     # also the test dependencies

Without an NVIDIA GPU the CPU pins in ci/constraints-cpu.txt are used (an unpinned torch would
pull a multi-GB CUDA build). With a GPU, the frameworks already installed are kept and the
CUDA backend is built too.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    return subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test", action="store_true", help="also install test dependencies")
    ap.add_argument("--no-cuda", action="store_true", help="skip building the CUDA backend")
    ap.add_argument("--editable", action="store_true", help="editable installs (development)")
    args = ap.parse_args()

    gpu = has_nvidia_gpu()
    extras = "torch,jax,bench" + (",test" if args.test else "")
    pkgs = [
        f"{ROOT / 'packages/longflash'}[{extras}]",
        str(ROOT / "packages/longflash-triton"),
        str(ROOT / "packages/longflash-jax"),
    ]
    if gpu and not args.no_cuda:
        pkgs.append(str(ROOT / "packages/longflash-cuda"))
    cmd = [sys.executable, "-m", "pip", "install"]
    if not gpu:
        cmd += ["-c", str(ROOT / "ci/constraints-cpu.txt")]
    for p in pkgs:
        cmd += ["-e", p] if args.editable else [p]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
