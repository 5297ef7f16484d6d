"""A/B timing of the cuda backend's backward variants (LONGFLASH_CUDA_BWD) in one process, next
to SDPA flash and cuDNN, bf16 H=16 B=1 (causal and not; --tokens/--width: the bench grid's
B = tokens/N, H = width/D), for each sequence length and head dim.

The variant is read by the library on every call, so one process times them all on the same
inputs. `timing-no-dq-add` drops v2's dQ reductions (its dQ is wrong): it only measures what the
reductions cost; `timing-v5-no-dq-add` does the same for v5, and `timing-v5-no-reduce` keeps v5's
staging and hand-over to the writer warps but issues no reduce. v7 is v5 with the dQ accumulator
laid out per query tile (one bulk reduce per warpgroup half and step instead of one per row);
`timing-v7-no-reduce` is its staging and hand-over without the reduce. At hd256
`timing-v6-no-dq-add` is v6 without its dQ REDs and `timing-v6-no-dq` without the dQ GEMM too
(a dK/dV-only kernel's cost); v8 is v6 with v7's per-tile accumulator, added by bulk reduces.
v5 and v7 exist at hd64 and hd128, v6 and v8 at hd256 (elsewhere the library runs v2 for them),
so each head dim times the first variant and the variants that exist there. Each variant's
dQ/dK/dV are compared with the first variant's (v2 by default: an independent kernel).
"default" times whatever LONGFLASH_CUDA_BWD unset selects. Timings are medians over --rounds
passes, each of which times every variant and peer in turn, starting one further along each
pass (drift and position fall on all alike).

    LONGFLASH_CUDA_LIB=build-cuda/liblongflash_cuda.so \
    PYTHONPATH=packages/longflash/src:packages/longflash-cuda/src \
        python benchmarks/cuda_bwd_ab.py --out ab.json [--variants v2,v5] \
            [--seqlens 4096,16384] [--dims 64,128,256] [--tokens 16384 --width 2048]
    CTA order: --variants default+heads,default,default+group8 (api.cpp bwd_head_group)
    hd256: --dims 256 --variants v2,v6
    hd256 dQ cost: --dims 256 --variants v6,timing-v6-no-dq-add,timing-v6-no-dq
    hd256 per-tile dQ: --dims 256 --variants v6,v8
    per-tile dQ: --dims 64,128 --variants v5,v7,timing-v7-no-reduce,timing-v5-no-reduce
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

HD256_ONLY = ("v6", "v8")  # their own kernels at hd256 only


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="cuda_bwd_ab.json")
    ap.add_argument("--variants", default="v2,v5,timing-v5-no-reduce,timing-v5-no-dq-add")
    ap.add_argument("--seqlens", default="16384")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=0, help="B·N (the bench grid's 16384); 0: B = 1")
    ap.add_argument("--width", type=int, default=0, help="H·D (the bench grid's 2048); 0: --heads")
    ap.add_argument("--dims", default="128")
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved passes over all variants (median)"
    )
    args = ap.parse_args()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name()}
    rows: list[dict] = []
    for n in (int(x) for x in args.seqlens.split(",")):
        for d in (int(x) for x in args.dims.split(",")):
            # Each variant only where it is its own kernel (elsewhere the library runs v2 for it):
            # v2 and the default everywhere, v6, v8 and timing-v6-* at hd256, v3/v5/v7 and the
            # other timing-* at hd64/hd128.
            # (a "+heads" / "+group<G>" suffix picks the CTA order, not the kernel)
            variants = [
                v
                for i, v in enumerate(args.variants.split(","))
                if i == 0
                or (kernel := v.split("+")[0]) in ("v2", "default", "")
                or (
                    d == 256
                    if kernel in HD256_ONLY or kernel.startswith("timing-v6-")
                    else d in (64, 128)
                )
            ]
            b = max(1, args.tokens // n) if args.tokens else 1
            h = args.width // d if args.width else args.heads
            rows += measure(b, n, h, d, variants, args.rounds)
            report["timings"] = rows
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    print(json.dumps(rows, indent=1))
    names = [v for v in args.variants.split(",")] + ["flash", "cudnn"]
    print("\nbwd TFLOP/s (ms)  N  D  causal | " + " | ".join(names))
    for r in rows:
        cells = []
        for v in names:
            t = r.get(f"{v}_bwd_ms")
            cells.append(f"{r[f'{v}_bwd_tflops']:.0f} ({t:.2f})" if t else "-")
        print(f"{r['N']:>6} {r['D']:>4} {str(r['causal']):>5} | " + " | ".join(cells))
    return 0


def measure(b: int, n: int, h: int, d: int, variants: list[str], rounds: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    rows = []
    for causal in (False, True):
        flops = 2.5 * 4 * b * n * n * h * d * (0.5 if causal else 1.0)
        call = lft.make_call(q, k, v, causal=causal)
        out, lse = _torch.forward(call, q, k, v)
        dout = torch.randn_like(out)
        row = {"causal": causal, "B": b, "N": n, "H": h, "D": d, "rounds": rounds}
        ref = None
        cases = {}
        for var in variants:
            setup = env_setter("LONGFLASH_CUDA_BWD", var)
            setup()
            grads = _torch.backward(call, dout, q, k, v, out, lse)
            torch.cuda.synchronize()
            if ref is None:
                ref = [g.clone() for g in grads]
            else:
                for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
                    row[f"{var}_{name}_rel_vs_{variants[0]}"] = rel(g, r)
            del grads
            cases[var] = (setup, partial(_torch.backward, call, dout, q, k, v, out, lse))
        unset = env_setter("LONGFLASH_CUDA_BWD", "default")
        graphs = []
        for name, be in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            try:
                with sdpa_kernel(be):
                    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            except Exception as exc:  # a peer missing on this machine is reported, not fatal
                row[f"{name}_error"] = repr(exc)
                continue
            g = torch.randn_like(o)
            graphs.append((o, g))
            cases[name] = (
                unset,
                partial(torch.autograd.grad, o, (qt, kt, vt), g, retain_graph=True),
            )
        for name, t in interleaved(cases, rounds).items():
            row[f"{name}_bwd_ms"] = t
            row[f"{name}_bwd_tflops"] = flops / t / 1e9
            tag = "causal" if causal else "dense"
            print(name, n, d, tag, f"{t:.2f} ms {flops / t / 1e9:.0f} TFLOP/s", flush=True)
        unset()
        rows.append(row)
        del out, lse, dout, graphs
    del q, k, v, qt, kt, vt
    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main())
