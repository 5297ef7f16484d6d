"""Where one call of the cuda backend spends its GPU time, kernel by kernel (torch.profiler),
at the `longflash bench` grid's shapes (B = tokens / N, H = width / D, bf16):

    python benchmarks/cuda_breakdown.py --dims 64,128 --seqlens 1024,4096,16384

Per shape and direction it prints each kernel's mean time per call and its share, and the
TFLOP/s of the main kernel alone next to that of the whole call. With the token count fixed
the auxiliary kernels (the backward's preprocess, the accumulator's memset, the dQ
postprocess) cost the same at every N, so they weigh most at short sequences.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import torch
from longflash.frontends import torch as lft
from longflash_cuda import _torch
from torch.profiler import ProfilerActivity, profile


def kernel_times(run, iters: int) -> dict[str, float]:
    """Mean device time per call (µs) of every kernel `run` launches."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time
    return {name: us / iters for name, us in total.items()}


def short(name: str) -> str:
    """A kernel's bare name: no return type, namespaces, template or call arguments."""
    name = name.replace("(anonymous namespace)::", "")
    name = re.split(r"[<(]", name, maxsplit=1)[0]
    return name.split("::")[-1].removeprefix("void ").strip()[:40]


def measure(d: int, n: int, b: int, h: int, causal: bool, iters: int) -> list[dict]:
    """The forward's and the backward's kernels at one shape."""
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    call = lft.make_call(q, k, v, causal=causal)
    out, lse = _torch.forward(call, q, k, v)
    flops_fwd = 4.0 * b * h * n * n * d / (2 if causal else 1)
    calls = {
        "fwd": (lambda: _torch.forward(call, q, k, v), flops_fwd),
        "bwd": (lambda: _torch.backward(call, do, q, k, v, out, lse), 2.5 * flops_fwd),
    }
    rows = []
    for direction, (run, flops) in calls.items():
        times = kernel_times(run, iters)
        total = sum(times.values())
        main_name = max(times, key=times.get)
        rows.append(
            {
                "d": d, "n": n, "b": b, "h": h, "causal": causal, "direction": direction,
                "total_us": total, "main_kernel": short(main_name), "main_us": times[main_name],
                "tflops_call": flops / total / 1e6,
                "tflops_main": flops / times[main_name] / 1e6,
                "kernels_us": {short(k): t for k, t in times.items()},
            }
        )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for d in (int(x) for x in args.dims.split(",")):
        for n in (int(x) for x in args.seqlens.split(",")):
            for causal in (False, True):
                b, h = max(1, args.tokens // n), args.width // d
                for row in measure(d, n, b, h, causal, args.iters):
                    rows.append(row)
                    times = row["kernels_us"]
                    total = row["total_us"]
                    parts = ", ".join(
                        f"{k} {t:.1f} ({t / total:.1%})"
                        for k, t in sorted(times.items(), key=lambda kv: -kv[1])
                    )
                    print(
                        f"hd{d} N={n:>5} {'causal' if causal else 'full  '} {row['direction']}: "
                        f"{total:8.1f} us, {row['tflops_call']:5.0f} TFLOP/s call, "
                        f"{row['tflops_main']:5.0f} main | {parts}",
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
