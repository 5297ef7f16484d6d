"""The ``longflash`` command: ``info`` (versions, devices, backends) and ``bench``.

Frameworks are imported only by the subcommand that needs them, so ``longflash info``
works, and says so, when torch or jax is missing or broken.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

PACKAGES = (
    "longflash",
    "longflash-cuda",
    "longflash-triton",
    "longflash-jax",
    "torch",
    "triton",
    "jax",
    "jaxlib",
    "numpy",
    "rich",
    "matplotlib",
)


# -- info ---------------------------------------------------------------------------------
def collect_info() -> dict[str, Any]:
    """Everything ``longflash info`` shows, as plain data."""
    import longflash

    info: dict[str, Any] = {
        "longflash": longflash.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {},
        "torch": None,
        "jax": None,
        "triton": None,
    }
    for dist in PACKAGES:
        try:
            info["packages"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info["packages"][dist] = None
    info["torch"] = _torch_info()
    info["jax"] = _jax_info()
    info["triton"] = _triton_info()
    info["backends"] = [
        {
            "name": b.name,
            "available": b.available,
            "reason": b.reason,
            "frameworks": sorted(b.frameworks),
            "devices": sorted(b.devices),
            "priority": b.priority,
        }
        for b in longflash.backends()
    ]
    return info


def _torch_info() -> dict[str, Any] | None:
    try:
        torch = importlib.import_module("torch")
    except Exception as exc:  # missing, or broken: say which
        return (
            None
            if isinstance(exc, ImportError) and "torch" in str(exc) and "No module" in str(exc)
            else {"error": f"{type(exc).__name__}: {exc}"}
        )
    out: dict[str, Any] = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
    }
    if out["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["devices"].append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_bytes": p.total_memory,
                    "multiprocessors": p.multi_processor_count,
                }
            )
        cudnn = torch.backends.cudnn
        out["cudnn"] = cudnn.version() if cudnn.is_available() else None
    return out


def _jax_info() -> dict[str, Any] | None:
    try:
        jax = importlib.import_module("jax")
    except Exception as exc:
        return (
            None
            if isinstance(exc, ImportError) and "No module" in str(exc)
            else {"error": f"{type(exc).__name__}: {exc}"}
        )
    out: dict[str, Any] = {"version": jax.__version__}
    try:
        out["default_backend"] = jax.default_backend()
        out["devices"] = [
            {"id": d.id, "platform": d.platform, "kind": getattr(d, "device_kind", "")}
            for d in jax.devices()
        ]
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _triton_info() -> dict[str, Any] | None:
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:
        return (
            None
            if isinstance(exc, ImportError) and "No module" in str(exc)
            else {"error": f"{type(exc).__name__}: {exc}"}
        )
    return {"version": triton.__version__}


def print_info(info: dict[str, Any], console: Console) -> None:
    console.print(
        f"[bold]LongFlash {info['longflash']}[/bold] · Python {info['python']} · {info['platform']}"
    )

    versions = Table(title="packages", title_justify="left")
    versions.add_column("package")
    versions.add_column("version")
    for name, ver in info["packages"].items():
        versions.add_row(name, ver or "[dim]not installed[/dim]")
    console.print(versions)

    devices = Table(title="devices", title_justify="left")
    for col in ("framework", "device", "name", "capability", "memory"):
        devices.add_column(col)
    t = info["torch"]
    if t is None:
        devices.add_row("torch", "–", "[dim]not installed[/dim]", "", "")
    elif "error" in t:
        devices.add_row("torch", "–", f"[red]{escape(t['error'])}[/red]", "", "")
    else:
        build = (
            f"CUDA {t['cuda']}"
            if t["cuda"]
            else ("ROCm " + t["hip"] if t.get("hip") else "CPU build")
        )
        if not t["devices"]:
            devices.add_row(f"torch {t['version']}", "cpu", f"no GPU ({build})", "", "")
        for d in t["devices"]:
            devices.add_row(
                f"torch {t['version']}",
                f"cuda:{d['index']}",
                d["name"],
                f"sm_{d['capability'].replace('.', '')}",
                f"{d['memory_bytes'] / 2**30:.1f} GiB",
            )
    j = info["jax"]
    if j is None:
        devices.add_row("jax", "–", "[dim]not installed[/dim]", "", "")
    elif "error" in j and "devices" not in j:
        devices.add_row("jax", "–", f"[red]{escape(j['error'])}[/red]", "", "")
    else:
        for d in j.get("devices", []):
            devices.add_row(f"jax {j['version']}", f"{d['platform']}:{d['id']}", d["kind"], "", "")
    console.print(devices)

    backends = Table(title="backends", title_justify="left")
    for col in ("backend", "available", "frameworks", "devices", "priority", "reason"):
        backends.add_column(col, overflow="fold")
    for b in info["backends"]:
        # Priority matters only among available backends ("auto" tries the highest).
        backends.add_row(
            b["name"],
            "[green]yes[/green]" if b["available"] else "[red]no[/red]",
            ", ".join(b["frameworks"]),
            ", ".join(b["devices"]),
            str(b["priority"]) if b["available"] else "",
            escape(b["reason"]),
        )
    console.print(backends)


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print_info(info, _console())
    return 0


# -- bench --------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        mult, t = 1024, t[:-1]
    elif t.endswith("m"):
        mult, t = 1024 * 1024, t[:-1]
    try:
        n = int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 4K, 1M)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return n


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return n


def _sizes(text: str) -> list[int]:
    return [_size(t) for t in _csv(text)]


def _names(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else _csv(text)


def _dtypes(text: str) -> list[str]:
    from longflash.bench.cases import parse_dtype

    try:
        return [parse_dtype(t) for t in _csv(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _directions(text: str) -> list[str]:
    out = _csv(text)
    bad = [d for d in out if d not in ("fwd", "bwd")]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"directions are fwd and/or bwd, got {text!r}")
    return out


def default_out_dir() -> Path:
    results = Path("benchmarks") / "results"
    return results if results.is_dir() else Path(".")


def cmd_bench(args: argparse.Namespace) -> int:
    from longflash.bench import report

    console = _console()
    if args.compare:
        a, b = (report.load(p) for p in args.compare)
        report.compare(a, b, console)
        return 0

    from longflash.bench.runner import BenchConfig, run

    causal = [True] if args.causal == "yes" else [False] if args.causal == "no" else [False, True]
    cfg = BenchConfig(
        framework=args.framework,
        device=args.device,
        backends=args.backends,
        peers=args.peers,
        head_dims=args.head_dims,
        seqlens=args.seqlens,
        batch_tokens=args.batch_tokens,
        heads=args.heads,
        kv_heads=args.kv_heads,
        causal=causal,
        directions=args.directions,
        dtypes=args.dtype,
        reps=args.reps,
        quick=args.quick,
        long=args.long,
        l2_flush=not args.no_l2_flush,
        check=not args.no_check,
        seed=args.seed,
    )
    out_dir = Path(args.out) if args.out else default_out_dir()
    if not args.no_plot:
        from longflash.bench.plot import have_matplotlib

        if not have_matplotlib():
            console.print(
                "[yellow]warning:[/yellow] matplotlib is not installed; the plot "
                "is skipped (pip install 'longflash[bench]')"
            )
            args.no_plot = True
    t0 = time.perf_counter()
    results = run(
        cfg,
        console=Console(stderr=True),
        progress=not args.quiet,
        command=["longflash", *args.argv],
    )
    path = report.write_json(results, out_dir)
    report.print_summary(results, console)
    console.print(f"results: {path}")
    if not args.no_plot:
        from longflash.bench.plot import plot

        png = plot(results, path.with_suffix(".png"))
        if png is not None:
            console.print(f"plot:    {png}")
    console.print(f"wall time: {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from longflash.bench import report
    from longflash.bench.plot import plot

    results = report.load(args.results)
    out = Path(args.output) if args.output else Path(args.results).with_suffix(".png")
    png = plot(results, out)
    if png is None:
        return 1
    _console().print(f"plot: {png}")
    return 0


def _console() -> Console:
    # Piped into a log, rich would fold the wide tables at 80 columns.
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    return Console(width=width, soft_wrap=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longflash", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices and backends (with reasons)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    b = sub.add_parser(
        "bench",
        help="time every backend against SDPA, FlexAttention, cuDNN, plain attention",
        description="Time every installed LongFlash backend and the peers side by side; "
        "write JSON and a PNG. Defaults depend on the device (see "
        "benchmarks/README.md).",
    )
    b.add_argument("--framework", choices=("torch", "jax"), default="torch")
    b.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: the GPU when there is one"
    )
    b.add_argument(
        "--backends",
        type=_names,
        default=None,
        help="LongFlash backends, comma-separated, or none (default: every "
        "available one; on a GPU without the reference)",
    )
    b.add_argument(
        "--peers",
        type=_names,
        default=None,
        help="peers, comma-separated, or none. torch: sdpa-flash, sdpa-cudnn, "
        "sdpa-efficient, sdpa-math, flex, naive; jax: jax-cudnn, jax-xla, "
        "pallas-mha, naive",
    )
    b.add_argument("--head-dims", type=_sizes, default=None, help="e.g. 64,128,256")
    b.add_argument("--seqlens", type=_sizes, default=None, help="e.g. 1K,2K,4K")
    b.add_argument(
        "--batch-tokens",
        type=_size,
        default=None,
        help="batch = max(1, this / seqlen) (GPU default 16K)",
    )
    b.add_argument(
        "--heads", type=_positive, default=None, help="query heads (GPU default: 2048 / head dim)"
    )
    b.add_argument(
        "--kv-heads",
        type=_positive,
        default=None,
        help="key/value heads for GQA (default: = heads)",
    )
    mask = b.add_mutually_exclusive_group()
    mask.add_argument(
        "--causal", dest="causal", action="store_const", const="yes", help="causal only"
    )
    mask.add_argument(
        "--no-causal", dest="causal", action="store_const", const="no", help="no mask only"
    )
    mask.add_argument(
        "--both", dest="causal", action="store_const", const="both", help="both (default)"
    )
    b.add_argument(
        "--directions", type=_directions, default=["fwd", "bwd"], help="fwd,bwd (default both)"
    )
    b.add_argument(
        "--dtype",
        type=_dtypes,
        default=None,
        help="bf16,fp16,fp32 (default: bf16 on a GPU, fp32 on a CPU)",
    )
    b.add_argument(
        "--reps",
        type=_positive,
        default=None,
        help="timed runs per measurement (default: as many as fit in 0.25 s on "
        "a GPU, 5 to 1000; in 0.15 s on a CPU, 3 to 30)",
    )
    b.add_argument("--quick", action="store_true", help="a few-second smoke run")
    b.add_argument(
        "--long",
        action="store_true",
        help="longer sequences: on a GPU up to 128K (batch 1 beyond 16K), on a CPU up to 16K",
    )
    b.add_argument(
        "--out",
        default=None,
        help="output folder (default: benchmarks/results if it exists, else .)",
    )
    b.add_argument("--no-plot", action="store_true", help="write no PNG")
    b.add_argument("--no-check", action="store_true", help="skip the output check on sampled rows")
    b.add_argument(
        "--no-l2-flush",
        action="store_true",
        help="do not flush the GPU's L2 cache between timed runs",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="compare two result files instead of running",
    )
    b.set_defaults(func=cmd_bench, causal="both")

    pl = sub.add_parser("plot", help="(re)draw the PNG of a bench result file")
    pl.add_argument("results", help="a bench-*.json file")
    pl.add_argument("-o", "--output", default=None, help="PNG path (default: beside the JSON)")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, RuntimeError, ImportError) as exc:
        # Bad options (unknown backend, no GPU for --device cuda, framework not
        # installed): one line, no traceback; LONGFLASH_DEBUG=1 shows it.
        if os.environ.get("LONGFLASH_DEBUG"):
            raise
        print(f"longflash {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
