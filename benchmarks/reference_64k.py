"""Time and peak memory of the reference backend's blockwise path on the CPU.

Runs one long attention (64K tokens by default) forward, then forward+backward, with
PyTorch through the public API, and prints wall time and the process's peak RSS. The
blockwise path keeps memory O(N): the peak is the inputs, outputs and gradients plus a
few tiles of scores, never the N x N matrix (which at 64K tokens and 8 heads would be
128 GiB in float32).

    python benchmarks/reference_64k.py                      # 64K, H=8, D=64, bf16, causal
    python benchmarks/reference_64k.py --no-causal --heads 4 --dtype float32
"""

from __future__ import annotations

import argparse
import resource
import time


def _peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_s() -> float:
    # CPU time of this process (all threads): on a shared machine it shows how much of
    # the wall time was spent computing rather than waiting for a core.
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import longflash
    import torch
    from longflash import reference

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hk = args.kv_heads or args.heads
    shape_q = (args.batch, args.seqlen, args.heads, args.dim)
    shape_k = (args.batch, args.seqlen, hk, args.dim)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(shape_q, generator=gen).to(dtype)
    k = torch.randn(shape_k, generator=gen).to(dtype)
    v = torch.randn(shape_k, generator=gen).to(dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"q {tuple(q.shape)} k/v {tuple(k.shape)} {args.dtype} causal={args.causal}"
    )
    print(f"peak RSS after creating inputs: {_peak_rss_gib():.2f} GiB")

    with reference.force_path("blockwise"):
        # Warm-up (thread pools, first allocations) on a small slice of the same shape.
        w = [x[:, :2048].clone().requires_grad_(True) for x in (q, k, v)]
        longflash.attention(*w, causal=args.causal, backend="reference").sum().backward()
        t0, c0 = time.perf_counter(), _cpu_s()
        with torch.no_grad():
            out = longflash.attention(q, k, v, causal=args.causal, backend="reference")
        t_fwd, c_fwd = time.perf_counter() - t0, _cpu_s() - c0
        assert torch.isfinite(out).all()
        print(f"forward: {t_fwd:.1f} s wall, {c_fwd:.1f} s CPU, peak RSS {_peak_rss_gib():.2f} GiB")
        del out
        if args.backward:
            for x in (q, k, v):
                x.requires_grad_(True)
            dout = torch.randn(q.shape[:3] + v.shape[3:], generator=gen).to(dtype)
            t0, c0 = time.perf_counter(), _cpu_s()
            out = longflash.attention(q, k, v, causal=args.causal, backend="reference")
            out.backward(dout)
            t_fb, c_fb = time.perf_counter() - t0, _cpu_s() - c0
            assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
            print(
                f"forward+backward: {t_fb:.1f} s wall, {c_fb:.1f} s CPU, "
                f"peak RSS {_peak_rss_gib():.2f} GiB"
            )


if __name__ == "__main__":
    main()
