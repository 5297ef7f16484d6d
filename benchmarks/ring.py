"""Sequence-parallel attention: the single-GPU baseline, the ring's load balance, and the
real ring on several GPUs. Every figure of docs/sequence-parallel.md comes from here.

One device (no torchrun):
  T1     one attention over the whole sequence, forward and backward (the baseline).
  sim    the ring's per-step schedule for P = 2, 4, 8, both layouts: every rank's block
         computations (and the fp32 merges and dK/dV sums) run in turn on this device
         with no communication, timed per step. Reported per rank, with max/mean (the
         imbalance) and the lock-step time sum_s max_r t[r][s] that a ring whose steps
         wait for the slowest rank would take; T1 / (P * lock-step) is the efficiency
         that compute alone allows.

Several devices (torchrun, or --framework jax over every visible device):
  ring   ring_attention forward and backward per layout (and Ulysses when the heads
         divide), per rank; the same ranks' compute alone (no communication) and the
         transfers alone, so exposed communication = ring - compute-only; peak memory.
  T1     one device over N tokens and over N/P (the weak-scaling baseline): speed-up
         T1(N)/T_P and weak-scaling efficiency = per-GPU TFLOP/s / T1(N/P)'s.
  check  every variant's out, dq, dk, dv against one device's attention over the whole
         sequence (--check-backend), within the conformance suite's bounds; exit 1 if not.

  python benchmarks/ring.py --backend triton                    # 1M tokens on one GPU
  python benchmarks/ring.py --device cpu --seqlen 4096          # tiny, on the CPU
  torchrun --nproc-per-node 8 benchmarks/ring.py --backend cuda
  torchrun --nproc-per-node 2 benchmarks/ring.py --device cpu --seqlen 4096    # gloo
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
      python benchmarks/ring.py --framework jax --device cpu --seqlen 4096

Results: benchmarks/results/ring-<mode>-<device>-<date>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--framework", choices=["torch", "jax"], default="torch")
    ap.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default=None,
        help="default: cuda when a GPU is visible",
    )
    ap.add_argument("--seqlen", type=int, default=1 << 20, help="global sequence length")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--window",
        type=_window_arg,
        default=None,
        help="sliding window LEFT,RIGHT over the global sequence ('none' = unbounded "
        "side; with --causal, RIGHT is 0), e.g. --window 4096,none",
    )
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--worlds", default="2,4,8", help="P values of the one-device simulation")
    ap.add_argument("--layouts", default="zigzag,contiguous")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per figure (median)")
    ap.add_argument(
        "--sim-reps",
        type=int,
        default=1,
        help="timed passes per rank in the simulation (median per step)",
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-t1", dest="t1", action="store_false", help="skip the baseline")
    ap.add_argument(
        "--no-t1-full",
        dest="t1_full",
        action="store_false",
        help="several devices: measure T1 at N/P tokens only (weak scaling), not over the whole "
        "sequence (at 4M tokens one GPU takes minutes per pass)",
    )
    ap.add_argument(
        "--t1-from",
        type=Path,
        default=None,
        help="take T1 from an earlier result JSON instead of measuring it",
    )
    ap.add_argument("--no-sim", dest="sim", action="store_false", help="skip the simulation")
    ap.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="several devices: skip checking every variant's output and gradients against "
        "one device's attention over the whole sequence",
    )
    ap.add_argument(
        "--check-backend",
        default=None,
        help="backend of that one-device result (default: the ring's); another backend "
        "checks the ring's blocks against an independent kernel",
    )
    ap.add_argument(
        "--allow-reference",
        action="store_true",
        help="let 'auto' fall back to the reference backend on a GPU at >= 256K "
        "tokens (hours at 1M)",
    )
    ap.add_argument(
        "--jax-distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host JAX)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    ap.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="recompute the summary of an earlier several-device result and redraw its plot",
    )
    ap.add_argument(
        "--scaling",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="weak and strong scaling (efficiency and speed-up against P) from several-device "
        "results of one configuration at several world sizes; writes ring-scaling-*.json/png",
    )
    args = ap.parse_args(argv)
    args.mask = {"causal": args.causal, "window": args.window}
    args.worlds = [int(p) for p in args.worlds.split(",") if p]
    args.layouts = [s for s in args.layouts.split(",") if s]
    return args


def _window_arg(text: str) -> tuple[int | None, int | None]:
    sides = text.split(",")
    if len(sides) != 2:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT, got {text!r}")
    return tuple(None if x.strip().lower() == "none" else int(x) for x in sides)


# -- shared bits ----------------------------------------------------------------------
def _flops(args: argparse.Namespace, backward: bool, n: int | None = None) -> float:
    """FLOPs of one attention over ``n`` tokens (default: the whole sequence)."""
    from longflash.bench.cases import attention_flops
    from longflash.call import normalize_window

    n = args.seqlen if n is None else n
    band = normalize_window(args.causal, args.window)
    if band is not None and band != (None, 0):
        # A window counts its visible pairs (4 FLOPs per pair and head dim, as the
        # causal convention counts half of N^2); 2.5x for the backward.
        left, right = band
        pairs = sum(
            min(n, i + 1 + (n if right is None else right))
            - max(0, i - (n if left is None else left))
            for i in range(n)
        )
        return 4.0 * args.batch * args.heads * pairs * args.dim * (2.5 if backward else 1.0)
    return attention_flops(
        args.batch,
        args.heads,
        n,
        n,
        args.dim,
        causal=args.causal,
        direction="bwd" if backward else "fwd",
    )


def _median(xs: list[float]) -> float:
    from longflash.bench.timing import summarize

    return summarize(xs, 0).median_ms


def _document(args: argparse.Namespace, mode: str, device: dict[str, Any]) -> dict[str, Any]:
    from longflash.bench.report import cpu_name, device_slug, gpu_driver, versions

    machine = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": device.get("gpu"),
    }
    if machine["gpu"]:
        machine["gpu"]["driver"] = gpu_driver()
    machine["slug"] = device_slug(machine)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {
        "benchmark": "ring",
        "mode": mode,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions(),
        "config": config,
        **device,
    }


def _write(doc: dict[str, Any], out_dir: Path, plot) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = doc["date"][:19].replace("-", "").replace(":", "").replace("T", "-")
    path = out_dir / f"ring-{doc['mode']}-{doc['machine']['slug']}-{stamp}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    if doc["config"]["plot"]:
        try:
            png = plot(doc, path.with_suffix(".png"))
        except ImportError as exc:
            print(f"no plot ({exc}); pip install matplotlib")
        else:
            print(f"wrote {png}")


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )


# -- torch ------------------------------------------------------------------------------
class Clock:
    """Device timestamps: CUDA events on a GPU (no host sync until read), else the host."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def stamp(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


class StepTimer:
    """The ``mark`` hook of ring_forward/ring_backward: one stamp per step boundary."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.stamps: list[Any] = []

    def mark(self, step: int) -> None:
        self.stamps.append(self.clock.stamp())

    def steps_ms(self) -> list[float]:
        return [self.clock.ms(a, b) for a, b in zip(self.stamps, self.stamps[1:])]


def _torch_inputs(args, device, n: int, seed: int, grad: bool = False):
    import torch

    dtype = getattr(torch, args.dtype)
    hk = args.kv_heads or args.heads
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(h, d):
        x = torch.randn(args.batch, n, h, d, generator=g, device=device, dtype=dtype)
        return x.requires_grad_(grad)

    return (
        randn(args.heads, args.dim),
        randn(hk, args.dim),
        randn(hk, args.dim),
        randn(args.heads, args.dim).detach(),
    )


def _resolve_backend(args, q, k, v) -> str:
    """The backend 'auto' picks for the full call, refusing a slow fallback on a GPU."""
    from longflash.frontends.torch import make_call
    from longflash.registry import REGISTRY

    call = make_call(q, k, v, **args.mask)
    name = REGISTRY.select(call, args.backend).name
    if (
        name == "reference"
        and call.device == "cuda"
        and args.seqlen >= 1 << 18
        and not args.allow_reference
    ):
        raise SystemExit(
            f"backend {args.backend!r} resolves to 'reference' on the GPU, far too slow at "
            f"{args.seqlen} tokens; install the cuda or triton backend, pass --backend, or "
            "--allow-reference. Backends:\n" + REGISTRY.explain(call)
        )
    return name


def _peak(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def torch_t1(args, device, clock: Clock, n: int | None = None) -> dict[str, Any]:
    """One attention over ``n`` tokens (default: the whole sequence) on this device:
    forward (as run for training, saving what the backward needs) and backward, median of
    reps. At n = N/P it is the weak-scaling baseline: one GPU's speed at a rank's length."""
    import longflash

    n = args.seqlen if n is None else n
    if args.t1_from is not None and n == args.seqlen:
        t1 = json.loads(args.t1_from.read_text())["t1"]
        if t1 is None or t1["seqlen"] != args.seqlen:
            raise SystemExit(f"{args.t1_from} holds no T1 at N={args.seqlen}")
        print(f"T1 from {args.t1_from}: fwd+bwd {t1['fwd_bwd_ms']:.1f} ms")
        return {**t1, "from": str(args.t1_from)}
    q, k, v, dout = _torch_inputs(args, device, n, seed=0, grad=True)
    fwd, bwd = [], []
    _reset_peak(device)
    for i in range(args.warmup + args.reps):
        a = clock.stamp()
        out = longflash.attention(q, k, v, **args.mask, backend=args.backend)
        b = clock.stamp()
        out.backward(dout)
        c = clock.stamp()
        clock.sync()
        if i >= args.warmup:
            fwd.append(clock.ms(a, b))
            bwd.append(clock.ms(b, c))
        del out
        q.grad = k.grad = v.grad = None
    f, b = _median(fwd), _median(bwd)
    res = {
        "seqlen": n,
        "fwd_ms": f,
        "bwd_ms": b,
        "fwd_bwd_ms": f + b,
        "fwd_tflops": _flops(args, False, n) / f / 1e9,
        "bwd_tflops": _flops(args, True, n) / b / 1e9,
        "fwd_bwd_tflops": (_flops(args, False, n) + _flops(args, True, n)) / (f + b) / 1e9,
        "fwd_ms_all": fwd,
        "bwd_ms_all": bwd,
        "peak_mem_gib": _peak(device),
    }
    peak = "n/a" if res["peak_mem_gib"] is None else f"{res['peak_mem_gib']:.1f} GiB"
    print(
        f"T1  N={n}: fwd {f:.1f} ms ({res['fwd_tflops']:.3g} TFLOP/s), "
        f"bwd {b:.1f} ms ({res['bwd_tflops']:.3g} TFLOP/s), peak {peak}"
    )
    return res


def _check_tolerance(dtype: str, name: str) -> float:
    """The conformance suite's bound for ``name`` (out, dq, dk, dv) in ``dtype``: each
    side of the comparison is itself within it of exact attention."""
    from longflash.testing import TOLERANCES

    return TOLERANCES[dtype]["out" if name == "out" else "grad"]


def _check_entry(dtype: str, errors: dict[str, float]) -> dict[str, Any]:
    bounds = {name: _check_tolerance(dtype, name) for name in errors}
    # `not e <= bound` also fails a NaN
    return {
        "rel_error": errors,
        "bound": bounds,
        "ok": all(not (not e <= bounds[name]) for name, e in errors.items()),
    }


def _variants(args, world: int) -> list[tuple[str, str]]:
    """(fn, layout): the ring in each layout, and Ulysses when the heads divide."""
    variants = [("ring", lay) for lay in args.layouts]
    if args.heads % world == 0 and (args.kv_heads or args.heads) % world == 0:
        variants.append(("ulysses", "contiguous"))
    return variants


def _ring_fn(fn: str, layout: str, args, backend: str, **kw):
    """The distributed call of one variant, as the user writes it."""
    import longflash.distributed as lfd

    if fn == "ring":
        return lambda q, k, v: lfd.ring_attention(
            q, k, v, **args.mask, layout=layout, backend=backend, **kw
        )
    return lambda q, k, v: lfd.ulysses_attention(q, k, v, **args.mask, backend=backend, **kw)


def torch_check(args, device, backend: str, variants) -> list[dict[str, Any]]:
    """Every variant's output and gradients on this rank against attention over the whole
    sequence on this one device (backend ``--check-backend``, default the ring's), cut to
    the rank's shard: relative Frobenius error within the conformance suite's bounds."""
    import longflash
    import longflash.distributed as lfd
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    q, k, v, dout = _torch_inputs(args, device, args.seqlen, seed=0, grad=True)
    ref_backend = args.check_backend or backend
    out = longflash.attention(q, k, v, **args.mask, backend=ref_backend)
    out.backward(dout)
    ref = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    q.grad = k.grad = v.grad = None
    del out

    def rel(x, want) -> float:
        x, want = x.float(), want.float()
        return float((x - want).norm() / want.norm())

    results = []
    for fn, layout in variants:

        def shard(x, layout=layout):
            return lfd.shard_sequence(x.detach(), rank, world, layout).contiguous()

        qs, ks, vs = (shard(x).requires_grad_() for x in (q, k, v))
        out = _ring_fn(fn, layout, args, backend)(qs, ks, vs)
        out.backward(shard(dout))
        got = {"out": out.detach(), "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}
        errors = {name: rel(got[name], shard(ref[name])) for name in got}
        results.append(
            {"fn": fn, "layout": layout, "reference_backend": ref_backend}
            | _check_entry(args.dtype, errors)
        )
        del qs, ks, vs, out, got
    return results


def _warm_blocks(q, k, v, dout, cfgs) -> None:
    """One forward and backward per distinct block shape of the schedule: compiles and
    autotunes what the timed passes will run, at a fraction of a pass's cost."""
    from longflash.registry import REGISTRY

    seen = set()
    for cfg in cfgs:
        for s in range(cfg.world_size):
            for blk in cfg.blocks(s):
                key = (blk.nq, blk.nk, blk.window)
                if key in seen:
                    continue
                seen.add(key)
                call = cfg.block_call(blk)
                impl = REGISTRY.select(call, cfg.backend)
                qs, dos = q[:, : blk.nq].contiguous(), dout[:, : blk.nq].contiguous()
                ks, vs = k[:, : blk.nk].contiguous(), v[:, : blk.nk].contiguous()
                out, lse = impl.forward(call, qs, ks, vs)
                impl.backward(call, dos, qs, ks, vs, out, lse)


def _rank_pass(q, k, v, dout, cfg, clock: Clock, comm=None):
    """One rank's ring forward and backward with per-step timing (no communication
    unless ``comm`` is a real ring)."""
    from longflash.distributed.torch import NoComm, ring_backward, ring_forward

    comm = comm if comm is not None else NoComm(cfg.rank, cfg.world_size)
    tf, tb = StepTimer(clock), StepTimer(clock)
    out, lse, step_lse = ring_forward(q, k, v, cfg, comm, tf.mark)
    ring_backward(dout, q, k, v, out, lse, step_lse, cfg, comm, tb.mark)
    clock.sync()
    return tf.steps_ms(), tb.steps_ms()


def torch_simulation(args, device, clock: Clock, backend: str, t1: dict | None) -> list:
    """Every rank's ring schedule in turn on this device, for each P and layout."""
    from longflash.distributed.schedule import check_length, work_per_rank
    from longflash.distributed.torch import RingConfig
    from longflash.frontends.torch import make_call

    out = []
    jobs = [(p, lay) for p in args.worlds for lay in args.layouts]
    for p, layout in jobs:  # every shape checked before anything runs
        check_length(args.seqlen, p, layout)
    with _progress() as bar:
        task = bar.add_task("ring schedule, one device", total=sum(p for p, _ in jobs))
        for p, layout in jobs:
            n = args.seqlen // p
            q, k, v, dout = _torch_inputs(args, device, n, seed=p)
            call = make_call(q, k, v)
            cfgs = [
                RingConfig(call, backend, r, p, layout, args.causal, args.window) for r in range(p)
            ]
            steps = cfgs[0].steps  # P, or fewer when a window empties the last ones
            if args.warmup:
                _warm_blocks(q, k, v, dout, cfgs)
            _reset_peak(device)
            runs = []
            for cfg in cfgs:
                runs.append([_rank_pass(q, k, v, dout, cfg, clock) for _ in range(args.sim_reps)])
                bar.advance(task)
            ranks = []
            for r, reps in enumerate(runs):
                fwd = [_median([rep[0][s] for rep in reps]) for s in range(steps)]
                bwd = [_median([rep[1][s] for rep in reps]) for s in range(steps)]
                ranks.append(
                    {
                        "rank": r,
                        "fwd_ms": sum(fwd),
                        "bwd_ms": sum(bwd),
                        "total_ms": sum(fwd) + sum(bwd),
                        "steps_fwd_ms": fwd,
                        "steps_bwd_ms": bwd,
                    }
                )
            totals = [x["total_ms"] for x in ranks]
            lockstep = sum(
                max(x["steps_fwd_ms"][s] + x["steps_bwd_ms"][s] for x in ranks)
                for s in range(steps)
            )
            entry = {
                "world": p,
                "layout": layout,
                "local_seqlen": n,
                "ring_steps": steps,
                "ranks": ranks,
                "pairs_per_rank": work_per_rank(p, layout, args.causal, n, args.window),
                "max_over_mean": max(totals) / statistics.fmean(totals),
                # one rank's peak (all ranks ran here in turn): inputs, ring buffers,
                # accumulators, saved lse; the transfers' buffers are allocated too
                "peak_mem_gib": _peak(device),
                "slowest_rank_ms": max(totals),
                "lockstep_ms": lockstep,
            }
            if t1 is not None:
                entry["efficiency_lockstep"] = t1["fwd_bwd_ms"] / (p * lockstep)
                entry["efficiency_slowest"] = t1["fwd_bwd_ms"] / (p * max(totals))
            out.append(entry)
            bar.console.print(
                f"P={p} {layout:10s} per-rank fwd+bwd ms "
                f"[{', '.join(f'{t:.0f}' for t in totals)}]  max/mean "
                f"{entry['max_over_mean']:.2f}  lock-step {lockstep:.0f} ms"
                + (f"  T1/(P*lock-step) {entry['efficiency_lockstep']:.2f}" if t1 else ""),
                soft_wrap=True,
            )
            del q, k, v, dout
    return out


def torch_multi(args, device, clock: Clock) -> dict[str, Any]:
    """The real ring (and Ulysses) across the torchrun world."""
    import torch
    import torch.distributed as dist
    from longflash.distributed.schedule import check_length
    from longflash.distributed.torch import P2PRing, RingConfig
    from longflash.frontends.torch import make_call

    rank, world = dist.get_rank(), dist.get_world_size()
    for layout in args.layouts:
        check_length(args.seqlen, world, layout)
    n = args.seqlen // world
    q, k, v, dout = _torch_inputs(args, device, n, seed=1000 + rank, grad=True)
    backend = _resolve_backend(args, q, k, v)
    results = []
    for fn, layout in _variants(args, world):
        attend = _ring_fn(fn, layout, args, backend)

        def run(attend=attend):
            return attend(q, k, v)

        fwd, bwd = [], []
        _reset_peak(device)
        for i in range(args.warmup + args.reps):
            dist.barrier()
            a = clock.stamp()
            out = run()
            b = clock.stamp()
            out.backward(dout)
            c = clock.stamp()
            clock.sync()
            q.grad = k.grad = v.grad = None
            if i >= args.warmup:
                fwd.append(clock.ms(a, b))
                bwd.append(clock.ms(b, c))
        entry = {
            "fn": fn,
            "layout": layout,
            "fwd_ms": _median(fwd),
            "bwd_ms": _median(bwd),
            "peak_mem_gib": _peak(device),
        }
        if fn == "ring":
            cfg = RingConfig(
                make_call(q, k, v), backend, rank, world, layout, args.causal, args.window
            )
            with torch.no_grad():
                comp = [
                    _rank_pass(q.detach(), k.detach(), v.detach(), dout, cfg, clock)
                    for _ in range(args.warmup + args.reps)
                ][args.warmup :]
            entry["compute_fwd_ms"] = _median([sum(c[0]) for c in comp])
            entry["compute_bwd_ms"] = _median([sum(c[1]) for c in comp])
            entry["exposed_comm_fwd_ms"] = entry["fwd_ms"] - entry["compute_fwd_ms"]
            entry["exposed_comm_bwd_ms"] = entry["bwd_ms"] - entry["compute_bwd_ms"]
            entry["ring_steps"] = cfg.steps
            entry["comm_only_fwd_ms"], entry["comm_only_bwd_ms"] = _comm_only(
                args, P2PRing(dist.group.WORLD), cfg.steps, k.detach(), v.detach(), clock
            )
        results.append(entry)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "results": results})
    return {"world": world, "local_seqlen": n, "backend": backend, "ranks": gathered}


def _comm_only(args, ring, steps: int, k, v, clock: Clock) -> tuple[float, float]:
    """The ring's transfers alone: steps-1 shifts of (k, v) (steps = P without a
    window); then those plus the fp32 (dk, dv) sums passed on after every step and sent
    home after the last, as in the backward."""
    import torch
    import torch.distributed as dist

    p = steps
    fwd, bwd = [], []
    for i in range(args.warmup + args.reps):
        acc = [
            torch.zeros(k.shape, dtype=torch.float32, device=k.device),
            torch.zeros(v.shape, dtype=torch.float32, device=v.device),
        ]
        dist.barrier()
        a = clock.stamp()
        cur, spare = [k, v], [torch.empty_like(k), torch.empty_like(v)]
        for s in range(p - 1):
            nxt = ring.shift(cur, spare).wait()
            spare = cur if s > 0 else [torch.empty_like(k), torch.empty_like(v)]
            cur = nxt
        b = clock.stamp()
        cur, dkv = [k, v], None
        for s in range(p):
            kv = ring.shift(cur, [torch.empty_like(k), torch.empty_like(v)]) if s + 1 < p else None
            if dkv is not None:
                acc = dkv.wait()
                dkv = None
            distance = 1 if s + 1 < p else -s
            if distance % ring.world_size:
                recv = [torch.empty_like(t) for t in acc]
                dkv = ring.shift(acc, recv, tag=2, distance=distance)
            if kv is not None:
                cur = kv.wait()
        if dkv is not None:
            dkv.wait()
        c = clock.stamp()
        clock.sync()
        if i >= args.warmup:
            fwd.append(clock.ms(a, b))
            bwd.append(clock.ms(b, c))
    return _median(fwd), _median(bwd)


def torch_main(args) -> None:
    import torch
    import torch.distributed as dist

    device_kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        info = {
            "gpu": {
                "name": props.name,
                "memory_gib": props.total_memory / GIB,
                "count": torch.cuda.device_count(),
            }
        }
    else:
        device = torch.device("cpu")
        info = {"gpu": None}
    clock = Clock(device)
    if world > 1:
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        if device_kind == "cuda":
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        doc = _document(args, "multi", info)
        doc["ring"] = torch_multi(args, device, clock)
        rank = dist.get_rank()
        if args.t1 and rank == 0:
            # One GPU while the others wait: T1(N), the same-N baseline, and T1(N/P) at
            # one rank's length, the weak-scaling baseline.
            if args.t1_full:
                doc["t1"] = torch_t1(args, device, clock)
            doc["t1_local"] = torch_t1(args, device, clock, args.seqlen // world)
        dist.barrier()
        if args.check:
            checks = torch_check(args, device, doc["ring"]["backend"], _variants(args, world))
            doc["check"] = [None] * world
            dist.all_gather_object(doc["check"], checks)
        if rank == 0:
            doc["summary"] = multi_summary(doc)
            _write(doc, args.out, plot_multi)
        # Together: a gloo rank that tears down while rank 0 still writes aborted ("terminate
        # called without an active exception") on CI.
        dist.barrier()
        dist.destroy_process_group()
        failed = args.check and not all(
            c["ok"] for rank_checks in doc["check"] for c in rank_checks
        )
        if failed:
            print(
                "the ring's result departs from one device's; see the check above", file=sys.stderr
            )
        # Leave without the interpreter's teardown. Even after the barrier and
        # destroy_process_group, a gloo rank aborted there ("terminate called without an active
        # exception") in 3 of 25 CPU runs on a loaded 2-core machine, after every result had been
        # written. Everything is written and flushed at this point.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if failed else 0)
    doc = _document(args, "single", info)
    # Resolved once on the full call's shapes (uninitialised: only shapes are read).
    hk = args.kv_heads or args.heads
    dtype = getattr(torch, args.dtype)
    q, k = (
        torch.empty(args.batch, args.seqlen, h, args.dim, dtype=dtype, device=device)
        for h in (args.heads, hk)
    )
    doc["backend"] = _resolve_backend(args, q, k, k)
    del q, k
    print(
        f"torch {torch.__version__}, device {device}, backend {doc['backend']}, "
        f"N={args.seqlen} B={args.batch} H={args.heads} D={args.dim} {args.dtype} "
        f"causal={args.causal} window={args.window}"
    )
    doc["t1"] = torch_t1(args, device, clock) if args.t1 else None
    doc["simulation"] = (
        torch_simulation(args, device, clock, doc["backend"], doc["t1"]) if args.sim else []
    )
    _write(doc, args.out, plot_single)


def _efficiencies(doc: dict[str, Any], fwd_bwd_ms: float, world: int) -> dict[str, float]:
    """Same-N speed-up T1(N)/T_P, its efficiency T1(N)/(P·T_P), and the weak-scaling
    efficiency: per-GPU TFLOP/s of the P-device run over one GPU's at N/P tokens."""
    out: dict[str, float] = {}
    t1, local = doc.get("t1"), doc.get("t1_local")
    if t1:
        out["speedup"] = t1["fwd_bwd_ms"] / fwd_bwd_ms
        out["efficiency_same_n"] = out["speedup"] / world
    if local:
        out["per_gpu_tflops"] = _tflops(doc, doc["config"]["seqlen"], fwd_bwd_ms) / world
        out["efficiency_weak"] = out["per_gpu_tflops"] / _tflops(
            doc, local["seqlen"], local["fwd_bwd_ms"]
        )
    return out


def _tflops(doc: dict[str, Any], n: int, fwd_bwd_ms: float) -> float:
    """Forward+backward TFLOP/s of one attention over n tokens, in doc's configuration."""
    c = doc["config"]
    args = argparse.Namespace(
        **{**c, "window": None if c["window"] is None else tuple(c["window"])}
    )
    return (_flops(args, False, n) + _flops(args, True, n)) / fwd_bwd_ms / 1e9


def multi_summary(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant (torch): the slowest rank, exposed communication, peak memory,
    the check and the efficiencies; printed as a table."""
    ring = doc["ring"]
    world = ring["world"]
    rows = []
    for i, entry in enumerate(ring["ranks"][0]["results"]):
        per_rank = [r["results"][i] for r in ring["ranks"]]
        totals = [e["fwd_ms"] + e["bwd_ms"] for e in per_rank]
        row: dict[str, Any] = {
            "fn": entry["fn"],
            "layout": entry["layout"],
            "slowest_rank": max(range(world), key=totals.__getitem__),
            "fwd_bwd_ms": max(totals),
            "fwd_ms": max(e["fwd_ms"] for e in per_rank),
            "bwd_ms": max(e["bwd_ms"] for e in per_rank),
            "peak_mem_gib": max((e["peak_mem_gib"] or 0.0) for e in per_rank) or None,
        }
        if "compute_fwd_ms" in entry:
            exposed = [e["exposed_comm_fwd_ms"] + e["exposed_comm_bwd_ms"] for e in per_rank]
            # On the slowest rank: what the transfers add to the attention's time. Other ranks'
            # "exposed" time also holds their wait for it (the contiguous layout's imbalance).
            row["exposed_comm_ms"] = exposed[row["slowest_rank"]]
            row["exposed_comm_max_ms"] = max(exposed)
        row |= _efficiencies(doc, row["fwd_bwd_ms"], world)
        if doc.get("check"):
            checks = [c[i] for c in doc["check"]]
            row["check_ok"] = all(c["ok"] for c in checks)
            row["check_rel_error"] = {
                name: max(c["rel_error"][name] for c in checks) for name in checks[0]["rel_error"]
            }
        rows.append(row)
    _print_summary(doc, rows)
    return rows


def _print_summary(doc: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    c = doc["config"]
    world = doc["ring"]["world"]
    backend = doc["ring"].get("backend", c["backend"])
    table = Table(title=f"P = {world}, N = {c['seqlen']:,}, backend {backend}")
    for col in (
        "variant",
        "fwd+bwd ms",
        "slowest",
        "exposed comm ms\n(slowest rank)",
        "peak GiB",
        "T1/T_P",
        "same-N eff",
        "TFLOP/s per GPU",
        "weak eff",
        "check (max rel err)",
    ):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        check = "-"
        if "check_ok" in r:
            worst = max(r["check_rel_error"].values())
            check = f"{'ok' if r['check_ok'] else 'FAIL'} {worst:.1e}"
        table.add_row(
            f"{r['fn']} {r['layout']}",
            fmt(r["fwd_bwd_ms"], ".1f"),
            fmt(r.get("slowest_rank"), "d"),
            fmt(r.get("exposed_comm_ms"), ".1f"),
            fmt(r.get("peak_mem_gib"), ".1f"),
            fmt(r.get("speedup"), ".2f"),
            fmt(r.get("efficiency_same_n"), ".2f"),
            fmt(r.get("per_gpu_tflops"), ".3g"),
            fmt(r.get("efficiency_weak"), ".2f"),
            check,
        )
    for key, label in (("t1", "T1(N)"), ("t1_local", "T1(N/P)")):
        t = doc.get(key)
        if t:
            tf = _tflops(doc, t["seqlen"], t["fwd_bwd_ms"])
            table.caption = (table.caption + "; " if table.caption else "") + (
                f"{label} {t['fwd_bwd_ms']:.1f} ms ({tf:.3g} TFLOP/s)"
            )
    Console(width=160).print(table)


# -- JAX -----------------------------------------------------------------------------------
def jax_main(args) -> None:
    import jax

    if args.jax_distributed:
        jax.distributed.initialize()
    import jax.numpy as jnp
    import longflash
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Spec
    from longflash.bench.timing import CPU_POLICY, GPU_POLICY, TimingPolicy, time_wallclock

    platform_ = args.device or jax.default_backend()
    devices = jax.devices("gpu" if platform_ == "cuda" else platform_)
    p = len(devices)
    mesh = jax.make_mesh((p,), ("sp",), devices=devices)
    on_gpu = platform_ in ("cuda", "gpu")
    base = GPU_POLICY if on_gpu else CPU_POLICY
    # Compiled ahead, so the one estimating run is the warm-up: at 1M tokens a run takes
    # seconds.
    policy = TimingPolicy(
        base.warmup_ms,
        base.rep_ms,
        min(args.reps, base.min_reps),
        base.max_reps,
        reps=args.reps,
        estimate_runs=1,
    )
    gpu = {"name": devices[0].device_kind, "count": p} if on_gpu else None
    doc = _document(args, "jax", {"gpu": gpu, "devices": p})
    dtype = jnp.dtype(args.dtype)
    hk = args.kv_heads or args.heads
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shapes = [(args.heads, args.dim), (hk, args.dim), (hk, args.dim), (args.heads, args.dim)]
    seq = NamedSharding(mesh, Spec(None, "sp"))
    q, k, v, dout = (
        jax.device_put(jax.random.normal(key, (args.batch, args.seqlen, *s), dtype), seq)
        for key, s in zip(keys, shapes)
    )

    def compiled(fn, *xs):
        exe = jax.jit(fn).lower(*xs).compile()
        mem = exe.memory_analysis()
        # per device: arguments, outputs and XLA's temporaries, less what they share
        gib = None
        if mem is not None:
            gib = (
                mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes
            ) / GIB
        return exe, gib

    def timed(fn, q, k, v, dout):
        # dout is an argument: closed over, the 2 GiB array (at 1M tokens) would be a constant
        # of the program, and XLA folded Ulysses' exchanges of it on the host for minutes.
        def loss(q, k, v, dout):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))

        fwd, _ = compiled(fn, q, k, v)
        step, gib = compiled(jax.grad(loss, (0, 1, 2)), q, k, v, dout)
        f = time_wallclock(lambda: fwd(q, k, v), policy, jax.block_until_ready)
        fb = time_wallclock(lambda: step(q, k, v, dout), policy, jax.block_until_ready)
        return {"fwd_ms": f.median_ms, "fwd_bwd_ms": fb.median_ms, "compiled_mem_gib": gib}

    def sharded(fn, layout):
        body = _ring_fn(fn, layout, args, args.backend, axis_name="sp")
        return jax.shard_map(
            body, mesh=mesh, in_specs=(Spec(None, "sp"),) * 3, out_specs=Spec(None, "sp")
        )

    results = []
    for fn, layout in _variants(args, p):
        results.append({"fn": fn, "layout": layout, **timed(sharded(fn, layout), q, k, v, dout)})
        print(
            f"{fn:8s}{layout:11s} P={p}: fwd {results[-1]['fwd_ms']:.1f} ms, fwd+bwd "
            f"{results[-1]['fwd_bwd_ms']:.1f} ms"
        )
    doc["ring"] = {"world": p, "backend": args.backend, "results": results}

    one = devices[0]
    # Through the host: the mesh's sharding would otherwise stay in the arrays' types.
    q1, k1, v1, dout1 = (jax.device_put(np.asarray(x), one) for x in (q, k, v, dout))
    del q, k, v, dout

    def single(q, k, v, backend=args.backend):
        return longflash.attention(q, k, v, **args.mask, backend=backend)

    if args.t1:
        n = args.seqlen // p
        for key, m in (("t1", args.seqlen), ("t1_local", n))[0 if args.t1_full else 1 :]:
            xs = [x[:, :m] for x in (q1, k1, v1, dout1)]
            doc[key] = {"seqlen": m, **timed(single, *xs)}
            print(
                f"{key} one device, N={m}: fwd {doc[key]['fwd_ms']:.1f} ms, fwd+bwd "
                f"{doc[key]['fwd_bwd_ms']:.1f} ms"
            )
            del xs
    if args.check:
        doc["check"] = jax_check(args, mesh, single, sharded, (q1, k1, v1, dout1))
    doc["summary"] = jax_summary(doc)
    doc["device_peak_mem_gib"] = [
        (d.memory_stats() or {}).get("peak_bytes_in_use", 0) / GIB for d in devices
    ]
    if jax.process_index() == 0:
        _write(doc, args.out, plot_multi)
    if args.check and not all(c["ok"] for c in doc["check"]):
        raise SystemExit("the ring's result departs from one device's; see the check above")


def jax_check(args, mesh, single, sharded, inputs) -> list[dict[str, Any]]:
    """Each variant's output and gradients against one device's attention over the whole
    sequence, put in the variant's layout and sharded like them."""
    import jax
    import jax.numpy as jnp
    import longflash.distributed as lfd
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Spec

    p = mesh.size
    q1, k1, v1, dout1 = inputs
    ref_backend = args.check_backend or args.backend

    def with_grads(fn):
        def run(q, k, v, dout):
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp(dout))

        return jax.jit(run)

    ref = with_grads(lambda q, k, v: single(q, k, v, backend=ref_backend))(q1, k1, v1, dout1)

    @jax.jit
    def rel(x, want):
        x, want = x.astype(jnp.float32), want.astype(jnp.float32)
        return jnp.sqrt(jnp.sum(jnp.square(x - want)) / jnp.sum(jnp.square(want)))

    results = []
    seq = NamedSharding(mesh, Spec(None, "sp"))
    for fn, layout in _variants(args, p):

        def in_layout(x, layout=layout):  # rank shards, concatenated in rank order
            return jnp.concatenate([lfd.shard_sequence(x, r, p, layout) for r in range(p)], axis=1)

        xs = [jax.device_put(in_layout(x), seq) for x in inputs]
        got = with_grads(sharded(fn, layout))(*xs)
        del xs
        errors = {
            # the reference moves to the mesh (device to device), not the result to the host
            name: float(rel(g, jax.device_put(in_layout(r), seq)))
            for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)
        }
        del got
        results.append(
            {"fn": fn, "layout": layout, "reference_backend": ref_backend}
            | _check_entry(args.dtype, errors)
        )
        print(
            f"check {fn} {layout}: "
            + ", ".join(f"{k} {e:.2e}" for k, e in errors.items())
            + (" ok" if results[-1]["ok"] else " FAIL")
        )
    return results


def jax_summary(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant (JAX): one SPMD program, so no per-rank split."""
    world = doc["ring"]["world"]
    rows = []
    for i, entry in enumerate(doc["ring"]["results"]):
        row = {
            "fn": entry["fn"],
            "layout": entry["layout"],
            "fwd_bwd_ms": entry["fwd_bwd_ms"],
            "fwd_ms": entry["fwd_ms"],
            "peak_mem_gib": entry["compiled_mem_gib"],
        }
        row |= _efficiencies(doc, row["fwd_bwd_ms"], world)
        if doc.get("check"):
            c = doc["check"][i]
            row["check_ok"], row["check_rel_error"] = c["ok"], c["rel_error"]
        rows.append(row)
    _print_summary(doc, rows)
    return rows


# -- plots -------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(doc: dict[str, Any]) -> str:
    c = doc["config"]
    gpu = (doc["machine"].get("gpu") or {}).get("name") or doc["machine"]["cpu"]
    return (
        f"N={c['seqlen']:,} B={c['batch']} H={c['heads']} D={c['dim']} {c['dtype']} "
        f"{'causal' if c['causal'] else 'full'}"
        f"{'' if c.get('window') is None else ' window ' + str(tuple(c['window']))} - {gpu}"
    )


def plot_single(doc: dict[str, Any], path: Path) -> Path:
    """Per-rank compute of the ring schedule, zigzag against contiguous, for each P,
    as a multiple of the ideal share T1/P (or of the mean when T1 was not run)."""
    plt = _plt()
    sims = doc["simulation"]
    worlds = sorted({s["world"] for s in sims})
    layouts = list(dict.fromkeys(s["layout"] for s in sims))
    fig, axes = plt.subplots(
        1, max(1, len(worlds)), figsize=(4.5 * max(1, len(worlds)), 4), squeeze=False
    )
    t1 = doc.get("t1")
    for ax, p in zip(axes[0], worlds):
        width = 0.8 / len(layouts)
        for i, layout in enumerate(layouts):
            s = next(x for x in sims if x["world"] == p and x["layout"] == layout)
            totals = [r["total_ms"] for r in s["ranks"]]
            ideal = t1["fwd_bwd_ms"] / p if t1 else statistics.fmean(totals)
            xs = [r + (i - (len(layouts) - 1) / 2) * width for r in range(p)]
            ax.bar(
                xs,
                [t / ideal for t in totals],
                width,
                label=f"{layout} (max/mean {s['max_over_mean']:.2f})",
            )
            # The schedule's share of the visible pairs, scaled like the bars: where the
            # bars would stand if time followed the work exactly.
            pairs = s["pairs_per_rank"]
            share = [w / statistics.fmean(pairs) * statistics.fmean(totals) / ideal for w in pairs]
            ax.scatter(
                xs,
                share,
                marker="_",
                s=200,
                color="k",
                label="planned work" if i == 0 else None,
                zorder=3,
            )
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(f"P = {p}")
        ax.set_xlabel("rank")
        ax.set_xticks(range(p))
        ax.set_ylabel("fwd+bwd compute / (T1/P)" if t1 else "fwd+bwd compute / mean")
        ax.legend(fontsize=8)
    fig.suptitle("Ring schedule on one device: per-rank work\n" + _title(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_multi(doc: dict[str, Any], path: Path) -> Path:
    """Torch: per rank and variant, fwd+bwd time of the ring, of its compute alone and of
    its transfers alone. Both frameworks: each variant's time against T1, and its same-N
    and weak-scaling efficiencies against the 0.9 goal."""
    plt = _plt()
    ring = doc["ring"]
    per_rank = "ranks" in ring
    names = [f"{r['fn']} {r['layout']}" for r in doc["summary"]]
    panels = (len(names) if per_rank else 0) + 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if per_rank:
        for i, (ax, name) in enumerate(zip(axes, names)):
            _plot_ranks(ax, name, [r["results"][i] for r in ring["ranks"]])
    ax_t, ax_e = axes[-2:]
    rows = doc["summary"]
    xs = list(range(len(rows)))
    ax_t.bar(xs, [r["fwd_bwd_ms"] / 1e3 for r in rows], 0.6, label=f"P = {ring['world']}")
    for key, style, label in (("t1", "--", "T1(N), one device"), ("t1_local", ":", "T1(N/P)")):
        if doc.get(key):
            ax_t.axhline(doc[key]["fwd_bwd_ms"] / 1e3, color="k", ls=style, lw=1, label=label)
    ax_t.set_xticks(xs, names, rotation=15, fontsize=8)
    ax_t.set_ylabel("fwd+bwd s (slowest rank)")
    ax_t.legend(fontsize=8)
    width = 0.38
    for j, (key, label) in enumerate(
        (
            ("efficiency_same_n", "same N: T1(N) / (P·T_P)"),
            ("efficiency_weak", "weak: per-GPU TFLOP/s ÷ T1(N/P)'s"),
        )
    ):
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            bars = ax_e.bar(
                [x + (j - 0.5) * width for x in xs], [v or 0 for v in vals], width, label=label
            )
            ax_e.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_e.axhline(0.9, color="r", ls="--", lw=1, label="goal 0.9")
    ax_e.set_xticks(xs, names, rotation=15, fontsize=8)
    ax_e.set_ylabel("efficiency")
    top = max([v for r in rows for k, v in r.items() if k.startswith("efficiency_")] + [1.0])
    ax_e.set_ylim(0, 1.75 * top)
    ax_e.legend(fontsize=7, loc="upper left")
    framework = "JAX shard_map" if doc["mode"] == "jax" else "torch.distributed"
    fig.suptitle(f"{framework}, P = {ring['world']}: " + _title(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_ranks(ax, name: str, per_rank: list[dict[str, Any]]) -> None:
    xs = range(len(per_rank))
    ax.bar(
        [x - 0.27 for x in xs], [e["fwd_ms"] + e["bwd_ms"] for e in per_rank], 0.27, label="ring"
    )
    if "compute_fwd_ms" in per_rank[0]:
        ax.bar(
            list(xs),
            [e["compute_fwd_ms"] + e["compute_bwd_ms"] for e in per_rank],
            0.27,
            label="compute only",
        )
        ax.bar(
            [x + 0.27 for x in xs],
            [e["comm_only_fwd_ms"] + e["comm_only_bwd_ms"] for e in per_rank],
            0.27,
            label="transfers only",
        )
    ax.set_title(name)
    ax.set_xlabel("rank")
    ax.set_xticks(list(xs))
    ax.set_ylabel("fwd+bwd ms")
    ax.legend(fontsize=8)


def replot(path: Path) -> None:
    doc = json.loads(path.read_text())
    if doc["mode"] not in ("multi", "jax"):
        raise SystemExit(
            f"{path}: --replot takes a several-device result, not mode {doc['mode']!r}"
        )
    doc["summary"] = multi_summary(doc) if doc["mode"] == "multi" else jax_summary(doc)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {path}\nwrote {plot_multi(doc, path.with_suffix('.png'))}")


# -- scaling across runs ------------------------------------------------------------------
_SAME = ("batch", "heads", "kv_heads", "dim", "dtype", "causal", "window")


def scaling_rows(docs: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (framework, variant, P): the P-device run and, from its T1(N/P) and T1(N),
    the one-device points P = 1 of the weak series (N/P tokens per device) and of the strong
    one (N tokens in all)."""
    if not docs:
        raise SystemExit("--scaling needs at least one several-device result")
    first = docs[0][1]["config"]
    for name, doc in docs:
        if doc.get("mode") not in ("multi", "jax") or not doc.get("summary"):
            raise SystemExit(f"{name}: not a several-device result with a summary")
        diff = [k for k in _SAME if doc["config"].get(k) != first.get(k)]
        if diff:
            raise SystemExit(f"{name}: {', '.join(diff)} differ from {docs[0][0]}'s")
    rows: list[dict[str, Any]] = []
    for name, doc in docs:
        framework = "jax" if doc["mode"] == "jax" else "torch"
        world, n = doc["ring"]["world"], doc["config"]["seqlen"]
        base = {"framework": framework, "seqlen": n, "source": Path(name).name}
        for r in doc["summary"]:
            rows.append(
                base
                | {
                    "variant": f"{r['fn']} {r['layout']}",
                    "world": world,
                    "local_seqlen": n // world,
                    "fwd_bwd_ms": r["fwd_bwd_ms"],
                    "per_gpu_tflops": r.get("per_gpu_tflops"),
                    "efficiency_weak": r.get("efficiency_weak"),
                    "speedup": r.get("speedup"),
                }
            )
        for key, m in (("t1_local", n // world), ("t1", n)):
            t = doc.get(key)
            if t:
                rows.append(
                    base
                    | {
                        "variant": "one device",
                        "world": 1,
                        "seqlen": m,
                        "local_seqlen": m,
                        "fwd_bwd_ms": t["fwd_bwd_ms"],
                        "per_gpu_tflops": _tflops(doc, m, t["fwd_bwd_ms"]),
                        "efficiency_weak": 1.0,
                        "speedup": 1.0,
                    }
                )
    # one row per point: the newest source wins
    unique = {(r["framework"], r["variant"], r["world"], r["seqlen"]): r for r in rows}
    return sorted(unique.values(), key=lambda r: (r["framework"], r["variant"], r["world"]))


def scaling(paths: list[Path], out_dir: Path, plot: bool = True) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    docs = [(str(p), json.loads(p.read_text())) for p in sorted(paths)]
    rows = scaling_rows(docs)
    table = Table(title="Scaling: per-GPU work constant (weak) and total work constant (strong)")
    for col in ("framework", "variant", "P", "N", "N/P", "fwd+bwd s", "TFLOP/s per GPU"):
        table.add_column(col, justify="left" if col in ("framework", "variant") else "right")
    table.add_column("weak eff", justify="right")
    table.add_column("T1(N)/T_P", justify="right")
    for r in rows:
        table.add_row(
            r["framework"],
            r["variant"],
            str(r["world"]),
            f"{r['seqlen']:,}",
            f"{r['local_seqlen']:,}",
            f"{r['fwd_bwd_ms'] / 1e3:.3g}",
            "-" if r["per_gpu_tflops"] is None else f"{r['per_gpu_tflops']:.3g}",
            "-" if r["efficiency_weak"] is None else f"{r['efficiency_weak']:.2f}",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}",
        )
    Console(width=140).print(table)
    first = docs[0][1]
    doc = {
        "benchmark": "ring",
        "mode": "scaling",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": first["machine"],
        "config": {k: first["config"].get(k) for k in (*_SAME, "seqlen")} | {"plot": plot},
        "sources": [Path(p).name for p, _ in docs],
        "rows": rows,
    }
    _write(doc, out_dir, plot_scaling)
    return doc


def plot_scaling(doc: dict[str, Any], path: Path) -> Path:
    """Weak-scaling efficiency and strong-scaling speed-up against the number of devices."""
    plt = _plt()
    fig, (ax_w, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    rows = doc["rows"]
    series = sorted({(r["framework"], r["variant"]) for r in rows if r["world"] > 1})
    worlds = sorted({r["world"] for r in rows})
    # colour: the variant; line style: the size (tokens per GPU, or in all)
    styles = ["-", "--", ":", "-."]
    multi = [r for r in rows if r["world"] > 1]
    locals_ = sorted({r["local_seqlen"] for r in multi})
    totals = sorted({r["seqlen"] for r in multi})
    for i, (framework, variant) in enumerate(series):
        colour = f"C{i % 10}"
        label = f"{variant} ({framework})"
        mine = [r for r in multi if r["framework"] == framework and r["variant"] == variant]
        for ax, key, sizes, size_of, fmt in (
            (ax_w, "efficiency_weak", locals_, "local_seqlen", "{}K per GPU"),
            (ax_s, "speedup", totals, "seqlen", "N = {}K"),
        ):
            # the one-device run is each series' P = 1 point (efficiency and speed-up 1)
            for j, size in enumerate(sizes):
                pts = [(r["world"], r[key]) for r in mine if r[size_of] == size and r[key]]
                if pts:
                    xs, ys = zip(*sorted([(1, 1.0), *pts]))
                    ax.plot(
                        xs,
                        ys,
                        marker="o",
                        color=colour,
                        ls=styles[j % len(styles)],
                        label=f"{label}, " + fmt.format(size // 1024),
                    )
    ax_w.axhline(0.9, color="r", ls="--", lw=1, label="goal 0.9")
    ax_w.set_ylim(0, 1.15)
    ax_s.plot(worlds, worlds, color="k", ls=":", lw=1, label="ideal")
    for ax, title, ylabel in (
        (ax_w, "weak scaling (N/P tokens per GPU)", "per-GPU TFLOP/s ÷ one GPU's"),
        (ax_s, "strong scaling (N tokens in all)", "T1(N) / T_P"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.set_xlabel("GPUs (P)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    c = doc["config"]
    gpu = (doc["machine"].get("gpu") or {}).get("name") or doc["machine"]["cpu"]
    fig.suptitle(
        f"B={c['batch']} H={c['heads']} D={c['dim']} {c['dtype']} "
        f"{'causal' if c['causal'] else 'full'} - {gpu}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot)
    if args.scaling is not None:
        scaling(args.scaling, args.out, args.plot)
        return None
    if args.framework == "jax":
        jax_main(args)
    else:
        torch_main(args)


if __name__ == "__main__":
    sys.exit(main())
