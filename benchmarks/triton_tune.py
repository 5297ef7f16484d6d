"""Check, tune and benchmark the triton backend (and compile it offline for sm90).

One script for every step of benchmarks/NOTES-triton.md, so that one GPU call does a lot:

    python benchmarks/triton_tune.py compile              # no GPU: compile every variant for
                                                          # sm90, print registers/spills/smem
    python benchmarks/triton_tune.py check [--long]       # GPU: vs a blockwise fp32 reference
    python benchmarks/triton_tune.py tune --out T.json    # GPU: time tile/TMA/WS candidates
    python benchmarks/triton_tune.py bench --out B.json   # GPU: ours vs SDPA flash/cudnn, Flex
    python benchmarks/triton_tune.py sanitize             # small fwd+bwd for compute-sanitizer
    python benchmarks/triton_tune.py plot B.json B.png    # no GPU: the figure from a bench JSON

Shapes follow DESIGN §7: bf16, batch * seqlen = 16K, heads = 2048 / head_dim. FLOPs are
4·B·H·Nq·Nk·D forward (half when causal) and 2.5x that backward.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# -- problems ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Problem:
    B: int
    N: int
    H: int
    D: int
    causal: bool
    Hk: int | None = None
    Nk: int | None = None
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    dtype: str = "bfloat16"

    @property
    def nk(self) -> int:
        return self.Nk or self.N

    @property
    def hk(self) -> int:
        return self.Hk or self.H

    def flops(self, backward: bool = False) -> float:
        f = 4.0 * self.B * self.H * self.N * self.nk * self.D
        if self.causal:
            f /= 2
        return 2.5 * f if backward else f

    def label(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"hd{self.D} N{self.N} B{self.B} H{self.H} {mask}"


def standard_problem(d: int, n: int, causal: bool) -> Problem:
    return Problem(B=max(1, 16384 // n), N=n, H=2048 // d, D=d, causal=causal)


def make_call(p: Problem, device: str):
    from longflash.call import AttentionCall, normalize_window

    return AttentionCall(
        framework="torch",
        device=device,
        dtype=p.dtype,
        B=p.B,
        Nq=p.N,
        Nk=p.nk,
        Hq=p.H,
        Hk=p.hk,
        Dqk=p.D,
        Dv=p.D,
        causal=p.causal,
        scale=1.0 / math.sqrt(p.D),
        window=normalize_window(p.causal, p.window),
        softcap=p.softcap,
    )


def make_inputs(p: Problem, device: str, grad: bool = False):
    import torch

    dt = getattr(torch, p.dtype)
    q = torch.randn(p.B, p.N, p.H, p.D, device=device, dtype=dt)
    k = torch.randn(p.B, p.nk, p.hk, p.D, device=device, dtype=dt)
    v = torch.randn(p.B, p.nk, p.hk, p.D, device=device, dtype=dt)
    do = torch.randn(p.B, p.N, p.H, p.D, device=device, dtype=dt)
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, do


# -- tile candidates -----------------------------------------------------------------
def candidates(kernel: str, d: int, causal: bool) -> list[Any]:
    """A small space per kernel and head dim; NOTES-triton.md says what each axis buys.

    Register budget (sm90, 255 per thread): the forward keeps O (BM x D fp32) and S
    (BM x BN fp32); dK/dV keeps two BN x D fp32 accumulators plus K and V; dQ keeps dQ and
    Q/dO. Candidates that spill in the offline compile (`compile --all`) are left out.
    """
    from longflash_triton.configs import TileConfig as T

    if kernel == "fwd":
        tiles = {
            64: [(128, 128, 8), (128, 64, 4), (128, 128, 4), (64, 128, 4)],
            128: [(128, 128, 8), (128, 64, 8), (64, 128, 4), (128, 128, 4)],
            256: [(128, 64, 8), (64, 64, 4), (128, 32, 8), (64, 128, 8)],
        }[_hb(d)]
        stages = (2, 3) if d <= 128 else (1, 2)
    elif kernel == "dkdv":  # BM = query rows streamed, BN = key rows resident
        tiles = {
            64: [(64, 128, 8), (32, 128, 8), (64, 64, 4), (32, 64, 4)],
            128: [(64, 64, 8), (32, 64, 8), (16, 64, 4), (32, 64, 4)],
            256: [(32, 64, 8), (16, 64, 8), (64, 64, 8), (32, 32, 4)],
        }[_hb(d)]
        stages = (2, 3) if d <= 128 else (1, 2)
    else:  # dq: BM = query rows resident, BN = key rows streamed
        tiles = {
            64: [(128, 64, 8), (128, 128, 8), (64, 64, 4), (128, 32, 4)],
            128: [(128, 64, 8), (64, 64, 4), (64, 32, 4), (128, 32, 8)],
            256: [(64, 64, 8), (64, 32, 8), (128, 32, 8), (32, 32, 4)],
        }[_hb(d)]
        stages = (2, 3) if d <= 128 else (1, 2)
    # both pipeline depths on the two likeliest tiles, the deeper one elsewhere; and the
    # pointer path (cp.async pipelining) on the two likeliest tiles, against TMA
    out = [T(bm, bn, w, st, tma=True) for bm, bn, w in tiles[:2] for st in stages]
    out += [T(bm, bn, w, stages[-1], tma=True) for bm, bn, w in tiles[2:]]
    out += [T(bm, bn, w, stages[-1], tma=False) for bm, bn, w in tiles[:2]]
    return out


def candidates_v2(kernel: str, d: int, causal: bool) -> list[Any]:
    """Issue 3's follow-up space (hd128 only; NOTES-triton.md, v4): bigger dK/dV tiles with
    8 warps (halves the registers per thread of the BN x D accumulators), and for the
    forward the tiles and depths that could shorten the 4K causal tail. (Run triton_v2_run1
    also timed dQ fused into dK/dV with a TMA reduce-add; it lost by 20-60 % and was
    removed: NOTES-triton.md.)"""
    from longflash_triton.configs import TileConfig as T

    if _hb(d) != 128:
        return candidates(kernel, d, causal)
    if kernel == "fwd":
        tiles = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4)]
        tiles += [(64, 128, 4, 3), (64, 64, 4, 3)]
    elif kernel == "dkdv":
        tiles = [(32, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2)]
        tiles += [(32, 128, 8, 3), (16, 128, 8, 3)]
    else:
        tiles = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2)]
    return [T(bm, bn, w, st, tma=True) for bm, bn, w, st in tiles]


def candidates_v3(kernel: str, d: int, causal: bool) -> list[Any]:
    """Round 2 of issue 3 (hd128; NOTES-triton.md, v5): the query-major dK/dV body (qmajor)
    at the tiles the key-major one could not hold without spilling, against the committed
    key-major tiles. Other kernels and head dims: the table's config only."""
    from longflash_triton.configs import TileConfig as T

    if _hb(d) != 128 or kernel != "dkdv":
        return []
    # (BM, BN, warps, stages, qmajor); TMA on for every one (query-major: 2-D maps for the
    # mask-free blocks, pointers for the masked ones), plus the pointer path of the first
    # query-major tile. 3 stages of 128-row Q/dO tiles exceed the 227 KB of shared memory.
    tiles = [(64, 128, 8, 3, False), (32, 128, 8, 2, False)]  # v4's winners (full, band)
    tiles += [(128, 64, 8, 2, True), (64, 64, 4, 2, True), (64, 64, 4, 3, True)]
    out = [T(bm, bn, w, st, tma=True, qmajor=qm) for bm, bn, w, st, qm in tiles]
    return out + [T(128, 64, 8, 2, tma=False, qmajor=True)]


SPACES = {"v1": candidates, "v2": candidates_v2, "v3": candidates_v3}


def _hb(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def table_config(kernel: str, p: Problem, device: str = "cuda"):
    """The config the committed (or in-process updated) table gives this problem."""
    import torch
    from longflash_triton import configs

    arch = configs.arch(torch.device(device))
    band = p.causal or p.window is not None
    hb = max(16, 1 << (p.D - 1).bit_length())
    n = p.nk if kernel in ("fwd", "dq") else p.N
    return configs.pick(kernel, arch, hb, band, n)


def run_variant(kernel: str, p: Problem, cfg, tensors, fwd_out=None):
    """Launch one kernel family with an explicit config; returns what the next step needs."""
    from longflash_triton import launch

    call = make_call(p, "cuda")
    q, k, v, do = tensors
    if kernel == "fwd":
        return launch.forward(call, q, k, v, cfg=cfg)
    out, lse = fwd_out
    default_kv, default_q = table_config("dkdv", p), table_config("dq", p)
    cfgs = (cfg, default_q) if kernel == "dkdv" else (default_kv, cfg)
    return launch.backward(call, do, q, k, v, out, lse, cfgs=cfgs)


def err_vs_table(kernel: str, p: Problem, cfg, tensors, fwd_out) -> float:
    """Largest relative Frobenius difference of (dq, dk, dv) between this config and the
    table's on the same inputs: a wrong variant shows as O(1), bf16 reordering as ~1e-3."""
    got = run_variant(kernel, p, cfg, tensors, fwd_out)
    ref = run_variant(kernel, p, table_config(kernel, p), tensors, fwd_out)
    return max(_rel(a, b) for a, b in zip(got, ref))


# -- offline compile (no GPU) ----------------------------------------------------------
def _sig_of(value: Any) -> str:
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    names = {
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float32: "fp32",
        torch.int32: "i32",
        torch.int64: "i64",
    }
    if isinstance(value, torch.Tensor):
        return "*" + names[value.dtype]
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{names[value.base.dtype]}{list(value.block_shape)}>"
    if value is None:
        return "constexpr"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if abs(value) < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(type(value))


class _Recorder:
    """Stands in for a @triton.jit kernel: records the launch instead of running it."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn, grid, args, kwargs))

        return launch


def compile_offline(jobs, arch: int = 90, dump: str | None = None) -> list[dict]:
    """Compile recorded launches for cuda:arch with the same constexprs and divisibility
    hints the JIT would use; report registers, spills and shared memory per kernel."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    for name, fn, args, kwargs in jobs:
        names = fn.arg_names
        opts = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
        values = dict(zip(names, args)) | kwargs
        sig, consts, attrs = {}, {}, {}
        for i, n in enumerate(names):
            val = values[n]
            if fn.params[i].is_constexpr or val is None:
                sig[n] = "constexpr"
                consts[n] = val
                continue
            sig[n] = _sig_of(val)
            int16 = (
                isinstance(val, int)
                and not isinstance(val, bool)
                and val % 16 == 0
                and i not in fn.do_not_specialize
            )
            if isinstance(val, torch.Tensor) or int16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        t0 = time.time()
        try:
            k = triton.compile(
                ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=opts
            )
        except Exception as exc:  # report and go on: one broken variant must not hide others
            rows.append({"name": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            print(f"{name:58s} FAILED {rows[-1]['error'][:200]}", flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True
            ).stdout
        if dump:  # the IR of each variant, to read where the registers go
            stem = Path(dump) / "".join(ch if ch.isalnum() else "_" for ch in name)
            stem.parent.mkdir(parents=True, exist_ok=True)
            for ext in ("ttgir", "ptx"):
                stem.with_suffix("." + ext).write_text(k.asm[ext])
            stem.with_suffix(".cubin").write_bytes(k.asm["cubin"])
        regs = _field(usage, "REG:")
        stack = _field(usage, "STACK:")
        ptx = k.asm["ptx"]
        row = {
            "name": name,
            "regs": regs,
            "stack": stack,
            "smem": k.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"),
            "tma": ptx.count("cp.async.bulk.tensor"),
            "reduce": ptx.count("cp.reduce.async.bulk") + ptx.count("red.global"),
            "ws": k.asm["ttgir"].count("ttg.warp_specialize"),
            "loop_spills": loop_spills(k.asm["cubin"], cuobjdump),
            "compile_s": round(time.time() - t0, 1),
        }
        rows.append(row)
        print(
            f"{name:58s} regs {regs:>4} stack {stack:>4} loop-spills {row['loop_spills']} "
            f"smem {row['smem']:>6} "
            f"wgmma {row['wgmma']:>3} tma {row['tma']:>2} red {row['reduce']:>3} ws {row['ws']} "
            f"({row['compile_s']} s)",
            flush=True,
        )
    return rows


def loop_spills(cubin: bytes, cuobjdump: Path) -> list[int]:
    """Local-memory loads/stores (LDL/STL) inside each innermost loop that issues HGMMA,
    from the SASS: spills there cost on every step; the stack size alone does not say
    where they are (address scalars spilled around the loops cost next to nothing)."""
    import re

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True)
    ins = []
    for line in sass.stdout.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:  # a backward branch closes a loop
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if any("HGMMA" in t for t in body):
                loops.append((int(m.group(1), 16), addr, body))
    inner = [
        body
        for lo, hi, body in loops
        if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2, _ in loops)
    ]
    return [sum(t.startswith(("LDL", "STL")) for t in body) for body in inner]


def _field(text: str, key: str) -> str:
    i = text.find(key)
    return text[i + len(key) :].split()[0] if i >= 0 else "?"


def cmd_compile(args) -> None:
    import torch
    from longflash_triton import configs, launch

    log: list = []
    real = {
        n: getattr(launch, n) for n in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_prep")
    }
    for n, fn in real.items():
        setattr(launch, n, _Recorder(fn, log))
    configs.arch = lambda device: f"sm{args.arch}"
    launch._precision = lambda x: (False, "ieee" if x.dtype == torch.float32 else "tf32")
    jobs = []
    for d in args.head_dims:
        for causal in [m == "causal" for m in args.masks]:
            p = standard_problem(d, 1024, causal)
            for kernel in args.kernels:
                space = SPACES[args.space]
                cands = space(kernel, d, causal) if args.all else [None]
                for cfg in cands:
                    tensors = make_inputs(p, "cpu")
                    call = make_call(p, "cpu")
                    log.clear()
                    q, k, v, do = tensors
                    if kernel == "fwd":
                        launch.forward(call, q, k, v, cfg=cfg)
                    else:
                        out = torch.empty_like(q)
                        lse = torch.empty(p.B, p.H, p.N)
                        pick = configs.pick(
                            "dkdv" if kernel == "dkdv" else "dq", f"sm{args.arch}", d, causal
                        )
                        cfgs = (cfg or pick, pick) if kernel == "dkdv" else (pick, cfg or pick)
                        launch.backward(call, do, q, k, v, out, lse, cfgs=cfgs)
                    want = {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq"}[kernel]
                    for fn, _grid, a, kw in log:
                        if fn.__name__ == want:
                            c = cfg or "table"
                            jobs.append(
                                (
                                    f"{kernel} hd{d} {'causal' if causal else 'full'} {c}",
                                    fn,
                                    a,
                                    dict(kw),
                                )
                            )
    compile_offline(jobs, args.arch, args.dump)


# -- GPU helpers -----------------------------------------------------------------------
def _bench(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds with device events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ceilings() -> dict:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms_copy = _bench(lambda: y.copy_(x))
    return {
        "matmul_bf16_tflops": 2 * 8192**3 / ms / 1e9,
        "copy_tbps": 2 * x.numel() * 2 / ms_copy / 1e9,
    }


def environment() -> dict:
    import torch
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "capability": torch.cuda.get_device_capability(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


# -- correctness at large N ----------------------------------------------------------
def ref_blockwise(q, k, v, do, *, causal, scale, window, softcap, block=1024):
    """fp32 attention forward and backward, one block of query rows at a time (O(block·Nk)
    memory). q (B, N, H, D); returns out, lse (B, H, N), dq, dk, dv, all fp32."""
    import torch
    from longflash.call import normalize_window

    B, N, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    g = H // Hk
    w = normalize_window(causal, window)
    qf, kf, vf, dof = (x.float().transpose(1, 2) for x in (q, k, v, do))  # (B, H, N, D)
    kf = kf.repeat_interleave(g, 1)
    vf = vf.repeat_interleave(g, 1)
    out = torch.empty_like(dof[..., : v.shape[-1]])
    lse = torch.empty(B, H, N, device=q.device)
    off = Nk - N
    j = torch.arange(Nk, device=q.device)

    def scores(r0, r1):
        s = torch.einsum("bhqd,bhkd->bhqk", qf[:, :, r0:r1], kf) * scale
        t = None
        if softcap is not None:
            t = torch.tanh(s / softcap)
            s = softcap * t
        if w is not None:
            i = torch.arange(r0, r1, device=q.device)[:, None]
            m = torch.ones(r1 - r0, Nk, dtype=torch.bool, device=q.device)
            if w[0] is not None:
                m &= j[None] >= i + off - w[0]
            if w[1] is not None:
                m &= j[None] <= i + off + w[1]
            s = s.masked_fill(~m, float("-inf"))
        return s, t

    def probs(s):
        l_ = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isinf(l_), 0.0, l_)[..., None])
        return p, l_

    for r0 in range(0, N, block):
        r1 = min(N, r0 + block)
        s, _ = scores(r0, r1)
        p, lse[:, :, r0:r1] = probs(s)
        out[:, :, r0:r1] = p @ vf
    if do is None:
        return out.transpose(1, 2), lse, None, None, None
    delta = (out * dof).sum(-1)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for r0 in range(0, N, block):
        r1 = min(N, r0 + block)
        s, t = scores(r0, r1)
        p, _ = probs(s)
        dv += p.transpose(-1, -2) @ dof[:, :, r0:r1]
        ds = p * (dof[:, :, r0:r1] @ vf.transpose(-1, -2) - delta[:, :, r0:r1, None])
        if t is not None:
            ds = ds * (1 - t * t)
        dq[:, :, r0:r1] = scale * ds @ kf
        dk += scale * ds.transpose(-1, -2) @ qf[:, :, r0:r1]
    dk = dk.view(B, Hk, g, Nk, -1).sum(2)
    dv = dv.view(B, Hk, g, Nk, -1).sum(2)
    return (out.transpose(1, 2), lse, dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2))


def _rel(a, b) -> float:
    import torch

    a, b = a.float(), b.float()
    if torch.isnan(a).any():
        return float("inf")
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return float("inf")
    return ((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30)).item()


CHECKS = [
    Problem(B=1, N=16384, H=8, D=128, causal=False),
    Problem(B=1, N=16384, H=8, D=128, causal=True),
    Problem(B=2, N=8192, H=8, Hk=2, D=64, causal=True, window=(1000, None), softcap=30.0),
    Problem(B=1, N=6000, Nk=9000, H=4, Hk=1, D=96, causal=True),
    Problem(B=1, N=4096, H=4, D=256, causal=False, window=(512, 512)),
    Problem(B=1, N=16384, H=8, D=128, causal=True, dtype="float16"),
]
LONG = [Problem(B=1, N=131072, H=8, D=128, causal=True)]
TOL = {"bfloat16": 2e-2, "float16": 5e-3}


def check_one(p: Problem) -> dict:
    import longflash
    import torch

    q, k, v, do = make_inputs(p, "cuda", grad=True)
    t0 = time.time()
    out, lse = longflash.attention(
        q,
        k,
        v,
        causal=p.causal,
        window=p.window,
        softcap=p.softcap,
        return_lse=True,
        backend="triton",
    )
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
    ours_s = time.time() - t0
    ref = ref_blockwise(
        q.detach(),
        k.detach(),
        v.detach(),
        do,
        causal=p.causal,
        scale=1 / math.sqrt(p.D),
        window=p.window,
        softcap=p.softcap,
        block=512 if p.N > 32768 else 1024,
    )
    errs = {
        n: _rel(a, b)
        for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), ref)
    }
    ok = all(e <= TOL[p.dtype] for e in errs.values())
    row = {"problem": dataclasses.asdict(p), "errors": errs, "ok": ok, "ours_s": ours_s}
    print(
        f"check {p.label():34s} {p.dtype:9s} {'OK ' if ok else 'BAD'} "
        + " ".join(f"{n} {e:.1e}" for n, e in errs.items()),
        flush=True,
    )
    del ref
    torch.cuda.empty_cache()
    return row


def check_varlen() -> dict:
    """Packed sequences (empty and length-1 ones included), causal, GQA; errors over the
    whole packed tensors, as for the batched checks. (Per sequence, a length-1 sequence has
    dq = dk = 0 exactly, and the kernels' dS = P(dP - rowsum(dO·O)) leaves the rounding of
    O there: tiny absolutely, large relative to 0.)"""
    import longflash
    import torch

    lens = [1, 0, 5000, 3333, 7000, 1050]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    T, H, D = int(cu[-1]), 8, 128
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, lse = longflash.attention_varlen(
        q,
        k,
        v,
        cu,
        cu,
        max_seqlen_q=max(lens),
        max_seqlen_k=max(lens),
        causal=True,
        return_lse=True,
        backend="triton",
    )
    do = torch.randn_like(out)
    ours = (out, lse) + torch.autograd.grad(out, (q, k, v), do)
    parts: list[list] = [[], [], [], [], []]
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        if e == s:
            continue
        ref = ref_blockwise(
            q[None, s:e].detach(),
            k[None, s:e].detach(),
            v[None, s:e].detach(),
            do[None, s:e],
            causal=True,
            scale=1 / math.sqrt(D),
            window=None,
            softcap=None,
        )
        for i, r in enumerate(ref):
            parts[i].append(r[0])
    ref = [torch.cat(p_, 1 if i == 1 else 0) for i, p_ in enumerate(parts)]
    errs = {n: _rel(a, r) for n, a, r in zip(("out", "lse", "dq", "dk", "dv"), ours, ref)}
    ok = all(e <= TOL["bfloat16"] for e in errs.values())
    print(
        f"check varlen {lens} causal GQA    {'OK ' if ok else 'BAD'} "
        + " ".join(f"{n} {e:.1e}" for n, e in errs.items()),
        flush=True,
    )
    return {
        "problem": {"varlen": lens, "H": H, "Hk": 2, "D": D, "causal": True},
        "errors": errs,
        "ok": ok,
    }


def _warm_check(p: Problem) -> str:
    """Worker: compile the kernels a check problem needs (same shapes, same specialisation)."""
    import longflash
    import torch

    try:
        q, k, v, do = make_inputs(p, "cuda", grad=True)
        out = longflash.attention(
            q, k, v, causal=p.causal, window=p.window, softcap=p.softcap, backend="triton"
        )
        torch.autograd.grad(out, (q, k, v), do)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:
        return f"{p.label()}: {type(exc).__name__}: {exc}"[:300]


def _pool_map(fn, items, workers: int) -> list:
    """Run fn over items in spawned worker processes; a crashed pool only costs the warm-up
    (the parent then compiles what is missing itself)."""
    import multiprocessing as mp

    if workers <= 1 or not items:
        return []
    try:
        with cf.ProcessPoolExecutor(
            min(workers, len(items)), mp_context=mp.get_context("spawn")
        ) as ex:
            return list(ex.map(fn, items))
    except Exception as exc:
        print(f"worker pool failed ({type(exc).__name__}: {exc}); going on serially", flush=True)
        return []


def cmd_check(args) -> list[dict]:
    rows = []
    probs = CHECKS + (LONG if args.long else [])
    if args.checks is not None:  # a subset, by index into CHECKS (+ LONG)
        probs = [probs[int(i)] for i in args.checks if i != "varlen"]
    t0 = time.time()
    for err in _pool_map(_warm_check, probs, args.workers):
        if err:
            print("warm-up error:", err, flush=True)
    print(f"check kernels compiled in {time.time() - t0:.0f} s", flush=True)
    for p in probs:
        rows.append(_guard(check_one, p))
    if args.checks is None or "varlen" in args.checks:
        rows.append(_guard(check_varlen))
    return rows


def _guard(fn, *a):
    try:
        return fn(*a)
    except Exception as exc:  # one failure must not lose the rest of a GPU call
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:500], "args": repr(a)[:200]}


# -- tuning --------------------------------------------------------------------------
def _tune_jobs(head_dims, ns, space="v1", kernels=("fwd", "dkdv", "dq")) -> list:
    jobs = []
    pick = SPACES[space]
    for d in head_dims:
        for n in ns:
            for causal in (False, True):
                p = standard_problem(d, n, causal)
                for kernel in kernels:
                    for cfg in pick(kernel, d, causal):
                        jobs.append((kernel, p, cfg))
    return jobs


def _warm(job_chunk) -> list[str]:
    """Worker: compile (and run once) each variant, so the parent finds them cached."""
    import torch

    errors = []
    for kernel, p, cfg in job_chunk:
        try:
            t = make_inputs(p, "cuda")
            fo = None if kernel == "fwd" else run_variant("fwd", p, None, t)
            run_variant(kernel, p, cfg, t, fo)
            torch.cuda.synchronize()
        except Exception as exc:
            errors.append(f"{kernel} {p.label()} {cfg}: {type(exc).__name__}: {exc}"[:300])
    return errors


def precompile(jobs, workers: int) -> list[str]:
    chunks = [jobs[i::workers] for i in range(workers)]
    errors = [e for errs in _pool_map(_warm, chunks, workers) for e in errs]
    for e in errors:
        print("compile/run error:", e, flush=True)
    return errors


def cmd_tune(args) -> dict:
    import torch

    jobs = _tune_jobs(args.head_dims, args.seqlens, args.space, args.tune_kernels)
    t0 = time.time()
    errors = precompile(jobs, args.workers) if args.workers > 1 else []
    print(f"precompiled {len(jobs)} variants in {time.time() - t0:.0f} s", flush=True)
    rows, best = [], {}
    for kernel, p, cfg in jobs:
        try:
            t = make_inputs(p, "cuda")
            fo = None if kernel == "fwd" else run_variant("fwd", p, None, t)
            err = None if kernel == "fwd" else err_vs_table(kernel, p, cfg, t, fo)
            ms = _bench(functools.partial(run_variant, kernel, p, cfg, t, fo), warmup=10, rep=40)
        except Exception as exc:
            rows.append(
                {
                    "kernel": kernel,
                    "problem": p.label(),
                    "config": dataclasses.asdict(cfg),
                    "error": str(exc)[:300],
                }
            )
            continue
        # TFLOP/s of this kernel's share: dK/dV does 4 of the 7 backward products, dQ 3
        share = {"fwd": 1.0, "dkdv": 2.0, "dq": 1.5}[kernel]
        tflops = share * p.flops() / ms / 1e9
        row = {
            "kernel": kernel,
            "problem": p.label(),
            "config": dataclasses.asdict(cfg),
            "ms": ms,
            "tflops": tflops,
        }
        if err is not None:  # dK/dV and dQ variants are timed as the whole backward
            row["bwd_tflops"] = p.flops(True) / ms / 1e9
            row["err_vs_table"] = err
        rows.append(row)
        if args.space == "v3":
            print(
                f"  {kernel:5s} {p.label():30s} {ms:8.3f} ms  bwd {p.flops(True) / ms / 1e9:5.0f}"
                f" TFLOP/s  err {err:.1e}  {cfg}",
                flush=True,
            )
        if err is not None and not err <= TOL["bfloat16"]:
            print(f"  WRONG ({err:.2e} vs the table's result): left out  {cfg}", flush=True)
            row["wrong"] = True
            continue
        key = (kernel, p.D, p.causal, p.N)
        if key not in best or ms < best[key][0]:
            best[key] = (ms, cfg, tflops)
        torch.cuda.empty_cache()
    print("\nbest per kernel / head dim / mask / N:")
    for (kernel, d, causal, n), (ms, cfg, tf) in sorted(best.items()):
        print(
            f"  {kernel:5s} hd{d:<4d} {'band' if causal else 'full'} N{n:<6d} {ms:8.3f} ms "
            f"{tf:6.0f} TFLOP/s  {cfg}"
        )
    table = _weighted_best(rows, best)
    print("\ntable (one config per kernel / head dim / mask, best geometric mean over N):")
    for key, cfg in table.items():
        print(f"  {key:16s} {cfg}")
    return {"rows": rows, "best": table, "best_per_n": _per_n(best), "errors": errors}


def _per_n(best: dict) -> list:
    return [
        {"kernel": k[0], "D": k[1], "causal": k[2], "N": k[3], "ms": v[0], "config": str(v[1])}
        for k, v in sorted(best.items())
    ]


def _weighted_best(rows: list[dict], best: dict) -> dict:
    """One config per (kernel, head dim, mask): the one whose time, relative to the best at
    each N, has the smallest geometric mean (a config missing at some N is out)."""
    groups: dict = {}
    for r in rows:
        if "ms" not in r or r.get("wrong"):
            continue
        causal = r["problem"].endswith("causal")
        d = int(r["problem"].split()[0][2:])
        n = int(r["problem"].split()[1][1:])
        rel = r["ms"] / best[(r["kernel"], d, causal, n)][0]
        key = (r["kernel"], d, causal)
        cfg = json.dumps(r["config"], sort_keys=True)
        groups.setdefault(key, {}).setdefault(cfg, []).append(rel)
    table = {}
    for (kernel, d, causal), cfgs in sorted(groups.items()):
        most = max(len(v) for v in cfgs.values())
        score = {
            c: math.exp(sum(map(math.log, v)) / len(v)) for c, v in cfgs.items() if len(v) == most
        }
        cfg = json.loads(min(score, key=score.get))
        table[f"{kernel}/{d}/{'band' if causal else 'full'}"] = {
            k: v for k, v in cfg.items() if v is not False
        }
    return table


# -- benchmark against peers -------------------------------------------------------------
def _peers(p: Problem):
    """(name, fwd callable builder) for SDPA flash, SDPA cudnn and FlexAttention."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def build(q, k, v):
            def f():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=p.causal)

            return f

        return build

    def flex(q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        fn = _FLEX.setdefault("fn", torch.compile(flex_attention, dynamic=False))
        bm = None
        if p.causal:
            bm = create_block_mask(lambda b, h, i, j: i >= j, None, None, p.N, p.N, device="cuda")
        return lambda: fn(q, k, v, block_mask=bm)

    return [
        ("sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION)),
        ("sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)),
        ("flex", flex),
    ]


_FLEX: dict = {}


def _flex_setup() -> None:
    """Flex needs one compile per shape and mask here (dynamic=False), more than dynamo's
    default recompile limit; and its compiled backward donates buffers, which forbids the
    retain_graph=True that timing the backward alone needs."""
    import torch

    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._functorch.config.donated_buffer = False


def bench_one(p: Problem, impls: list[str], bwd_only: bool = False) -> list[dict]:
    import longflash
    import torch

    rows = []
    for name in impls:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        dt = getattr(torch, p.dtype)
        try:
            if name == "triton":
                q, k, v, do = make_inputs(p, "cuda", grad=True)
                f = functools.partial(
                    longflash.attention, q, k, v, causal=p.causal, backend="triton"
                )
            else:  # peers take their native (B, H, N, D) layout
                shape = (p.B, p.H, p.N, p.D)
                q, k, v, do = (torch.randn(shape, device="cuda", dtype=dt) for _ in range(4))
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                f = dict(_peers(p))[name](q, k, v)
            out = f()
            fwd_ms = float("nan") if bwd_only else _bench(f)
            out = f()
            bwd_ms = _bench(
                functools.partial(torch.autograd.grad, out, (q, k, v), do, retain_graph=True)
            )
            mem = torch.cuda.max_memory_allocated() / 2**30
        except Exception as exc:
            rows.append(
                {
                    "impl": name,
                    "problem": dataclasses.asdict(p),
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                }
            )
            print(f"  {name:10s} {p.label():32s} ERROR {rows[-1]['error'][:120]}", flush=True)
            continue
        row = {
            "impl": name,
            "problem": dataclasses.asdict(p),
            "label": p.label(),
            "fwd_ms": fwd_ms,
            "bwd_ms": bwd_ms,
            "fwd_tflops": p.flops() / fwd_ms / 1e9,
            "bwd_tflops": p.flops(True) / bwd_ms / 1e9,
            "peak_gib": mem,
        }
        rows.append(row)
        print(
            f"  {name:10s} {p.label():32s} fwd {row['fwd_tflops']:6.0f} bwd "
            f"{row['bwd_tflops']:6.0f} TFLOP/s  peak {mem:5.2f} GiB",
            flush=True,
        )
    return rows


def _warm_flex(problems) -> list[str]:
    """Worker: compile FlexAttention for each problem (fills inductor's on-disk caches)."""
    import torch

    errs = []
    _flex_setup()
    for p in problems:
        try:
            shape = (p.B, p.H, p.N, p.D)
            q, k, v = (
                torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3)
            )
            out = dict(_peers(p))["flex"](q, k, v)()
            out.sum().backward()
            torch.cuda.synchronize()
        except Exception as exc:
            errs.append(f"flex {p.label()}: {exc}"[:300])
    return errs


def bench_problems(args) -> list[Problem]:
    return [
        standard_problem(d, n, c)
        for d in args.head_dims
        for n in args.seqlens
        for c in (False, True)
    ]


def _flex_problems(args) -> list[Problem]:
    return [
        p
        for p in bench_problems(args)
        if p.N >= args.flex_min_n and (args.flex_dims is None or p.D in args.flex_dims)
    ]


def warm_flex(args) -> None:
    t0 = time.time()
    for errs in _pool_map(_warm_flex, [[p] for p in _flex_problems(args)], args.flex_workers):
        for e in errs:
            print("flex warm-up error:", e, flush=True)
    print(f"flex compiled in {time.time() - t0:.0f} s", flush=True)


def cmd_bench(args, sink=None, warmed: bool = False) -> list[dict]:
    _flex_setup()
    probs = bench_problems(args)
    flex_probs = _flex_problems(args)
    if not warmed:
        warm_flex(args)
    rows = []
    for p in probs:
        impls = ["triton"] + [n for n in args.peers if n != "flex" or p in flex_probs]
        rows += bench_one(p, impls, args.bwd_only)
        if sink is not None:  # keep what is measured if the call runs out of time
            sink(rows)
    return rows


def summary(rows: list[dict]) -> str:
    """The short table printed last: ours in TFLOP/s and the ratios to each peer."""
    by = {}
    for r in rows:
        if "error" not in r:
            by[(r["label"], r["impl"])] = r
    labels = sorted(
        {r["label"] for r in rows if "label" in r},
        key=lambda s: (int(s.split()[0][2:]), int(s.split()[1][1:]), s),
    )
    lines = [
        f"{'problem':33s} {'fwd':>5s} {'xFA2':>5s} {'xFlex':>5s} {'xcuDNN':>6s} | "
        f"{'bwd':>5s} {'xFA2':>5s} {'xFlex':>5s} {'xcuDNN':>6s}"
    ]
    for lab in labels:
        ours = by.get((lab, "triton"))
        if ours is None:
            continue
        cells = []
        for kind in ("fwd", "bwd"):
            cells.append(f"{ours[kind + '_tflops']:5.0f}")
            for peer, width in (("sdpa_flash", 5), ("flex", 5), ("sdpa_cudnn", 6)):
                pr = by.get((lab, peer))
                cells.append(
                    f"{ours[kind + '_tflops'] / pr[kind + '_tflops']:{width}.2f}"
                    if pr
                    else f"{'-':>{width}s}"
                )
        lines.append(f"{lab:33s} " + " ".join(cells[:4]) + " | " + " ".join(cells[4:]))
    return "\n".join(lines)


def summary_variants(tune_rows: list[dict], bench_rows: list[dict]) -> str:
    """Every timed backward variant against the peers benched in the same process."""
    peers = {
        (r["label"], r["impl"]): r["bwd_tflops"]
        for r in bench_rows
        if "error" not in r and r["impl"] != "triton"
    }
    lines = [f"{'problem':30s} {'bwd':>5s} {'xFlex':>6s} {'xFA2':>6s} {'err':>8s}  variant"]
    for r in sorted(
        (r for r in tune_rows if "bwd_tflops" in r),
        key=lambda r: (r["problem"], -r["bwd_tflops"]),
    ):
        cfg = {k: v for k, v in r["config"].items() if v is not False}
        ratios = []
        for peer in ("flex", "sdpa_flash"):
            ref = peers.get((r["problem"], peer))
            ratios.append(f"{r['bwd_tflops'] / ref:6.3f}" if ref else f"{'-':>6s}")
        flag = "  WRONG" if r.get("wrong") else ""
        lines.append(
            f"{r['problem']:30s} {r['bwd_tflops']:5.0f} {' '.join(ratios)} "
            f"{r['err_vs_table']:8.1e}  {cfg}{flag}"
        )
    return "\n".join(lines)


# -- compute-sanitizer workload ------------------------------------------------------------
SANITIZE = [
    Problem(B=1, N=300, H=2, D=64, causal=False),
    Problem(B=1, N=300, H=4, Hk=2, D=128, causal=True),
    Problem(B=2, N=200, Nk=333, H=2, D=128, causal=True, window=(50, None), softcap=20.0),
    Problem(B=1, N=257, H=2, D=96, causal=False, window=(30, 7)),
    Problem(B=1, N=192, H=2, D=256, causal=True),
]


def cmd_sanitize(args) -> None:
    import longflash
    import torch

    for p in SANITIZE:
        q, k, v, do = make_inputs(p, "cuda", grad=True)
        out = longflash.attention(
            q, k, v, causal=p.causal, window=p.window, softcap=p.softcap, backend="triton"
        )
        torch.autograd.grad(out, (q, k, v), do)
    lens = [0, 100, 1, 250]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(int(cu[-1]), 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = longflash.attention_varlen(q, k, k, cu, cu, causal=True, backend="triton")
    torch.autograd.grad(out, (q, k), torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitize workload done", flush=True)


# -- everything in one GPU call ------------------------------------------------------
def cmd_all(args) -> None:
    import torch

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {"env": environment()}
    res["ceilings"] = _guard(ceilings)
    print("ceilings", res["ceilings"], flush=True)
    t0 = time.time()
    flex_thread = None
    if "bench" in args.steps and args.flex_workers > 1:
        # inductor compiles FlexAttention in its own worker processes while the Triton
        # variants compile in theirs: the machine has the cores, the lease has no time
        import threading

        flex_thread = threading.Thread(target=warm_flex, args=(args,))
        flex_thread.start()
    if "check" in args.steps and "tune" not in args.steps:
        res["check"] = cmd_check(args)
        print(f"[check {time.time() - t0:.0f} s]", flush=True)
        (out_dir / f"{args.tag}.json").write_text(json.dumps(res, indent=1, default=str))
    if "tune" in args.steps:
        res["tune"] = _guard(cmd_tune, args)
        print(f"[tune {time.time() - t0:.0f} s]", flush=True)
        (out_dir / f"{args.tag}.json").write_text(json.dumps(res, indent=1, default=str))
        if args.apply_tuned and isinstance(res["tune"], dict) and res["tune"].get("best"):
            from longflash_triton import configs

            table = configs._tables()["sm90"]
            table.update(res["tune"]["best"])
            configs.pick.cache_clear()
            if args.write_configs:  # so that a test run after this one uses the same tiles
                path = ROOT / "packages/longflash-triton/src/longflash_triton/configs.json"
                full = json.loads(path.read_text())
                full["sm90"].update(res["tune"]["best"])
                text = json.dumps(full, indent=1) + "\n"
                path.write_text(text)
                (out_dir / f"{args.tag}_configs.json").write_text(text)

    if "check" in args.steps and "tune" in args.steps:  # check the tiles the tuning chose
        res["check"] = cmd_check(args)
        print(f"[check {time.time() - t0:.0f} s]", flush=True)

    def save_bench(rows):
        res["bench"] = rows
        (out_dir / f"{args.tag}.json").write_text(json.dumps(res, indent=1, default=str))

    if "bench" in args.steps:
        if flex_thread is not None:
            flex_thread.join()
        res["bench"] = cmd_bench(args, save_bench, warmed=flex_thread is not None)
        print(f"[bench {time.time() - t0:.0f} s]", flush=True)
    torch.cuda.synchronize()
    (out_dir / f"{args.tag}.json").write_text(json.dumps(res, indent=1, default=str))
    if res.get("bench"):
        print("\n" + summary(res["bench"]))
        if isinstance(res.get("tune"), dict) and res["tune"].get("rows"):
            print("\n" + summary_variants(res["tune"]["rows"], res["bench"]))
            print("table written:", res["tune"].get("best"))
    if res.get("check"):
        bad = [r for r in res["check"] if not r.get("ok")]
        print(f"\ncheck: {len(res['check']) - len(bad)}/{len(res['check'])} OK")
    if res.get("ceilings"):
        print("ceilings:", res["ceilings"])


# -- plot -----------------------------------------------------------------------------
def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(args.json).read_text())
    rows = [r for r in res["bench"] if "error" not in r and r["impl"] not in args.skip]
    dims = sorted({r["problem"]["D"] for r in rows})
    fig, axes = plt.subplots(len(dims), 4, figsize=(18, 4 * len(dims)), squeeze=False)
    colors = {"triton": "C3", "sdpa_flash": "C0", "sdpa_cudnn": "C2", "flex": "C1"}
    for i, d in enumerate(dims):
        for j, (kind, causal) in enumerate(
            [("fwd", False), ("fwd", True), ("bwd", False), ("bwd", True)]
        ):
            ax = axes[i][j]
            for impl, color in colors.items():
                pts = sorted(
                    (r["problem"]["N"], r[f"{kind}_tflops"])
                    for r in rows
                    if r["impl"] == impl
                    and r["problem"]["D"] == d
                    and r["problem"]["causal"] == causal
                )
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=color, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"hd{d} {kind} {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length (batch·N = 16K)")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="upper right")
    env = res.get("env", {})
    fig.suptitle(
        f"LongFlash triton vs peers, bf16, {env.get('gpu', '?')}, torch "
        f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, {env.get('date', '')}"
    )
    fig.tight_layout()
    fig.savefig(args.png, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--arch", type=int, default=90)
    c.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    c.add_argument("--kernels", nargs="+", default=["fwd", "dkdv", "dq"])
    c.add_argument("--all", action="store_true", help="every tuning candidate, not the table")
    c.add_argument("--space", choices=list(SPACES), default="v1", help="candidate set")
    c.add_argument("--masks", nargs="+", default=["full", "causal"])
    c.add_argument("--dump", default=None, help="write each variant's TTGIR and PTX here")
    for name in ("check", "tune", "bench", "all"):
        c = sub.add_parser(name)
        c.add_argument("--long", action="store_true", help="also N = 128K")
        c.add_argument(
            "--checks",
            nargs="+",
            default=None,
            help="indices into CHECKS (then LONG), and/or 'varlen'",
        )
        c.add_argument(
            "--flex-dims",
            type=int,
            nargs="+",
            default=None,
            help="head dims to run FlexAttention at (default: all)",
        )
        c.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
        c.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
        c.add_argument("--space", choices=list(SPACES), default="v1", help="tune candidates")
        c.add_argument("--tune-kernels", nargs="+", default=["fwd", "dkdv", "dq"])
        c.add_argument(
            "--peers",
            nargs="*",
            default=["sdpa_flash", "sdpa_cudnn", "flex"],
            help="implementations benched next to ours",
        )
        c.add_argument("--bwd-only", action="store_true", help="bench: time the backward only")
        c.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
        c.add_argument("--flex-workers", type=int, default=4)
        c.add_argument("--flex-min-n", type=int, default=4096)
        c.add_argument("--out-dir", default=os.environ.get("OUT", "."))
        c.add_argument("--tag", default="triton_run")
        c.add_argument("--steps", nargs="+", default=["check", "tune", "bench"])
        c.add_argument(
            "--apply-tuned",
            action="store_true",
            help="bench with the configs this run's tuning picked",
        )
        c.add_argument(
            "--write-configs",
            action="store_true",
            help="with --apply-tuned: also write them into this tree's configs.json",
        )
    c = sub.add_parser("sanitize")
    c = sub.add_parser("plot")
    c.add_argument("json")
    c.add_argument("png")
    c.add_argument("--skip", nargs="*", default=[], help="implementations to leave out")
    args = ap.parse_args()
    cmds = {
        "compile": cmd_compile,
        "check": cmd_check,
        "tune": cmd_tune,
        "bench": cmd_bench,
        "all": cmd_all,
        "sanitize": cmd_sanitize,
        "plot": cmd_plot,
    }
    result = cmds[args.cmd](args)
    if args.cmd in ("check", "tune", "bench") and result is not None:
        path = Path(args.out_dir) / f"{args.tag}_{args.cmd}.json"
        path.write_text(json.dumps({"env": environment(), args.cmd: result}, indent=1, default=str))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "packages/longflash-triton/src"))
    main()
