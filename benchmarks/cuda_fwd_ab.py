"""A/B timing of the cuda backend's forward variants (LONGFLASH_CUDA_FWD) in one process, next
to SDPA flash (FA2) and cuDNN, bf16, causal and not, at the `longflash bench` grid's shapes
(B = 16K / N, H = 2048 / D).

The variant is read by the library on every call, so one process times them all on the same
inputs. `default` is what the library picks by shape (api.cpp fwd_kernel); `v2` forces the
128-query CTA with two consumer warpgroups, `v3-no-pingpong` the 192-query CTA with three (the
hd64 default from 4K queries), `v3` the same with ping-pong GEMM issue, `v3-emu` v3 with 3/16 of
the exponentials on the FMA pipe, `v3-ownkeys` v3-no-pingpong with each warpgroup skipping the
key blocks above its own rows. The v3 kernels exist at hd64 only; at other head dims the
library runs v2 for them, so their rows there measure nothing but run-to-run noise (a check
that hd128 is unaffected). A `+grid` / `+persistent` / `+dynamic` suffix forces the grid too,
and `+g<n>` the dynamic schedule's longest-first group of n heads (`+dynamic+g1`: head-major).
Each variant's out and lse are compared with the first variant's, and out with SDPA flash's.
Timings are medians over --rounds passes, each of which times every variant and peer in turn,
starting one further along each pass, so that neither drift during the run nor the position in
a pass favours one of them. `--timing burst` (default) times ten back-to-back runs per turn, so a
turn's clock is much what the previous turn left; `--timing bench` times each turn as
`longflash bench` does (50 ms of warm-up, 250 ms of runs with L2 flushed between them), so each
kernel runs at its own sustained clock (session 15: the burst timing put the same kernel 5% apart
under two names).

    LONGFLASH_CUDA_LIB=build-cuda/liblongflash_cuda.so \
    PYTHONPATH=packages/longflash/src:packages/longflash-cuda/src \
        python benchmarks/cuda_fwd_ab.py --out ab.json [--variants default,v3,v3-emu] \
            [--seqlens 1024,4096,16384] [--dims 64,128,192x128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from longflash.frontends import torch as lft
from longflash_cuda import _torch

sys.path.insert(0, str(Path(__file__).parent))
from cuda_check import env_setter, interleaved, rel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="cuda_fwd_ab.json")
    ap.add_argument("--variants", default="default,v2,v3-no-pingpong,v3")
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--dims", default="64,128", help="head dims; DqkxDv for Dqk != Dv (192x128)")
    ap.add_argument("--tokens", type=int, default=16384, help="B·N (the bench grid's 16K)")
    ap.add_argument("--width", type=int, default=2048, help="H·D (the bench grid's 2048)")
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved passes over all variants (median)"
    )
    ap.add_argument("--timing", choices=("burst", "bench"), default="burst")
    ap.add_argument("--masks", default="dense,causal", help="dense, causal or both")
    args = ap.parse_args()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(),
        "timing": args.timing,
    }
    timer = None
    if args.timing == "bench":
        from longflash.bench.torch_harness import TorchHarness

        harness = TorchHarness("cuda")
        timer = lambda fn: harness._time(fn).median_ms  # noqa: E731 (the bench's own timer)
    rows: list[dict] = []
    variants = args.variants.split(",")
    masks = [{"dense": False, "causal": True}[m] for m in args.masks.split(",")]
    for d, dv in parse_dims(args.dims):
        for n in (int(x) for x in args.seqlens.split(",")):
            b, h = max(1, args.tokens // n), args.width // d
            rows += measure(b, n, h, d, dv, variants, args.rounds, timer, masks)
            report["timings"] = rows
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    names = [*variants, "flash", "cudnn"]
    print("\nfwd TFLOP/s (ms)  N  D  causal | " + " | ".join(names) + " | best/flash")
    for r in rows:
        cells = []
        for v in names:
            t = r.get(f"{v}_fwd_ms")
            cells.append(f"{r[f'{v}_fwd_tflops']:.0f} ({t:.3f})" if t else "-")
        ours = [r[f"{v}_fwd_tflops"] for v in variants if f"{v}_fwd_tflops" in r]
        ratio = f"{max(ours) / r['flash_fwd_tflops']:.2f}" if "flash_fwd_tflops" in r else "-"
        dims = f"{r['D']}" if r["Dv"] == r["D"] else f"{r['D']}x{r['Dv']}"
        head = f"{r['N']:>6} {dims:>4} {str(r['causal']):>5} | "
        print(head + " | ".join(cells) + f" | {ratio}")
    return 0


def parse_dims(spec: str) -> list[tuple[int, int]]:
    """(Dqk, Dv) pairs from "64,192x128": [(64, 64), (192, 128)]."""
    pairs = []
    for item in spec.split(","):
        dqk, _, dv = item.partition("x")
        pairs.append((int(dqk), int(dv or dqk)))
    return pairs


def _sdpa(backend, qt, kt, vt, causal: bool) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)


def measure(
    b: int,
    n: int,
    h: int,
    d: int,
    dv: int,
    variants: list[str],
    rounds: int,
    timer=None,
    masks=(False, True),
) -> list[dict]:
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn(b, n, h, dv, device="cuda", dtype=torch.bfloat16)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    rows = []
    for causal in masks:
        call = lft.make_call(q, k, v, causal=causal)
        flops = call.flops()
        row = {"causal": causal, "B": b, "N": n, "H": h, "D": d, "Dv": dv, "rounds": rounds}
        ref = None
        cases = {}
        for var in variants:
            setup = env_setter("LONGFLASH_CUDA_FWD", var)
            setup()
            out, lse = _torch.forward(call, q, k, v)
            torch.cuda.synchronize()
            if ref is None:
                ref = (out.clone(), lse.clone())
            else:
                row[f"{var}_out_rel_vs_{variants[0]}"] = rel(out, ref[0])
                row[f"{var}_lse_maxabs_vs_{variants[0]}"] = (lse - ref[1]).abs().max().item()
            del out, lse
            cases[var] = (setup, partial(_torch.forward, call, q, k, v))
        unset = env_setter("LONGFLASH_CUDA_FWD", "default")
        for name, be in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            fn = partial(_sdpa, be, qt, kt, vt, causal)
            try:
                o = fn()
            except Exception as exc:  # a peer missing on this machine is reported, not fatal
                row[f"{name}_error"] = repr(exc)
                continue
            if name == "flash":
                row[f"{variants[0]}_out_rel_vs_flash"] = rel(ref[0], o.transpose(1, 2))
            del o
            cases[name] = (unset, fn)
        for name, t in interleaved(cases, rounds, timer).items():
            row[f"{name}_fwd_ms"] = t
            row[f"{name}_fwd_tflops"] = flops / t / 1e9
            print(name, n, d, "causal" if causal else "dense", f"{t:.3f} ms", flush=True)
        unset()
        rows.append(row)
        del ref
    del q, k, v, qt, kt, vt
    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main())
