"""One call of the cuda backend between cudaProfilerStart and cudaProfilerStop, after three
warm-up calls, at the `longflash bench` grid's shape (B = 16K / N, H = 2048 / D, bf16), for
profilers that start with the profiler API:

    ncu --clock-control none --profile-from-start off -k "regex:^(fwd|bwd)_kernel" -c 1 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/cuda_profile_one.py 64 4096 causal fwd

Arguments: head dim, N, "causal" or "full", "fwd" or "bwd" (the backward profiles the whole
backward call: preprocess, main kernel and dQ postprocess; the -k filter keeps the main one).
"""

from __future__ import annotations

import argparse

import torch
from longflash.frontends import torch as lft
from longflash_cuda import _torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("d", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("mask", choices=("causal", "full"))
    ap.add_argument("direction", choices=("fwd", "bwd"))
    args = ap.parse_args()
    b, h = max(1, 16384 // args.n), 2048 // args.d
    torch.manual_seed(0)
    q, k, v, do = (
        torch.randn(b, args.n, h, args.d, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    call = lft.make_call(q, k, v, causal=args.mask == "causal")
    out, lse = _torch.forward(call, q, k, v)

    def run():
        if args.direction == "fwd":
            return _torch.forward(call, q, k, v)
        return _torch.backward(call, do, q, k, v, out, lse)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
