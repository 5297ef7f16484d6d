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
        "--t1-from",
        type=Path,
        default=None,
        help="take T1 from an earlier result JSON instead of measuring it",
    )
    ap.add_argument("--no-sim", dest="sim", action="store_false", help="skip the simulation")
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
def _flops(args: argparse.Namespace, backward: bool) -> float:
    from longflash.bench.cases import attention_flops
    from longflash.call import normalize_window

    band = normalize_window(args.causal, args.window)
    if band is not None and band != (None, 0):
        # A window counts its visible pairs (4 FLOPs per pair and head dim, as the
        # causal convention counts half of N^2); 2.5x for the backward.
        left, right = band
        n = args.seqlen
        pairs = sum(
            min(n, i + 1 + (n if right is None else right))
            - max(0, i - (n if left is None else left))
            for i in range(n)
        )
        return 4.0 * args.batch * args.heads * pairs * args.dim * (2.5 if backward else 1.0)
    return attention_flops(
        args.batch,
        args.heads,
        args.seqlen,
        args.seqlen,
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


def torch_t1(args, device, clock: Clock) -> dict[str, Any]:
    """One attention over the whole sequence: forward (as run for training, saving what
    the backward needs) and backward, median of reps."""
    import longflash

    if args.t1_from is not None:
        t1 = json.loads(args.t1_from.read_text())["t1"]
        if t1 is None or t1["seqlen"] != args.seqlen:
            raise SystemExit(f"{args.t1_from} holds no T1 at N={args.seqlen}")
        print(f"T1 from {args.t1_from}: fwd+bwd {t1['fwd_bwd_ms']:.1f} ms")
        return {**t1, "from": str(args.t1_from)}
    q, k, v, dout = _torch_inputs(args, device, args.seqlen, seed=0, grad=True)
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
        "seqlen": args.seqlen,
        "fwd_ms": f,
        "bwd_ms": b,
        "fwd_bwd_ms": f + b,
        "fwd_tflops": _flops(args, False) / f / 1e9,
        "bwd_tflops": _flops(args, True) / b / 1e9,
        "fwd_ms_all": fwd,
        "bwd_ms_all": bwd,
        "peak_mem_gib": _peak(device),
    }
    peak = "n/a" if res["peak_mem_gib"] is None else f"{res['peak_mem_gib']:.1f} GiB"
    print(
        f"T1  N={args.seqlen}: fwd {f:.1f} ms ({res['fwd_tflops']:.3g} TFLOP/s), "
        f"bwd {b:.1f} ms ({res['bwd_tflops']:.3g} TFLOP/s), peak {peak}"
    )
    return res


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
    import longflash.distributed as lfd
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
    variants = [("ring", lay) for lay in args.layouts]
    if args.heads % world == 0 and (args.kv_heads or args.heads) % world == 0:
        variants.append(("ulysses", "contiguous"))
    results = []
    for fn, layout in variants:
        if fn == "ring":

            def run(layout=layout):
                return lfd.ring_attention(q, k, v, **args.mask, layout=layout, backend=backend)
        else:

            def run():
                return lfd.ulysses_attention(q, k, v, **args.mask, backend=backend)

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
        if args.t1 and dist.get_rank() == 0:
            # The baseline on one GPU while the others wait, for T1 / (P * T_P).
            doc["t1"] = torch_t1(args, device, clock)
        dist.barrier()
        doc["ring"] = torch_multi(args, device, clock)
        if dist.get_rank() == 0:
            _summarise_multi(doc)
            _write(doc, args.out, plot_multi)
        dist.destroy_process_group()
        return
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


def _summarise_multi(doc: dict[str, Any]) -> None:
    ring = doc["ring"]
    print(f"P={ring['world']} N={doc['config']['seqlen']} backend {ring['backend']}")
    t1 = doc.get("t1")
    for i, entry in enumerate(ring["ranks"][0]["results"]):
        per_rank = [r["results"][i] for r in ring["ranks"]]
        total = max(e["fwd_ms"] + e["bwd_ms"] for e in per_rank)
        line = f"  {entry['fn']:8s}{entry['layout']:11s} slowest rank fwd+bwd {total:.1f} ms"
        if "compute_fwd_ms" in entry:
            exposed = max(e["exposed_comm_fwd_ms"] + e["exposed_comm_bwd_ms"] for e in per_rank)
            line += f", exposed comm (max over ranks) {exposed:.1f} ms"
        if t1:
            line += f", T1/(P*T_P) {t1['fwd_bwd_ms'] / (ring['world'] * total):.2f}"
        print(line)


# -- JAX -----------------------------------------------------------------------------------
def jax_main(args) -> None:
    import jax

    if args.jax_distributed:
        jax.distributed.initialize()
    import jax.numpy as jnp
    import longflash
    import longflash.distributed as lfd
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Spec
    from longflash.bench.timing import CPU_POLICY, GPU_POLICY, TimingPolicy, time_wallclock

    platform_ = args.device or jax.default_backend()
    devices = jax.devices("gpu" if platform_ == "cuda" else platform_)
    p = len(devices)
    mesh = jax.make_mesh((p,), ("sp",), devices=devices)
    base = GPU_POLICY if platform_ in ("cuda", "gpu") else CPU_POLICY
    policy = TimingPolicy(
        base.warmup_ms, base.rep_ms, min(args.reps, base.min_reps), base.max_reps, reps=args.reps
    )
    gpu = {"name": devices[0].device_kind, "count": p} if platform_ in ("cuda", "gpu") else None
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

    def timed(fn):
        fwd = jax.jit(fn)
        step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * dout), (0, 1, 2)))
        f = time_wallclock(lambda: fwd(q, k, v), policy, jax.block_until_ready)
        fb = time_wallclock(lambda: step(q, k, v), policy, jax.block_until_ready)
        return {"fwd_ms": f.median_ms, "fwd_bwd_ms": fb.median_ms}

    results = []
    variants = [("ring", lay) for lay in args.layouts]
    if args.heads % p == 0 and hk % p == 0:
        variants.append(("ulysses", "contiguous"))
    for fn, layout in variants:

        def body(q, k, v, fn=fn, layout=layout):
            if fn == "ring":
                return lfd.ring_attention(
                    q, k, v, axis_name="sp", **args.mask, layout=layout, backend=args.backend
                )
            return lfd.ulysses_attention(q, k, v, axis_name="sp", **args.mask, backend=args.backend)

        sharded = jax.shard_map(
            body, mesh=mesh, in_specs=(Spec(None, "sp"),) * 3, out_specs=Spec(None, "sp")
        )
        results.append({"fn": fn, "layout": layout, **timed(sharded)})
        print(
            f"{fn:8s}{layout:11s} P={p}: fwd {results[-1]['fwd_ms']:.1f} ms, fwd+bwd "
            f"{results[-1]['fwd_bwd_ms']:.1f} ms"
        )
    doc["ring"] = {"world": p, "results": results}
    if args.t1:
        one = jax.devices()[0]
        # Through the host: the mesh's sharding would otherwise stay in the arrays' types.
        q1, k1, v1, dout1 = (jax.device_put(np.asarray(x), one) for x in (q, k, v, dout))

        def single(q, k, v):
            return longflash.attention(q, k, v, **args.mask, backend=args.backend)

        fwd = jax.jit(single)
        step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(single(q, k, v) * dout1), (0, 1, 2)))
        f = time_wallclock(lambda: fwd(q1, k1, v1), policy, jax.block_until_ready)
        fb = time_wallclock(lambda: step(q1, k1, v1), policy, jax.block_until_ready)
        doc["t1"] = {"fwd_ms": f.median_ms, "fwd_bwd_ms": fb.median_ms}
        print(f"T1 one device: fwd {f.median_ms:.1f} ms, fwd+bwd {fb.median_ms:.1f} ms")
    if jax.process_index() == 0:
        _write(doc, args.out, plot_jax)


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
    """Per rank and variant: fwd+bwd time of the ring, of its compute alone and of its
    transfers alone."""
    plt = _plt()
    ring = doc["ring"]
    names = [f"{e['fn']} {e['layout']}" for e in ring["ranks"][0]["results"]]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        per_rank = [r["results"][i] for r in ring["ranks"]]
        xs = range(len(per_rank))
        ax.bar(
            [x - 0.27 for x in xs],
            [e["fwd_ms"] + e["bwd_ms"] for e in per_rank],
            0.27,
            label="ring",
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
    fig.suptitle(f"P = {ring['world']}: " + _title(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_jax(doc: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    res = doc["ring"]["results"]
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [f"{r['fn']} {r['layout']}" for r in res]
    ax.bar(names, [r["fwd_bwd_ms"] for r in res], label=f"P = {doc['ring']['world']}")
    if doc.get("t1"):
        ax.axhline(doc["t1"]["fwd_bwd_ms"], color="k", ls="--", label="T1, one device")
    ax.set_ylabel("fwd+bwd ms")
    ax.legend(fontsize=8)
    ax.set_title(_title(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.framework == "jax":
        jax_main(args)
    else:
        torch_main(args)


if __name__ == "__main__":
    sys.exit(main())
