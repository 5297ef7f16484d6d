"""What limits the SM clock under each forward, and the energy of one call.

For each contender at the bench grid's shape (B = 16K / N, H = 2048 / D, bf16), the call runs back
to back for --seconds while nvidia-smi samples the SM clock, board power and the active clock-event
(throttle) reasons every ~50 ms; the first half second is left out (the clock settles within
~80 ms, session 14). Joules per call = median power x time per call. Contenders: the cuda backend
under each LONGFLASH_CUDA_FWD variant given, SDPA flash (FA2) and cuDNN.

    LONGFLASH_CUDA_LIB=... PYTHONPATH=packages/longflash/src:packages/longflash-cuda/src \
        python benchmarks/session15/power.py --variants default,v2-qregs --out power.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "session14"))
sys.path.insert(0, str(Path(__file__).parents[1]))
from _probe import ClockSampler, grid_inputs, sdpa  # noqa: E402
from cuda_check import env_setter  # noqa: E402


def run(fn, seconds: float, sampler: ClockSampler) -> dict:
    fn()
    torch.cuda.synchronize()
    t0 = time.time()
    calls = 0
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    timed = False
    while time.time() - t0 < seconds:
        if not timed and time.time() - t0 > 0.5:
            torch.cuda.synchronize()
            ev0.record()
            t_timed, calls, timed = time.time(), 0, True
        fn()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
    ev1.record()
    torch.cuda.synchronize()
    t1 = time.time()
    ms = ev0.elapsed_time(ev1) / calls
    s = sampler.window(t_timed, t1)
    power = statistics.median(p for _, _, p, _ in s) if s else float("nan")
    return {
        "ms": ms,
        "calls": calls,
        "clock_mhz": statistics.median(c for _, c, _, _ in s) if s else None,
        "power_w": power,
        "joules_per_call": power * ms / 1e3,
        "reasons": sorted({r for *_, r in s}),
        "samples": len(s),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="default")
    ap.add_argument("--dims", default="128")
    ap.add_argument("--seqlens", default="4096")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--masks", default="dense", help="dense, causal or both")
    ap.add_argument("--out", default="power.json")
    args = ap.parse_args()
    import longflash.frontends.torch as lft
    from longflash_cuda import _torch
    from torch.nn.attention import SDPBackend

    sampler = ClockSampler(period_s=0.05, reasons=True)
    time.sleep(0.5)
    rows = []
    shapes = [
        (int(d), int(n), m == "causal")
        for d in args.dims.split(",")
        for n in args.seqlens.split(",")
        for m in args.masks.split(",")
    ]
    for d, n, causal in shapes:
        (q, k, v), (qt, kt, vt), b, h = grid_inputs(d, n)
        flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
        call = lft.make_call(q, k, v, causal=causal)
        ours = partial(_torch.forward, call, q, k, v)
        cases = {f"cuda:{var}": (var, ours) for var in args.variants.split(",")}
        cases["flash"] = ("default", sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt, causal))
        cases["cudnn"] = ("default", sdpa(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, causal))
        for name, (var, fn) in cases.items():
            env_setter("LONGFLASH_CUDA_FWD", var)()
            time.sleep(1.0)  # idle between contenders: each starts from the same clock
            r = run(fn, args.seconds, sampler)
            r.update(name=name, D=d, N=n, causal=causal, tflops=flops / r["ms"] / 1e9)
            rows.append(r)
            print(
                f"hd{d} {n:>6} {'causal' if causal else 'dense':>6} {name:>16}: "
                f"{r['tflops']:5.0f} TFLOP/s {r['clock_mhz']} MHz "
                f"{r['power_w']:.0f} W {r['joules_per_call'] * 1e3:.1f} mJ/call {r['reasons']}",
                flush=True,
            )
        env_setter("LONGFLASH_CUDA_FWD", "default")()
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
