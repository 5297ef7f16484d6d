"""GPU check of the cuda backend: correctness against a float64 reference at small shapes,
then timings at hd128 16K against SDPA flash and cuDNN in the same process.

Run on an sm_90 machine with the library built (LONGFLASH_CUDA_LIB=build-cuda/liblongflash_cuda.so):
    PYTHONPATH=packages/longflash/src:packages/longflash-cuda/src python benchmarks/cuda_check.py \
        --phase {fwd,bwd,bench,all} --out results.json [--quick] [--only NAME] \
        [--bwd-variants v2,v5]   (hd256: --only hd256 --bwd-variants v2,v6; per-tile dQ: v5,v7)
        [--fwd-variants default,v3]   (hd64 forward v3: --phase fwd --only hd64)
Writes one JSON with every case's errors and every timing; prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from longflash.frontends import torch as lft
from longflash_cuda import _lib, _torch, backend

DEVICE = "cuda"
TOL_FWD = {"bfloat16": 2e-2, "float16": 5e-3}
TOL_BWD = {"bfloat16": 3e-2, "float16": 1e-2}
# LONGFLASH_CUDA_FWD variants and the head dims (Dqk = Dv) they exist at (cuda/src/sm90/fwd.cuh).
FWD_VARIANT_DIMS = {
    "v3": (64,),
    "v3-no-pingpong": (64,),
    "v3-emu": (64,),
    "v3-ownkeys": (64,),
    # the 128-query CTA, which the hd64 default replaces from 4K queries (api.cpp fwd_kernel)
    "v2": (64,),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def where_bad(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Where a differs from b: the index of the largest difference and the fraction of
    elements off by more than 5% of b's largest magnitude (localises a wrong tile)."""
    d = (a.double() - b.double()).abs().nan_to_num(float("inf"))
    idx = [int(i) for i in torch.unravel_index(d.argmax(), d.shape)]
    scale = b.double().abs().max().item() or 1.0
    return {"argmax": idx, "frac_bad": (d > 0.05 * scale).double().mean().item()}


def reference(q, k, v, scale, window, softcap, dout):
    """float64 attention with autograd; dense (B, N, H, D)."""
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    ke, ve = kd.repeat_interleave(g, dim=2), vd.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, ke) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    nq, nk = q.shape[1], k.shape[1]
    i = torch.arange(nq, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    off = nk - nq
    vis = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if window is not None:
        left, right = window
        if right is not None:
            vis &= j - i <= off + right
        if left is not None:
            vis &= j - i >= off - left
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, ve)
    out.backward(dout.double())
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def poison_cache(nbytes: int = 1 << 28) -> None:
    # Freed blocks return to torch's cache; the next torch.empty of a similar size reuses one,
    # so an output element the kernel never writes reads back as NaN.
    x = torch.full((nbytes // 4,), float("nan"), device=DEVICE)
    del x


def run_case(
    name,
    *,
    B=1,
    Nq=256,
    Nk=256,
    Hq=4,
    Hk=4,
    D=128,
    Dv=None,
    dtype=torch.bfloat16,
    causal=False,
    window=None,
    softcap=None,
    varlen=None,
    deterministic=False,
    check_bwd=True,
):
    Dv = Dv or D
    torch.manual_seed(0)
    dev = DEVICE
    rec = {
        "name": name,
        "B": B,
        "Nq": Nq,
        "Nk": Nk,
        "Hq": Hq,
        "Hk": Hk,
        "D": D,
        "Dv": Dv,
        "dtype": str(dtype).removeprefix("torch."),
        "causal": causal,
        "window": window,
        "softcap": softcap,
        "varlen": varlen,
        "deterministic": deterministic,
    }
    try:
        if varlen is None:
            q = torch.randn(B, Nq, Hq, D, device=dev, dtype=dtype)
            k = torch.randn(B, Nk, Hk, D, device=dev, dtype=dtype)
            v = torch.randn(B, Nk, Hk, Dv, device=dev, dtype=dtype)
            call = lft.make_call(q, k, v, causal=causal, window=window, softcap=softcap)
            poison_cache()
            out, lse = _torch.forward(call, q, k, v)
            dout = torch.randn_like(out)
            poison_cache()
            if check_bwd:
                dq, dk, dv = _torch.backward(
                    call, dout, q, k, v, out, lse, deterministic=deterministic
                )
                if deterministic:
                    dq2, dk2, dv2 = _torch.backward(
                        call, dout, q, k, v, out, lse, deterministic=True
                    )
                    rec["bitwise_repeat"] = bool(
                        torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)
                    )
            sync()
            ro, rl, rdq, rdk, rdv = reference(q, k, v, call.scale, call.window, softcap, dout)
            pieces = [(out, ro, lse, rl)]
            grads = [(dq, rdq), (dk, rdk), (dv, rdv)] if check_bwd else []
        else:
            lq, lk = varlen
            cu_q = torch.tensor(
                [0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=dev
            )
            cu_k = torch.tensor(
                [0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=dev
            )
            q = torch.randn(sum(lq), Hq, D, device=dev, dtype=dtype)
            k = torch.randn(sum(lk), Hk, D, device=dev, dtype=dtype)
            v = torch.randn(sum(lk), Hk, Dv, device=dev, dtype=dtype)
            call = lft.make_call(
                q,
                k,
                v,
                cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k,
                max_seqlen_q=max(lq),
                max_seqlen_k=max(lk),
                causal=causal,
                window=window,
                softcap=softcap,
            )
            poison_cache()
            out, lse = _torch.forward(call, q, k, v)
            dout = torch.randn_like(out)
            poison_cache()
            dq, dk, dv = _torch.backward(call, dout, q, k, v, out, lse)
            sync()
            pieces, grads = [], []
            rdq, rdk, rdv = torch.zeros_like(q, dtype=torch.float64), None, None
            rdk = torch.zeros_like(k, dtype=torch.float64)
            rdv = torch.zeros_like(v, dtype=torch.float64)
            ro_all = torch.zeros_like(out, dtype=torch.float64)
            rl_all = torch.zeros_like(lse, dtype=torch.float64)
            for b in range(len(lq)):
                qs, qe = int(cu_q[b]), int(cu_q[b + 1])
                ks, ke = int(cu_k[b]), int(cu_k[b + 1])
                if qe == qs:
                    continue
                if ke == ks:
                    ro_all[qs:qe] = 0
                    rl_all[:, qs:qe] = -math.inf
                    continue
                ro, rl, a, bk, c = reference(
                    q[None, qs:qe],
                    k[None, ks:ke],
                    v[None, ks:ke],
                    call.scale,
                    call.window,
                    softcap,
                    dout[None, qs:qe],
                )
                ro_all[qs:qe] = ro[0]
                rl_all[:, qs:qe] = rl[0]
                rdq[qs:qe], rdk[ks:ke], rdv[ks:ke] = a[0], bk[0], c[0]
            pieces = [(out, ro_all, lse, rl_all)]
            grads = [(dq, rdq), (dk, rdk), (dv, rdv)]
        o, ro, lse_, rl = pieces[0]
        rec["nan_out"] = bool(torch.isnan(o).any())
        rec["err_out"] = rel(o, ro)
        if rec["err_out"] > TOL_FWD[rec["dtype"]]:
            rec["where_out"] = where_bad(o, ro)
        finite = torch.isfinite(rl)
        rec["lse_inf_match"] = bool(torch.equal(torch.isneginf(lse_), torch.isneginf(rl)))
        rec["err_lse_max"] = (
            (lse_.double()[finite] - rl[finite]).abs().max().item() if finite.any() else 0.0
        )
        ok = (
            (not rec["nan_out"])
            and rec["err_out"] < TOL_FWD[rec["dtype"]]
            and rec["lse_inf_match"]
            and rec["err_lse_max"] < 1e-2
        )
        for gname, (g, rg) in zip(("dq", "dk", "dv"), grads):
            rec[f"nan_{gname}"] = bool(torch.isnan(g).any())
            rec[f"err_{gname}"] = rel(g, rg)
            if rec[f"err_{gname}"] > TOL_BWD[rec["dtype"]]:
                rec[f"where_{gname}"] = where_bad(g, rg)
            ok = ok and not rec[f"nan_{gname}"] and rec[f"err_{gname}"] < TOL_BWD[rec["dtype"]]
        if deterministic:
            ok = ok and rec.get("bitwise_repeat", False)
        rec["ok"] = bool(ok)
    except Exception as exc:  # record and go on: one run must report every case
        rec["ok"] = False
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["trace"] = traceback.format_exc()[-2000:]
    return rec


def cases(quick: bool, compiled):
    out = []
    bf, fp = torch.bfloat16, torch.float16
    # The v5 feature list (dense, causal both ways with empty rows, GQA/MQA, windows, softcap,
    # varlen with empty and length-1 sequences, deterministic, both dtypes) at each head dim v5
    # covers, plus the edges of its 128-key blocks (hd64 also 128-query steps): a block whose
    # second 64-key half is past the sequence, narrow bands where one half of a block sees
    # nothing, query counts one past a step, long GQA loops with the rotation.
    # hd256 is v6's (LONGFLASH_CUDA_BWD=v6: 64-key blocks, dK/dV/dQ split by head-dim halves,
    # P and dS through smem): the same list, plus its own edges below.
    dims = [128] + [d for d in (64, 256) if (d, d) in compiled["bfloat16"]]
    for d in dims:
        hd = f"hd{d}"
        base = [
            dict(name=f"{hd} dense", B=2, Nq=300, Nk=300),
            dict(name=f"{hd} causal", B=2, Nq=300, Nk=300, causal=True),
            dict(name=f"{hd} causal Nq<Nk", Nq=200, Nk=555, causal=True),
            dict(name=f"{hd} causal Nq>Nk (empty rows)", Nq=555, Nk=200, causal=True),
            dict(name=f"{hd} gqa fp16 causal", Hq=8, Hk=2, Nq=384, Nk=384, causal=True, dtype=fp),
            dict(name=f"{hd} mqa", Hq=4, Hk=1, Nq=129, Nk=257),
            dict(name=f"{hd} window(64,32)", Nq=500, Nk=500, window=(64, 32)),
            dict(name=f"{hd} window(100,None)", Nq=300, Nk=700, window=(100, None)),
            dict(name=f"{hd} softcap 30 causal", Nq=256, Nk=256, softcap=30.0, causal=True),
            dict(
                name=f"{hd} varlen causal",
                varlen=([100, 0, 257, 1, 64], [130, 50, 257, 1, 0]),
                causal=True,
            ),
            dict(name=f"{hd} varlen dense", varlen=([100, 3, 257], [130, 50, 200])),
            dict(
                name=f"{hd} deterministic causal",
                B=2,
                Nq=333,
                Nk=333,
                causal=True,
                deterministic=True,
            ),
            dict(name=f"{hd} fp16 dense", Nq=1000, Nk=1000, dtype=fp),
            dict(name=f"{hd} causal Nk=40", Nq=40, Nk=40, causal=True),
            dict(name=f"{hd} window(10,10)", Nq=1000, Nk=1000, window=(10, 10)),
            dict(name=f"{hd} gqa4 causal 2k", Hq=8, Hk=2, Nq=2048, Nk=2048, causal=True),
            dict(name=f"{hd} softcap gqa fp16", Hq=4, Hk=2, Nq=320, Nk=700, softcap=20.0, dtype=fp),
        ]
        if d in (64, 128):
            # v7 (LONGFLASH_CUDA_BWD=v7) keeps dQ in per-(query tile, head) blocks, each varlen
            # sequence's first tile at floor(start / tile) + index: starts and ends one short of,
            # at and one past a tile (64 rows at hd128, 128 at hd64), empty and one-token
            # sequences, GQA, so a dq row reduced or read back from a neighbour's tile fails.
            base += [
                dict(
                    name=f"{hd} varlen tile edges causal gqa",
                    varlen=([63, 65, 0, 1, 128, 129, 200], [70, 65, 9, 1, 128, 300, 200]),
                    Hq=4,
                    Hk=2,
                    causal=True,
                ),
            ]
        if d in (64, 256):
            base += [
                dict(
                    name=f"{hd} softcap window varlen",
                    varlen=([129, 7, 300], [260, 7, 128]),
                    window=(90, 20),
                    softcap=15.0,
                ),
                dict(name=f"{hd} mqa causal Nq=129", Hq=8, Hk=1, Nq=129, Nk=1000, causal=True),
                dict(name=f"{hd} fp16 window(0,0)", Nq=257, Nk=257, window=(0, 0), dtype=fp),
            ]
        if d == 256:
            # v6 edges: the last 64-key block mostly past the keys (Nk = 65), a softcap tile that
            # crosses the causal diagonal with Nq > Nk, fp16 varlen with a one-key sequence.
            base += [
                dict(name="hd256 causal Nk=65", Nq=65, Nk=65, causal=True),
                dict(name="hd256 softcap causal Nq>Nk", Nq=300, Nk=190, softcap=25.0, causal=True),
                dict(
                    name="hd256 fp16 varlen window",
                    varlen=([64, 1, 200], [1, 65, 330]),
                    window=(40, 8),
                    dtype=fp,
                ),
            ]
        if d == 64:
            # Forward v3 edges (LONGFLASH_CUDA_FWD=v3: 192-query blocks of three 64-row
            # warpgroups, 4-stage K/V ring): query counts one short of, at and one past a block;
            # causal Nq > Nk where whole warpgroups see no key; bands where only one warpgroup's
            # rows meet a tile; varlen sequences at the block edges; a ring that wraps many times.
            base += [
                dict(name="hd64 v3-edge causal Nq=193 Nk=450", Nq=193, Nk=450, causal=True),
                dict(name="hd64 v3-edge gqa causal 192", Hq=4, Hk=2, Nq=192, Nk=192, causal=True),
                dict(
                    name="hd64 v3-edge fp16 Nq>Nk",
                    Hq=8,
                    Hk=2,
                    Nq=385,
                    Nk=100,
                    causal=True,
                    dtype=fp,
                ),
                dict(
                    name="hd64 v3-edge mqa fp16 w(0,0)",
                    Hq=2,
                    Hk=1,
                    Nq=576,
                    Nk=576,
                    window=(0, 0),
                    dtype=fp,
                ),
                dict(name="hd64 v3-edge window(5,60) Nq=191", Nq=191, Nk=900, window=(5, 60)),
                dict(
                    name="hd64 v3-edge varlen causal",
                    Hk=2,
                    varlen=([192, 0, 193, 1, 383], [192, 50, 1, 1, 384]),
                    causal=True,
                ),
                dict(name="hd64 v3-edge 4k causal gqa", Hq=4, Hk=1, Nq=4096, Nk=4096, causal=True),
                # From 4K queries the default itself is the 192-query CTA (api.cpp fwd_kernel):
                # query counts not a multiple of 192, causal with Nq > Nk and Nq < Nk, fp16 softcap.
                dict(name="hd64 wide dense Nq=4097 Nk=4100", Hq=2, Hk=2, Nq=4097, Nk=4100),
                dict(name="hd64 wide causal Nq>Nk", Hq=4, Hk=2, Nq=4300, Nk=4000, causal=True),
                dict(name="hd64 wide causal Nq<Nk", Hq=2, Hk=1, Nq=4096, Nk=9000, causal=True),
                dict(
                    name="hd64 wide fp16 softcap",
                    Hq=2,
                    Hk=2,
                    Nq=8191,
                    Nk=8191,
                    softcap=30.0,
                    dtype=fp,
                ),
            ]
        out += [dict(c, D=d) for c in base]
    for d, dv in ((64, 64), (96, 96), (192, 192), (192, 128), (256, 256)):
        for dt in (bf, fp):
            key = "bfloat16" if dt is bf else "float16"
            if (d, dv) in compiled[key]:
                out.append(
                    dict(
                        name=f"hd{d}x{dv} {key} causal",
                        Nq=333,
                        Nk=333,
                        D=d,
                        Dv=dv,
                        causal=True,
                        dtype=dt,
                    )
                )
                if not quick:
                    out.append(
                        dict(
                            name=f"hd{d}x{dv} {key} gqa window",
                            Hq=4,
                            Hk=2,
                            Nq=300,
                            Nk=420,
                            D=d,
                            Dv=dv,
                            window=(50, 70),
                            dtype=dt,
                        )
                    )
                if not quick and d == 192:
                    # hd192's lazy rescaling (fwd.cuh kLazy) over many 96-key blocks: a dense
                    # call (stream-K's shape) and a long causal one with Nq < Nk; the same at
                    # Dv 128 (eager, or lazy under an A/B build)
                    tag = "hd192" if dv == 192 else "hd192x128"
                    for name, shape in (
                        ("dense 2000", dict(Nq=2000, Nk=2000)),
                        ("causal Nq=1000 Nk=3000", dict(Nq=1000, Nk=3000, causal=True)),
                    ):
                        out.append(
                            dict(name=f"{tag} {key} {name}", D=192, Dv=dv, dtype=dt, **shape)
                        )
    return out


def bench(fn, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    return times[len(times) // 2]


def interleaved(cases: dict, rounds: int = 3, timer=None) -> dict[str, float]:
    """Median ms of each case over `rounds` passes that each time every case once (bench), in
    turn, so the clock and temperature drift of a long run falls on all cases alike instead of on
    whichever runs last. Pass r starts at case r (mod the count), so every case takes every
    position equally often over a multiple of the count: on the H200 the first case of a
    fixed order measured up to 10% faster than the same kernel under another name (session 9).
    cases: name -> (setup, fn); setup() runs before each timing of fn. timer(fn) -> ms: a burst of
    ten runs (bench) unless given."""
    timer = timer or bench
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        s = r % len(names)
        for name in names[s:] + names[:s]:
            setup, fn = cases[name]
            setup()
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def env_setter(name: str, value: str):
    """setup() for interleaved: the variable as `value` ("default": unset), which the library
    reads on every call."""

    def setup() -> None:
        if value == "default":
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    return setup


def timings(seqlen=16384, heads=16, d=128):
    from functools import partial

    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = []
    dev = "cuda"
    q = torch.randn(1, seqlen, heads, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn_like(q)
    v = torch.randn_like(q)
    qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    sdpa = F.scaled_dot_product_attention
    for causal in (False, True):
        flops = 4 * seqlen * seqlen * heads * d * (0.5 if causal else 1.0)
        call = lft.make_call(q, k, v, causal=causal)
        out, lse = _torch.forward(call, q, k, v)
        dout = torch.randn_like(out)
        row = {"causal": causal, "N": seqlen, "H": heads, "D": d}
        t = bench(partial(_torch.forward, call, q, k, v))
        row["cuda_fwd_ms"] = t
        row["cuda_fwd_tflops"] = flops / t / 1e9
        t = bench(partial(_torch.backward, call, dout, q, k, v, out, lse))
        row["cuda_bwd_ms"] = t
        row["cuda_bwd_tflops"] = 2.5 * flops / t / 1e9
        for name, be in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            try:
                with sdpa_kernel(be):
                    t = bench(partial(sdpa, qt, kt, vt, is_causal=causal))
                    row[f"{name}_fwd_tflops"] = flops / t / 1e9
                    o = sdpa(qt, kt, vt, is_causal=causal)
                    g = torch.randn_like(o)
                    t = bench(partial(torch.autograd.grad, o, (qt, kt, vt), g, retain_graph=True))
                    row[f"{name}_bwd_tflops"] = 2.5 * flops / t / 1e9
                    if name == "flash":
                        row["err_vs_sdpa_flash"] = rel(out, o.detach().transpose(1, 2))
            except Exception as exc:
                row[f"{name}_error"] = repr(exc)
        res.append(row)
    return res


def frameworks() -> dict:
    """Front-end paths: torch autograd, torch.compile(fullgraph=True), CUDA graph replay, and
    jax jit/grad/vmap through the XLA FFI handlers, each against the direct binding call."""
    import longflash
    from longflash.registry import REGISTRY

    REGISTRY.register(backend, replace=True)
    res = {}
    torch.manual_seed(1)
    q = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 300, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    call = lft.make_call(q, k, v, causal=True)
    out_d, lse_d = _torch.forward(call, q.detach(), k.detach(), v.detach())
    dout = torch.randn_like(out_d)
    grads_d = _torch.backward(call, dout, q.detach(), k.detach(), v.detach(), out_d, lse_d)

    def step(fn):
        o = fn(q, k, v)
        g = torch.autograd.grad(o, (q, k, v), dout)
        return o, g

    def eager(a, b, c):
        return longflash.attention(a, b, c, causal=True, backend="cuda")

    for name, fn in (("torch_eager", eager), ("torch_compile", None)):
        try:
            if fn is None:
                fn = torch.compile(eager, fullgraph=True)
            o, g = step(fn)
            res[name] = max([rel(o, out_d)] + [rel(a, b) for a, b in zip(g, grads_d)])
        except Exception:
            res[name] = traceback.format_exc()[-1500:]
    try:
        qs, ks, vs = (x.detach().clone() for x in (q, k, v))
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                _torch.forward(call, qs, ks, vs)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            go, gl = _torch.forward(call, qs, ks, vs)
            gg = _torch.backward(call, dout, qs, ks, vs, go, gl)
        qs.copy_(q.detach())
        graph.replay()
        torch.cuda.synchronize()
        res["torch_cuda_graph"] = max([rel(go, out_d)] + [rel(a, b) for a, b in zip(gg, grads_d)])
    except Exception:
        res["torch_cuda_graph"] = traceback.format_exc()[-1500:]
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np

        def to_j(x):
            return jnp.asarray(x.detach().float().cpu().numpy()).astype(jnp.bfloat16)

        qj, kj, vj, dj = (to_j(x) for x in (q, k, v, dout))

        def loss(a, b, c):
            o = longflash.attention(a, b, c, causal=True, backend="cuda")
            return jnp.sum(o.astype(jnp.float32) * dj.astype(jnp.float32)), o

        (_, oj), gj = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(qj, kj, vj)

        def back(x):
            return torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda()

        res["jax_jit_grad"] = max(
            [rel(back(oj), out_d)] + [rel(back(a), b) for a, b in zip(gj, grads_d)]
        )
        vm = jax.jit(
            jax.vmap(lambda a, b, c: longflash.attention(a, b, c, causal=True, backend="cuda"))
        )(qj[:, None], kj[:, None], vj[:, None])
        res["jax_vmap"] = rel(back(vm[:, 0]), out_d)
    except Exception:
        res["jax"] = traceback.format_exc()[-1500:]
    return res


class Watchdog:
    """Ends the process (after saving the report) when one case runs too long: a hung kernel
    must not take the rest of a timed GPU session with it."""

    def __init__(self, seconds: float, save):
        import threading

        self.seconds, self.save, self.name = seconds, save, None
        self.deadline = None
        threading.Thread(target=self._watch, daemon=True).start()

    def arm(self, name: str) -> None:
        self.name, self.deadline = name, time.monotonic() + self.seconds

    def disarm(self) -> None:
        self.deadline = None

    def _watch(self) -> None:
        import os

        while True:
            time.sleep(0.5)
            if self.deadline is not None and time.monotonic() > self.deadline:
                print(f"HANG in {self.name}: over {self.seconds}s", flush=True)
                self.save(hang=self.name)
                os._exit(3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="cuda_check.json")
    ap.add_argument("--phase", choices=("fwd", "bwd", "all", "bench", "frameworks"), default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="substring of case names to run")
    ap.add_argument("--case-timeout", type=float, default=20.0)
    ap.add_argument(
        "--bwd-variants",
        default=None,
        help="comma list of LONGFLASH_CUDA_BWD values (v2,v3,v5,v6,v7): every case runs once per "
        "variant, its name suffixed [variant]; unset: whatever the environment selects",
    )
    ap.add_argument(
        "--fwd-variants",
        default=None,
        help="comma list of LONGFLASH_CUDA_FWD values (default,v2,v3,v3-no-pingpong,v3-emu, "
        "each with an optional +grid/+persistent/+dynamic[+g<n>] suffix, or a suffix alone), "
        "run after any --bwd-variants, names suffixed [fwd=variant]; each variant runs "
        "the cases of the head dims its kernel exists at (FWD_VARIANT_DIMS; every dim for a "
        "suffix alone)",
    )
    args = ap.parse_args()
    lib, why = _lib.load()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "available": backend.available(),
        "build": lib.lf_build_config().decode() if lib else why,
        "phase": args.phase,
        "bwd_variants": args.bwd_variants,
        "fwd_variants": args.fwd_variants,
        "cases": [],
    }

    def save(**extra) -> None:
        report.update(extra)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    dog = Watchdog(args.case_timeout, save)
    results = report["cases"]
    if args.phase == "frameworks":
        dog.arm("frameworks")
        report["frameworks"] = frameworks()
        dog.disarm()
        print(json.dumps(report["frameworks"], indent=1))
    elif args.phase != "bench":
        compiled = _lib.compiled_head_dims(lib)
        variants = args.bwd_variants.split(",") if args.bwd_variants else [None]
        if args.fwd_variants:
            fwd = [f"fwd={v}" for v in args.fwd_variants.split(",")]
            variants = fwd if variants == [None] else variants + fwd
        faulted = False
        for var in variants:
            if faulted:
                break
            if var is not None:
                # Read by the library on every call, so one process checks every variant; a
                # forward variant runs with the default backward and vice versa.
                os.environ.pop("LONGFLASH_CUDA_FWD", None)
                if var.startswith("fwd="):
                    os.environ.pop("LONGFLASH_CUDA_BWD", None)
                    if var != "fwd=default":
                        os.environ["LONGFLASH_CUDA_FWD"] = var[4:]
                else:
                    os.environ["LONGFLASH_CUDA_BWD"] = var
            fwd_variant = var is not None and var.startswith("fwd=") and var != "fwd=default"
            # Head dims a forward variant exists at; elsewhere the library runs the default.
            # A variant's kernel is the part before any "+<grid>" suffix; none (or "default")
            # runs at every head dim.
            kernel = var[4:].split("+")[0] if fwd_variant else ""
            dims = FWD_VARIANT_DIMS.get(kernel, ()) if kernel not in ("", "default") else None
            ran = len(results)
            for c in cases(args.quick, compiled):
                if args.only and args.only not in c["name"]:
                    continue
                d = c.get("D", 128)  # run_case's default
                if dims is not None and (d not in dims or c.get("Dv") not in (None, d)):
                    continue
                if args.phase == "fwd":
                    c = dict(c, check_bwd=False)
                    # These run forward and backward together in the bwd phase; a forward
                    # variant keeps varlen here (checked with the default backward on its output).
                    if (c.get("varlen") and not fwd_variant) or c.get("deterministic"):
                        continue
                if var is not None:
                    c = dict(c, name=f"{c['name']} [{var}]")
                dog.arm(c["name"])
                r = run_case(**c)
                dog.disarm()
                results.append(r)
                save()
                errs = {
                    k: (round(v, 5) if isinstance(v, float) else v)
                    for k, v in r.items()
                    if k.startswith(("err", "where")) or k in ("error", "bitwise_repeat")
                }
                print(("PASS " if r["ok"] else "FAIL ") + r["name"], errs, flush=True)
                if "error" in r and ("CUDA" in r["error"] or "illegal" in r["error"]):
                    faulted = True  # a fault poisons the context: stop and report
                    break
            if len(results) == ran and not args.only:  # a variant that checked nothing fails
                results.append({"name": f"no case ran [{var}]", "ok": False})
                print(f"FAIL no case ran [{var}]", flush=True)
    if args.phase in ("bench", "all"):
        dog.arm("timings")
        try:
            report["timings"] = timings()
        except Exception as exc:
            report["timings_error"] = traceback.format_exc()[-2000:]
            print("timings failed:", exc)
        dog.disarm()
    save()
    npass = sum(r["ok"] for r in results)
    print(f"\n{npass}/{len(results)} cases pass")
    for row in report.get("timings", []):
        print(
            " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )
    return 0 if npass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
