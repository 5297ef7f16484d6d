"""Measured HBM and L2 traffic of exact attention against the IO model of docs/io.md.

One command on a GPU machine: it launches one Python worker under Nsight Compute, which runs
LongFlash's forward and backward (backend ``cuda``, or ``triton``) and plain PyTorch attention
(matmul -> softmax -> matmul, and its autograd backward) for each head dim and sequence length.
Every measured call sits between two marker kernels inside one NVTX range, so ncu profiles only
those calls and the driver can sum DRAM and L2 bytes over the kernels of each call.

    python benchmarks/io.py                       # the full grid: N 1K..32K, d 64/128/256
    python benchmarks/io.py --seqlens 1K,4K --head-dims 128 --backend triton
    python benchmarks/io.py --dry-run             # on a CPU: the plan and the model table only

Writes benchmarks/results/io-<device>-<date>.json and .png (and copies to $OUT when set).
The model (``model_*`` functions below) is importable and has no third-party dependencies.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

MiB = 1 << 20
# H200 SXM: 132 SMs and a 50 MiB L2 (the same chip as the H100 SXM, more HBM).
H200_SMS = 132
H200_L2_BYTES = 50 * MiB

BF16 = 2  # bytes per element of Q, K, V, O and their gradients
F32 = 4  # bytes per lse / delta / fp32 dQ-accumulator element

# Counter names are checked against `ncu --query-metrics` before the run; a missing one is
# dropped and recorded, never silently replaced by another.
METRICS = (
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_bytes.sum",
    "lts__t_sectors_srcunit_tex.sum",
    "lts__t_sectors_op_red.sum",
    "l1tex__m_xbar2l1tex_read_bytes.sum",
    "lrc__t_bytes.sum",
    "gpu__time_duration.sum",
)
NVTX_RANGE = "lfio"
MARKER_PATTERN = re.compile(r"spin_kernel")  # torch.cuda._sleep's kernel


# ---------------------------------------------------------------------------------------------
# Tiles our kernels use (the model's only kernel-specific input)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one backend at one head dim.

    fwd_rows: queries per forward CTA (each CTA streams all of K and V once: N / fwd_rows passes).
    fwd_cols: keys per step of that stream (sets on-chip memory, not HBM traffic).
    kv_keys: keys per dK/dV CTA (each streams all of Q, dO, lse, delta once).
    dq_rows: queries per dQ CTA for a backward with a separate dQ kernel (it streams K and V);
        None when dQ is accumulated in fp32 by the dK/dV kernel (cuda).
    ctas_per_sm: resident CTAs per SM, for the working-set estimate.
    """

    fwd_rows: int
    fwd_cols: int
    kv_keys: int
    kv_rows: int
    dq_rows: int | None = None
    dq_cols: int | None = None
    ctas_per_sm: int = 1


def cuda_tiles(d: int) -> Tiles:
    # cuda/src/sm90/fwd.cuh: kBlockM = 128, kBlockN = 128 / 96 / 64 for d <= 128 / 192 / 256.
    # Backward: the default v7 (bwd_v5.cuh, v5's tiles) at d 64 and 128, 128 keys per CTA and
    # 128 / 64 queries per step; v6 at d 256 (bwd_d256.cuh) and v2 elsewhere, both 64 keys and
    # 64 queries per step (params.h: kBwdBlockN = kBwdBlockM = 64).
    # tests/test_io_model.py checks these against the headers.
    fwd_cols = 128 if d <= 128 else (96 if d <= 192 else 64)
    if d in (64, 128):
        return Tiles(fwd_rows=128, fwd_cols=fwd_cols, kv_keys=128, kv_rows=128 if d == 64 else 64)
    return Tiles(fwd_rows=128, fwd_cols=fwd_cols, kv_keys=64, kv_rows=64)


def _pow2_block(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _triton_lookup(table: dict[str, Any], kernel: str, d: int, mask: str) -> dict[str, Any]:
    db = _pow2_block(d)
    for key in (f"{kernel}/{db}/{mask}", f"{kernel}/{db}/*", f"{kernel}/*/{mask}", f"{kernel}/*/*"):
        if key in table:
            return table[key]
    raise KeyError(f"no triton config for {kernel}/{db}/{mask}")


def triton_tiles(d: int, arch: str = "sm90") -> Tiles:
    """Tiles from the triton backend's configs.json (read as a file: no triton import)."""
    path = REPO / "packages/longflash-triton/src/longflash_triton/configs.json"
    tables = json.loads(path.read_text())

    def get(kernel: str) -> dict[str, Any]:
        for name in (arch, "default"):
            try:
                return _triton_lookup(tables.get(name, {}), kernel, d, "full")
            except KeyError:
                continue
        raise KeyError(kernel)

    fwd, dkdv, dq = get("fwd"), get("dkdv"), get("dq")
    return Tiles(
        fwd_rows=fwd["BM"],
        fwd_cols=fwd["BN"],
        kv_keys=dkdv["BN"],
        kv_rows=dkdv["BM"],
        dq_rows=dq["BM"],
        dq_cols=dq["BN"],
    )


def tiles_for(backend: str, d: int) -> Tiles:
    if backend == "cuda":
        return cuda_tiles(d)
    if backend == "triton":
        return triton_tiles(d)
    raise ValueError(f"no tile model for backend {backend!r} (known: cuda, triton)")


# ---------------------------------------------------------------------------------------------
# The model (docs/io.md derives each term)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    sms: int = H200_SMS
    l2_bytes: int = H200_L2_BYTES


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _stream(
    n_ctas_per_head: int,
    heads: int,
    streamed_per_head: float,
    reuse_per_head: float,
    machine: Machine,
    ctas_per_sm: int,
) -> dict[str, Any]:
    """DRAM side of a kernel whose CTAs each stream one head's operand of `streamed_per_head`
    bytes. CTAs are scheduled in launch order, a head's CTAs next to each other; those resident
    together sweep the operand at about the same pace, so one resident wave reads it from DRAM
    once. Later waves (and the other heads in flight) find it in L2 if the working set fits.

    reuse_per_head: the bytes per head that must stay in L2 between waves (the streamed operand
    plus anything the kernel read-modify-writes, e.g. the fp32 dQ accumulator).
    """
    slots = machine.sms * ctas_per_sm
    heads_in_flight = min(heads, max(1, _cdiv(slots, n_ctas_per_head)))
    waves = max(1, _cdiv(n_ctas_per_head, slots))
    working_set = heads_in_flight * reuse_per_head
    fits = working_set <= machine.l2_bytes
    dram_passes = 1 if fits else waves
    return {
        "ctas_per_head": n_ctas_per_head,
        "heads_in_flight": heads_in_flight,
        "waves_per_head": waves,
        "working_set": working_set,
        "fits_l2": fits,
        "dram_passes": dram_passes,
        "dram_extra": (dram_passes - 1) * streamed_per_head * heads,
    }


def model_fwd(
    N: int, d: int, H: int, tiles: Tiles, machine: Machine = Machine(), e: int = BF16
) -> dict[str, Any]:
    """Bytes moved by one tiled forward (B = 1, H heads, Nq = Nk = N, Dqk = Dv = d, no mask)."""
    nd = N * d * e
    reads = 3 * nd * H  # Q, K, V
    writes = (nd + N * F32) * H  # O, lse
    passes = _cdiv(N, tiles.fwd_rows)
    kv = 2 * nd  # K and V of one head
    l2 = (2 * nd + N * F32) * H + passes * kv * H
    s = _stream(passes, H, kv, kv, machine, tiles.ctas_per_sm)
    return {
        "compulsory": reads + writes,
        "floor": reads + writes,
        "passes": passes,
        "l2_model": l2,
        "dram_read_model": reads + s["dram_extra"],
        "dram_write_model": writes,
        "dram_model": reads + writes + s["dram_extra"],
        **s,
    }


def model_bwd(
    N: int, d: int, H: int, tiles: Tiles, machine: Machine = Machine(), e: int = BF16
) -> dict[str, Any]:
    """Bytes moved by one tiled backward.

    compulsory: what any exact backward must move (Q, K, V, O, dO, lse in; dQ, dK, dV out).
    floor: the sum over the call's kernels of the bytes each kernel must touch once. ncu
    flushes the caches before every kernel, so an operand that two kernels read counts twice,
    and so do the implementation's O(N) intermediates (delta, the base-2 lse, cuda's fp32 dQ
    accumulator). The accumulator's memset is a copy-engine operation that ncu does not count.
    """
    nd, nf = N * d * e, N * F32
    compulsory = (8 * nd + nf) * H
    kv_passes = _cdiv(N, tiles.kv_keys)
    if tiles.dq_rows is None:
        # cuda: preprocess (O, dO, lse -> delta, lse2); main kernel (K, V once; per key block Q,
        # dO, lse2, delta and an fp32 reduction into the accumulator; dK, dV out); postprocess
        # (accumulator -> dQ).
        acc = N * d * F32
        streamed = 2 * nd + 2 * nf
        reads = (2 * nd + nf) + (4 * nd + 2 * nf + acc) + acc
        writes = 2 * nf + (2 * nd + acc) + nd
        pre = 2 * nd + nf + 2 * nf
        post = acc + nd
        l2 = (pre + 4 * nd + kv_passes * (streamed + acc) + post) * H
        # A spilled accumulator line costs a read and a write-back per wave.
        s = _stream(kv_passes, H, streamed + 2 * acc, streamed + acc, machine, tiles.ctas_per_sm)
        extra_r = s["dram_extra"] * (streamed + acc) / (streamed + 2 * acc)
        extra_w = s["dram_extra"] - extra_r
        extra: dict[str, Any] = {"dq_passes": None}
    else:
        # triton: prep (O, dO -> delta); dK/dV kernel (K, V resident, streams Q, dO, lse, delta);
        # dQ kernel (Q, dO, lse, delta resident, streams K and V).
        dq_passes = _cdiv(N, tiles.dq_rows)
        reads = 2 * nd + (4 * nd + 2 * nf) + (4 * nd + 2 * nf)
        writes = nf + 2 * nd + nd
        l2 = (
            (2 * nd + nf)
            + 4 * nd
            + kv_passes * (2 * nd + 2 * nf)
            + (2 * nd + 2 * nf + nd)
            + dq_passes * 2 * nd
        ) * H
        s = _stream(kv_passes, H, 2 * nd + 2 * nf, 2 * nd + 2 * nf, machine, tiles.ctas_per_sm)
        s2 = _stream(dq_passes, H, 2 * nd, 2 * nd, machine, tiles.ctas_per_sm)
        extra_r, extra_w = s["dram_extra"] + s2["dram_extra"], 0.0
        extra = {"dq_passes": dq_passes, "dq_fits_l2": s2["fits_l2"]}
    floor = (reads + writes) * H
    return {
        "compulsory": compulsory,
        "floor": floor,
        "passes": kv_passes,
        "l2_model": l2,
        "dram_read_model": reads * H + extra_r,
        "dram_write_model": writes * H + extra_w,
        "dram_model": floor + extra_r + extra_w,
        **s,
        **extra,
    }


def model_naive(N: int, d: int, H: int, direction: str, e: int = BF16) -> dict[str, Any]:
    """Plain PyTorch attention as io.py runs it: qs = q * scale; S = qs @ k^T; P = softmax(S);
    O = P @ V, and autograd's backward of that. Each N x N matrix is written once and read by
    each consumer once (GEMMs that re-read it hit L2 and are not counted)."""
    nd, nn = N * d * e, N * N * e
    if direction == "fwd":
        # N x N: S written; S read and P written by softmax; P read by P @ V.
        sq_r, sq_w = 2, 2
        # N x d: q read, qs written (scale); qs, k, v read; O written.
        nd_r, nd_w = 4, 2
    else:
        # dP = dO @ V^T (write); dV = P^T @ dO (read P); dS = softmax_bwd(dP, P) (2 reads,
        # 1 write); dqs = dS @ K and dK = dS^T @ qs (2 reads of dS).
        sq_r, sq_w = 5, 2
        # dO twice, V, K, qs, dqs read; dV, dK, dqs, dq written.
        nd_r, nd_w = 6, 4
    reads = (sq_r * nn + nd_r * nd) * H
    writes = (sq_w * nn + nd_w * nd) * H
    return {
        "square_passes": sq_r + sq_w,
        "square_bytes": (sq_r + sq_w) * nn * H,
        "compulsory": (nd_r + nd_w) * nd * H,
        "dram_read_model": reads,
        "dram_write_model": writes,
        "dram_model": reads + writes,
        "l2_model": reads + writes,
        "peak_square_buffers": 2 if direction == "fwd" else 3,
    }


def spill_threshold(
    backend: str, d: int, H: int, direction: str, machine: Machine = Machine(), limit: int = 1 << 22
) -> int | None:
    """Smallest N (a multiple of 1K) at which the model says that tiled re-reads reach DRAM."""
    tiles = tiles_for(backend, d)
    fn = model_fwd if direction == "fwd" else model_bwd
    N = 1024
    while N <= limit:
        if fn(N, d, H, tiles, machine)["dram_model"] > fn(N, d, H, tiles, machine)["floor"]:
            return N
        N += 1024
    return None


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        mult = 1
        if item[-1] in "kK":
            item, mult = item[:-1], 1024
        out.append(int(item) * mult)
    return out


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def build_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    plan = []
    for d in args.head_dims:
        for N in args.seqlens:
            naive_gib = 3 * N * N * BF16 * args.heads / 2**30
            plan.append(
                {
                    "d": d,
                    "N": N,
                    "H": args.heads,
                    "ours": True,
                    "naive": args.naive and naive_gib <= args.naive_max_gib,
                    "naive_peak_gib": naive_gib,
                }
            )
    return plan


def model_rows(backend: str, plan: list[dict[str, Any]], machine: Machine) -> list[dict[str, Any]]:
    rows = []
    for c in plan:
        tiles = tiles_for(backend, c["d"])
        for direction, fn in (("fwd", model_fwd), ("bwd", model_bwd)):
            ours = fn(c["N"], c["d"], c["H"], tiles, machine)
            naive = model_naive(c["N"], c["d"], c["H"], direction)
            rows.append(
                {
                    "d": c["d"],
                    "N": c["N"],
                    "H": c["H"],
                    "direction": direction,
                    "tiles": dataclasses.asdict(tiles),
                    "ours": ours,
                    "naive": naive,
                }
            )
    return rows


def _mb(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x / 1e6:,.1f}"


def print_model_table(backend: str, rows: list[dict[str, Any]]) -> None:
    print(f"\nModel ({backend}; bytes in MB = 1e6; B = 1; bf16; non-causal)")
    head = (
        f"{'d':>4} {'N':>5} {'dir':>3} {'passes':>6} {'compuls.':>9} {'floor':>9} "
        f"{'DRAM model':>10} {'L2 model':>10} {'WS MiB':>7} {'fits':>4} {'naive DRAM':>11}"
    )
    print(head)
    for r in rows:
        o, n = r["ours"], r["naive"]
        print(
            f"{r['d']:>4} {_k(r['N']):>5} {r['direction']:>3} {o['passes']:>6} "
            f"{_mb(o['compulsory']):>9} {_mb(o['floor']):>9} {_mb(o['dram_model']):>10} "
            f"{_mb(o['l2_model']):>10} {o['working_set'] / MiB:>7.1f} "
            f"{'yes' if o['fits_l2'] else 'NO':>4} {_mb(n['dram_model']):>11}"
        )


def thresholds(backend: str, head_dims: list[int], H: int, machine: Machine) -> dict[str, Any]:
    out = {}
    for d in head_dims:
        for direction in ("fwd", "bwd"):
            out[f"d{d}/{direction}"] = spill_threshold(backend, d, H, direction, machine)
    return out


# ---------------------------------------------------------------------------------------------
# Worker: runs under ncu
# ---------------------------------------------------------------------------------------------


def _worker(plan_path: Path, calls_path: Path, backend_name: str) -> int:
    import torch
    from longflash.frontends import torch as lft
    from longflash.registry import REGISTRY

    be = REGISTRY.get(backend_name)
    ok, why = be.available()
    if not ok:
        print(f"backend {backend_name} unavailable: {why}", file=sys.stderr)
        return 2
    plan = json.loads(plan_path.read_text())
    calls: list[dict[str, Any]] = []

    def marker() -> None:
        torch.cuda._sleep(1)

    def measured(label: dict[str, Any], fn) -> Any:
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(NVTX_RANGE)
        marker()
        entry = dict(label, status="ok")
        result = None
        try:
            result = fn()
            torch.cuda.synchronize()
        except Exception as exc:  # recorded, and the run goes on
            entry["status"] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            torch.cuda.synchronize()
        finally:
            marker()
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            calls.append(entry)
            calls_path.write_text(json.dumps(calls))
        return result

    for c in plan:
        _worker_case(c, be, lft, measured, calls, calls_path)
        torch.cuda.empty_cache()
    return 0


def _rel(a: Any, b: Any) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _worker_case(c: dict[str, Any], be: Any, lft: Any, measured: Any, calls: list, path: Path):
    import functools

    import torch

    d, N, H = c["d"], c["N"], c["H"]
    g = torch.Generator(device="cuda").manual_seed(1000 * d + N)
    q, k, v, dout = (
        torch.randn(1, N, H, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    key = {"d": d, "N": N, "H": H}
    call = lft.make_call(q, k, v)
    res = measured(
        {**key, "who": "ours", "direction": "fwd"}, functools.partial(be.forward, call, q, k, v)
    )
    out = grads = None
    if res is not None:
        out, lse = res
        grads = measured(
            {**key, "who": "ours", "direction": "bwd"},
            functools.partial(be.backward, call, dout, q, k, v, out, lse),
        )
    errors: dict[str, float] = {}
    if c["naive"]:
        # (B, H, N, d) contiguous, as a PyTorch user would lay it out for q @ k^T.
        qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dt = dout.transpose(1, 2).contiguous()
        scale = 1.0 / math.sqrt(d)

        def naive_fwd() -> Any:
            s = (qt * scale) @ kt.transpose(-2, -1)
            return torch.softmax(s, dim=-1) @ vt

        o = measured({**key, "who": "naive", "direction": "fwd"}, naive_fwd)
        if o is not None:
            measured({**key, "who": "naive", "direction": "bwd"}, functools.partial(o.backward, dt))
            if out is not None:
                errors["out"] = _rel(out, o.detach().transpose(1, 2))
            if grads is not None and qt.grad is not None:
                for name, ours_g, ref in zip(("dq", "dk", "dv"), grads, (qt, kt, vt)):
                    errors[name] = _rel(ours_g, ref.grad.transpose(1, 2))
    calls.append({**key, "who": "check", "errors_vs_naive": errors})
    path.write_text(json.dumps(calls))


# ---------------------------------------------------------------------------------------------
# Driver: ncu, parsing, results
# ---------------------------------------------------------------------------------------------


@functools.cache
def available_metrics(ncu: str, wanted: tuple[str, ...]) -> tuple[list[str], list[str], str]:
    proc = subprocess.run(
        [ncu, "--query-metrics"], capture_output=True, text=True, check=False, timeout=120
    )
    text = proc.stdout + proc.stderr
    have = set(re.findall(r"^\s*([a-z0-9_]+__[a-z0-9_]+)", text, flags=re.M))
    keep, drop = [], []
    if not have:  # an ncu whose listing we cannot read: ask for all, ncu names what it lacks
        return list(wanted), [], text
    for m in wanted:
        (keep if m.rsplit(".", 1)[0] in have else drop).append(m)
    return keep, drop, text


def parse_ncu_csv(text: str) -> list[dict[str, Any]]:
    """Rows of ncu's `--csv --page raw --print-units base` output, in launch order."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    body = [ln for ln in lines[start:] if ln.startswith('"')]
    reader = csv.reader(body)
    header = next(reader)
    rows = []
    for rec in reader:
        if len(rec) != len(header) or not rec[0].strip().isdigit():
            continue  # the units row
        row: dict[str, Any] = dict(zip(header, rec))
        row["ID"] = int(rec[0])
        for name in header:
            if "__" in name:
                try:
                    row[name] = float(row[name].replace(",", ""))
                except ValueError:
                    row[name] = float("nan")
        rows.append(row)
    rows.sort(key=lambda r: r["ID"])
    return rows


def segment(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Kernels between consecutive pairs of marker kernels."""
    segs: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] | None = None
    for r in rows:
        if MARKER_PATTERN.search(r.get("Kernel Name", "")):
            if cur is None:
                cur = []
            else:
                segs.append(cur)
                cur = None
        elif cur is not None:
            cur.append(r)
    return segs


def summarize(seg: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kernels": [
            {"name": r.get("Kernel Name", "")[:120], **{m: r.get(m) for m in metrics}} for r in seg
        ]
    }
    for m in metrics:
        vals = [r.get(m) for r in seg]
        out[m] = sum(v for v in vals if isinstance(v, float) and not math.isnan(v))
    if "lts__t_sectors_srcunit_tex.sum" in metrics:
        out["lts_tex_bytes"] = 32 * out["lts__t_sectors_srcunit_tex.sum"]
    return out


def run_ncu(
    args: argparse.Namespace, plan: list[dict[str, Any]], work: Path, keep_csv: Path
) -> dict[str, Any]:
    ncu = args.ncu or shutil.which("ncu")
    if ncu is None:
        raise SystemExit("ncu not found (pass --ncu PATH); use --dry-run on a machine without it")
    metrics, dropped, _ = available_metrics(ncu, METRICS)
    print(f"ncu: {ncu}; metrics {metrics}; dropped (not on this GPU/ncu): {dropped}", flush=True)
    plan_path, calls_path = work / "plan.json", work / "calls.json"
    plan_path.write_text(json.dumps(plan))
    attempts = []
    for use_nvtx in (True, False) if args.nvtx else (False,):
        log = work / f"ncu-{'nvtx' if use_nvtx else 'all'}.csv"
        cmd = [
            ncu,
            "--clock-control",
            "none",
            "--cache-control",
            args.cache_control,
            "--metrics",
            ",".join(metrics),
            "--csv",
            "--page",
            "raw",
            "--print-units",
            "base",
            "--log-file",
            str(log),
        ]
        if use_nvtx:
            cmd += ["--nvtx", "--nvtx-include", f"{NVTX_RANGE}/"]
        cmd += [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            str(plan_path),
            "--calls",
            str(calls_path),
            "--backend",
            args.backend,
        ]
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, check=False, timeout=args.ncu_timeout)
        text = log.read_text() if log.exists() else ""
        rows = parse_ncu_csv(text)
        calls = json.loads(calls_path.read_text()) if calls_path.exists() else []
        measured_calls = [c for c in calls if c.get("who") != "check"]
        segs = segment(rows)
        attempts.append(
            {
                "nvtx": use_nvtx,
                "rc": proc.returncode,
                "kernels": len(rows),
                "segments": len(segs),
                "calls": len(measured_calls),
            }
        )
        print(f"ncu attempt {attempts[-1]}", flush=True)
        if log.exists():
            shutil.copy(log, keep_csv)
        if segs and len(segs) == len(measured_calls):
            break
    else:
        raise SystemExit(f"could not match ncu kernels to calls: {attempts}")
    measurements = []
    for call, seg in zip(measured_calls, segs):
        measurements.append({**call, **summarize(seg, metrics)})
    checks = [c for c in calls if c.get("who") == "check"]
    return {
        "metrics": metrics,
        "metrics_dropped": dropped,
        "ncu_attempts": attempts,
        "measurements": measurements,
        "checks": checks,
        "ncu_version": subprocess.run(
            [ncu, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip(),
    }


def device_info() -> dict[str, Any]:
    try:
        import torch

        p = torch.cuda.get_device_properties(0)
        return {
            "gpu": p.name,
            "sms": p.multi_processor_count,
            "l2_bytes": getattr(p, "L2_cache_size", None),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        }
    except Exception as exc:  # the JSON still says what ran
        return {"error": repr(exc)}


def join(model: list[dict[str, Any]], meas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (d, N, direction): the model and what ncu measured for ours and naive."""
    table = []
    by = {(m["d"], m["N"], m["direction"], m["who"]): m for m in meas}
    for r in model:
        row = dict(r)
        for who in ("ours", "naive"):
            m = by.get((r["d"], r["N"], r["direction"], who))
            row[f"{who}_measured"] = None
            if m is not None:
                row[f"{who}_measured"] = {
                    "status": m["status"],
                    "dram_read": m.get("dram__bytes_read.sum"),
                    "dram_write": m.get("dram__bytes_write.sum"),
                    "dram": (m.get("dram__bytes_read.sum") or 0)
                    + (m.get("dram__bytes_write.sum") or 0),
                    "l2": m.get("lts__t_bytes.sum"),
                    "l2_from_sm": m.get("lts_tex_bytes"),
                    "l2_red": 32 * (m.get("lts__t_sectors_op_red.sum") or 0),
                    "xbar2l1tex": m.get("l1tex__m_xbar2l1tex_read_bytes.sum"),
                    "lrc": m.get("lrc__t_bytes.sum"),
                    "time_ns": m.get("gpu__time_duration.sum"),
                    "kernels": m["kernels"],
                }
        table.append(row)
    return table


def print_measured_table(rows: list[dict[str, Any]]) -> None:
    print("\nMeasured (MB = 1e6) against the model; r = measured / model")
    print(
        f"{'d':>4} {'N':>5} {'dir':>3} | {'ours rd':>8} {'r':>4} {'ours wr':>8} {'r':>4} | "
        f"{'ours L2':>9} {'r':>4} | {'naive rd':>9} {'r':>4} {'naive wr':>9} {'r':>4} | "
        f"{'naive/ours':>10}"
    )

    def get(m: dict[str, Any] | None, field: str) -> float | None:
        return m[field] if m and m["status"] == "ok" else None

    def rat(a: float | None, b: float) -> str:
        return f"{a / b:4.2f}" if a is not None and b else "   -"

    for r in rows:
        o, n, mo, mn = r.get("ours_measured"), r.get("naive_measured"), r["ours"], r["naive"]
        ord_, owr, ol = get(o, "dram_read"), get(o, "dram_write"), get(o, "l2")
        nrd, nwr = get(n, "dram_read"), get(n, "dram_write")
        od, nd = get(o, "dram"), get(n, "dram")
        print(
            f"{r['d']:>4} {_k(r['N']):>5} {r['direction']:>3} | "
            f"{_mb(ord_):>8} {rat(ord_, mo['dram_read_model'])} "
            f"{_mb(owr):>8} {rat(owr, mo['dram_write_model'])} | "
            f"{_mb(ol):>9} {rat(ol, mo['l2_model'])} | "
            f"{_mb(nrd):>9} {rat(nrd, mn['dram_read_model'])} "
            f"{_mb(nwr):>9} {rat(nwr, mn['dram_write_model'])} | "
            f"{(f'{nd / od:10.1f}' if nd and od else '         -')}"
        )


def plot(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    rows = results["rows"]
    dims = sorted({r["d"] for r in rows})
    fig, axes = plt.subplots(2, len(dims), figsize=(5.2 * len(dims), 8.5), squeeze=False)
    for j, d in enumerate(dims):
        for i, direction in enumerate(("fwd", "bwd")):
            ax = axes[i][j]
            sel = sorted(
                (r for r in rows if r["d"] == d and r["direction"] == direction),
                key=lambda r: r["N"],
            )
            Ns = [r["N"] for r in sel]

            def meas(who: str, field: str, sel=sel) -> list[float]:
                out = []
                for r in sel:
                    m = r.get(f"{who}_measured")
                    ok = m and m["status"] == "ok" and m.get(field) is not None
                    out.append(m[field] if ok else float("nan"))
                return out

            ax.plot(Ns, [r["ours"]["dram_model"] for r in sel], "-", color="C0",
                    label="ours: DRAM model (compulsory + spill)")  # fmt: skip
            ax.plot(Ns, meas("ours", "dram"), "o", color="C0", label="ours: DRAM measured")
            ax.plot(Ns, [r["ours"]["dram_read_model"] for r in sel], ":", color="C0",
                    label="ours: DRAM read model")  # fmt: skip
            ax.plot(
                Ns, meas("ours", "dram_read"), "x", color="C0", label="ours: DRAM read measured"
            )
            ax.plot(Ns, [r["ours"]["l2_model"] for r in sel], "--", color="C2",
                    label="ours: L2 model (tiled re-reads)")  # fmt: skip
            ax.plot(Ns, meas("ours", "l2"), "s", color="C2", mfc="none", label="ours: L2 measured")
            ax.plot(Ns, [r["naive"]["dram_model"] for r in sel], "-", color="C3",
                    label="naive: DRAM model (N² passes)")  # fmt: skip
            ax.plot(Ns, meas("naive", "dram"), "^", color="C3", label="naive: DRAM measured")
            ax.axhline(results["machine"]["l2_bytes"], color="0.6", lw=0.8, ls=":")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(Ns, [_k(n) for n in Ns])
            ax.set_title(f"{direction}, head dim {d}, H={sel[0]['H'] if sel else '?'}")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("bytes")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"HBM (DRAM) and L2 bytes per call, {results['backend']} vs plain PyTorch, "
        f"{results.get('device', {}).get('gpu', '')}; dotted: L2 size",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    ap.add_argument("--seqlens", type=parse_sizes, default=parse_sizes("1K,2K,4K,8K,16K,32K"))
    ap.add_argument("--head-dims", type=parse_sizes, default=[64, 128, 256])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--no-naive", dest="naive", action="store_false")
    ap.add_argument(
        "--naive-max-gib",
        type=float,
        default=64.0,
        help="skip plain PyTorch where its three N×N buffers would exceed this",
    )
    ap.add_argument("--l2-mib", type=float, default=H200_L2_BYTES / MiB)
    ap.add_argument("--sms", type=int, default=H200_SMS)
    ap.add_argument("--cache-control", default="all", choices=("all", "none"))
    ap.add_argument(
        "--nvtx",
        action="store_true",
        help="profile only inside the NVTX range (misses autograd's backward thread: ours only)",
    )
    ap.add_argument("--ncu", default=None)
    ap.add_argument("--ncu-timeout", type=float, default=900)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--tag", default=None, help="file name stem (default io-<gpu>-<date>)")
    ap.add_argument("--parts", default=None, help="per-head-dim JSON and CSV (default results/tmp)")
    ap.add_argument("--merge", nargs="+", default=None, help="merge part JSONs into one result")
    ap.add_argument("--dry-run", action="store_true", help="plan and model only; no GPU, no ncu")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--calls", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return _worker(Path(args.worker), Path(args.calls), args.backend)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        out_dir = Path(args.out) if args.out else RESULTS
        return finish(parts, out_dir, args.tag or Path(args.merge[0]).stem.rsplit("-d", 1)[0])

    machine = Machine(sms=args.sms, l2_bytes=int(args.l2_mib * MiB))
    plan = build_plan(args)
    model = model_rows(args.backend, plan, machine)
    thr = thresholds(args.backend, args.head_dims, args.heads, machine)
    print(f"Plan: backend {args.backend}, H={args.heads}, B=1, bf16, non-causal")
    for c in plan:
        tiles = tiles_for(args.backend, c["d"])
        print(
            f"  d={c['d']:>3} N={_k(c['N']):>4}  ours fwd+bwd (tiles {tiles.fwd_rows}x"
            f"{tiles.fwd_cols} fwd, {tiles.kv_keys} keys/CTA bwd)"
            + (
                f", naive fwd+bwd (peak N² buffers {c['naive_peak_gib']:.1f} GiB)"
                if c["naive"]
                else ", naive skipped"
            )
        )
    print_model_table(args.backend, model)
    print("\nSmallest N (step 1K) where the model puts tiled re-reads in DRAM:")
    for key, n in thr.items():
        print(f"  {key}: {_k(n) if n else 'beyond 4M'}")
    if args.dry_run:
        return 0

    out_dir = Path(args.out) if args.out else RESULTS
    parts = Path(args.parts) if args.parts else RESULTS / "tmp"
    out_dir.mkdir(parents=True, exist_ok=True)
    parts.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dev = device_info()
    slug = re.sub(r"[^a-z0-9]+", "-", str(dev.get("gpu", "gpu")).lower()).strip("-")
    stem = args.tag or f"io-{slug}-{date}"
    # One ncu process per head dim: a failure or a time-out loses one part, not the run.
    part_files = []
    for d in args.head_dims:
        sub = [c for c in plan if c["d"] == d]
        try:
            with tempfile.TemporaryDirectory(prefix="lfio-") as tmp:
                meas = run_ncu(args, sub, Path(tmp), parts / f"{stem}-d{d}.csv")
        except (SystemExit, subprocess.TimeoutExpired) as exc:
            print(f"head dim {d}: no measurement ({exc})", flush=True)
            continue
        part = {
            "what": "DRAM and L2 bytes per attention call (ncu) against the IO model of docs/io.md",
            "date": date,
            "backend": args.backend,
            "command": " ".join(sys.argv),
            "device": dev,
            "machine": dataclasses.asdict(machine),
            "heads": args.heads,
            "cache_control": args.cache_control,
            "spill_thresholds": thr,
            **{k: v for k, v in meas.items() if k != "measurements"},
            "rows": join([r for r in model if r["d"] == d], meas["measurements"]),
        }
        path = parts / f"{stem}-d{d}.json"
        path.write_text(json.dumps(part, indent=1))
        part_files.append(path)
    if not part_files:
        print("nothing measured")
        return 1
    return finish([json.loads(p.read_text()) for p in part_files], out_dir, stem)


def finish(parts: list[dict[str, Any]], out_dir: Path, stem: str) -> int:
    """Merge per-head-dim parts into one JSON and one PNG; print the table."""
    results = dict(parts[0])
    results["rows"] = [r for p in parts for r in p["rows"]]
    results["checks"] = [c for p in parts for c in p.get("checks", [])]
    results["ncu_attempts"] = [a for p in parts for a in p.get("ncu_attempts", [])]
    jpath = out_dir / f"{stem}.json"
    jpath.write_text(json.dumps(results, indent=1))
    ppath = plot(results, out_dir / f"{stem}.png")
    out_env = os.environ.get("OUT")
    if out_env and Path(out_env).resolve() != out_dir.resolve():
        for p in (jpath, ppath):
            if p is not None:
                shutil.copy(p, Path(out_env) / p.name)
    for c in results["checks"]:
        if c.get("errors_vs_naive"):
            errs = ", ".join(f"{k} {v:.1e}" for k, v in c["errors_vs_naive"].items())
            print(f"  check d={c['d']} N={_k(c['N'])}: relative error vs naive bf16: {errs}")
    print_measured_table(results["rows"])
    print(f"\nwrote {jpath}" + (f" and {ppath}" if ppath else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
