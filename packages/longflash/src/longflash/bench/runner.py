"""Runs a benchmark: picks the harness and the cases, measures every contender on every
case with a progress bar, and assembles the results (the JSON document)."""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from longflash.bench import cases as C
from longflash.bench.core import Harness, Measurement
from longflash.bench.report import machine_info, versions

SCHEMA = "longflash-bench/1"


@dataclass
class BenchConfig:
    """What to run. None means the device's default (see longflash.bench.cases)."""

    framework: str = "torch"
    device: str | None = None  # "cuda" | "cpu"; default: the GPU when there is one
    backends: list[str] | None = None  # LongFlash backends; default: every available one
    peers: list[str] | None = None  # default: the device's peer set
    head_dims: list[int] | None = None
    seqlens: list[int] | None = None
    batch_tokens: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    causal: list[bool] = field(default_factory=lambda: [False, True])
    directions: list[str] = field(default_factory=lambda: ["fwd", "bwd"])
    dtypes: list[str] | None = None
    reps: int | None = None
    quick: bool = False
    long: bool = False
    l2_flush: bool = True
    check: bool = True
    seed: int = 0


def default_device(framework: str) -> str:
    if framework == "jax":
        import jax

        return "cuda" if jax.default_backend() == "gpu" else "cpu"
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_harness(cfg: BenchConfig, device: str) -> Harness:
    reps = cfg.reps if cfg.reps is not None or not cfg.quick else 2
    if cfg.framework == "torch":
        from longflash.bench.torch_harness import TorchHarness

        return TorchHarness(
            device, reps=reps, l2_flush=cfg.l2_flush, check=cfg.check, seed=cfg.seed
        )
    if cfg.framework == "jax":
        from longflash.bench.jax_harness import JaxHarness

        return JaxHarness(device, reps=reps, check=cfg.check, seed=cfg.seed)
    raise ValueError(f"framework must be 'torch' or 'jax', got {cfg.framework!r}")


def make_cases(cfg: BenchConfig, device: str) -> list[C.Case]:
    """The configured grid, filling each unset option with the device's default."""
    grid = C.QUICK_GRID if cfg.quick else C.GPU_GRID if device == "cuda" else C.CPU_GRID
    seqlens = grid.seqlens + (grid.long_seqlens if cfg.long else ())
    return C.build_cases(
        head_dims=cfg.head_dims or grid.head_dims,
        seqlens=cfg.seqlens or seqlens,
        batch_tokens=cfg.batch_tokens or grid.batch_tokens,
        heads=cfg.heads if cfg.heads is not None else grid.heads,
        kv_heads=cfg.kv_heads,
        model_width=grid.model_width,
        causal=cfg.causal,
        directions=cfg.directions,
        dtypes=cfg.dtypes or [grid.dtype],
    )


def compute_ratios(measurements: Sequence[Measurement]) -> list[dict]:
    """Per case, each LongFlash contender against each peer: speedup = peer's time over
    the LongFlash time (> 1: LongFlash is faster). Only correct, timed results count."""
    by_case: dict[str, list[Measurement]] = {}
    for m in measurements:
        if m.status == "ok" and m.ms:
            by_case.setdefault(m.case.key, []).append(m)
    out = []
    for key, ms in by_case.items():
        for lf in (m for m in ms if m.kind == "longflash"):
            for peer in (m for m in ms if m.kind == "peer"):
                out.append(
                    {
                        "case": key,
                        "backend": lf.contender,
                        "peer": peer.contender,
                        "speedup": peer.ms / lf.ms,
                    }
                )
    return out


def run(
    cfg: BenchConfig,
    *,
    console: Console | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Measure every contender on every case; return the results document.

    ``command`` is recorded as given (the CLI passes its argv) so a result can be rerun.
    """
    console = console or Console(stderr=True)
    device = cfg.device or default_device(cfg.framework)
    harness = make_harness(cfg, device)
    cases = make_cases(cfg, device)
    contenders = harness.contenders(cfg.backends, cfg.peers)
    started = datetime.datetime.now().astimezone()

    with _progress(console, progress) as bar:
        task = bar.add_task("ceilings", total=len(cases) * len(contenders) + 1)
        ceilings = harness.ceilings(cfg.quick)
        bar.advance(task)
        measurements: list[Measurement] = []
        for case in cases:
            for c in contenders:
                bar.update(task, description=f"{case.label} · {c.name}")
                measurements.append(harness.measure(case, c))
                bar.advance(task)

    matmul = ceilings.get("matmul", {}).get("tflops")
    finished = datetime.datetime.now().astimezone()
    return {
        "schema": SCHEMA,
        "date": started.isoformat(timespec="seconds"),
        "wall_s": (finished - started).total_seconds(),
        "command": command if command is not None else list(sys.argv),
        "machine": machine_info(harness),
        "versions": versions(),
        "config": {
            "framework": cfg.framework,
            "device": device,
            "quick": cfg.quick,
            "long": cfg.long,
            "timing_policy": dataclasses.asdict(harness.policy),
            "l2_flush": cfg.l2_flush and device == "cuda",
            "check": cfg.check,
            "seed": cfg.seed,
            "timing_method": harness.timing_method,
            "memory_method": harness.memory_method,
            "flop_convention": "fwd 4*B*Hq*Nq*Nk*(Dqk+Dv)/2, /2 if causal; bwd 2.5x fwd",
            "inputs": "random normal, one set per shape shared by all contenders",
        },
        "ceilings": ceilings,
        "contenders": [
            {"name": c.name, "kind": c.kind, "description": c.description, "layout": c.layout}
            for c in contenders
        ],
        "cases": [case.to_json() for case in cases],
        "measurements": [m.to_json(matmul) for m in measurements],
        "ratios": compute_ratios(measurements),
    }


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not enabled,
    )
