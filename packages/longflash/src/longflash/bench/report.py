"""The results document: machine and versions, the JSON file, the summary tables."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

DISTRIBUTIONS = (
    "longflash",
    "longflash-cuda",
    "longflash-triton",
    "longflash-jax",
    "torch",
    "triton",
    "jax",
    "jaxlib",
    "numpy",
)


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Package versions (read from metadata: nothing is imported) and the backends."""
    import longflash

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        out[dist] = _dist_version(dist)
    out["longflash"] = longflash.__version__
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_cuda"] = torch.version.cuda
        cudnn = getattr(torch.backends, "cudnn", None)
        out["cudnn"] = cudnn.version() if cudnn is not None and cudnn.is_available() else None
    out["backends"] = {
        b.name: {
            "available": b.available,
            "reason": b.reason,
            "frameworks": sorted(b.frameworks),
            "devices": sorted(b.devices),
            "priority": b.priority,
        }
        for b in longflash.backends()
    }
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_driver() -> str | None:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def machine_info(harness: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
    }
    info.update(harness.device_info())
    if info.get("gpu"):
        info["gpu"]["driver"] = gpu_driver()
    info["slug"] = device_slug(info)
    return info


def device_slug(machine: dict[str, Any]) -> str:
    if machine.get("gpu"):
        name = machine["gpu"]["name"]
    else:
        # "AMD EPYC 7763 64-Core Processor" -> "cpu-amd-epyc-7763"
        name = "cpu " + re.sub(
            r"\b\d+-core\b|processor|\(r\)|\(tm\)|cpu|@.*", " ", machine.get("cpu", ""), flags=re.I
        )
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown"


def write_json(results: dict[str, Any], out_dir: Path) -> Path:
    """bench-<device>-<yyyymmdd-hhmmss>.json in out_dir (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = re.sub(r"[-:]", "", results["date"][:19]).replace("T", "-")
    path = out_dir / f"bench-{results['machine']['slug']}-{stamp}.json"
    text = json.dumps(_strict(results), indent=1, default=_jsonable, allow_nan=False)
    path.write_text(text + "\n")
    return path


def _strict(x: Any) -> Any:
    # NaN/inf (an error norm over a NaN output) is not JSON: it becomes null.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    return str(x)


# -- tables -------------------------------------------------------------------------------
def rate_unit(results: dict[str, Any]) -> tuple[str, float]:
    """TFLOP/s on a GPU; GFLOP/s on a CPU, where TFLOP/s figures would read 0.0."""
    return ("TFLOP/s", 1.0) if results["config"]["device"] != "cpu" else ("GFLOP/s", 1e3)


def summary_tables(results: dict[str, Any]) -> list[Table]:
    unit, mult = rate_unit(results)
    labels = {c["key"]: c["label"] for c in results["cases"]}
    names = [c["name"] for c in results["contenders"]]
    kinds = {c["name"]: c["kind"] for c in results["contenders"]}
    cell: dict[tuple[str, str], dict] = {
        (m["case"], m["contender"]): m for m in results["measurements"]
    }

    rates = Table(
        title=f"{unit} (median; ✗ = output check failed, – = skipped)", title_justify="left"
    )
    rates.add_column("case", no_wrap=True)
    for n in names:
        rates.add_column(n, justify="right", style="bold" if kinds[n] == "longflash" else "")
    for case in results["cases"]:
        row = [case["label"]]
        for n in names:
            m = cell.get((case["key"], n))
            if m is None or m["tflops"] is None:
                row.append("[dim]–[/dim]")
            else:
                mark = "✗ " if m["status"] == "incorrect" else ""
                row.append(f"{mark}{m['tflops'] * mult:.3g}")
        rates.add_row(*row)
    tables = [rates]

    peers = [n for n in names if kinds[n] == "peer"]
    if results["ratios"] and peers:
        ratios = Table(
            title="speedup of each LongFlash backend over each peer (peer time / LongFlash time)",
            title_justify="left",
        )
        ratios.add_column("case", no_wrap=True)
        ratios.add_column("backend", no_wrap=True)
        for p in peers:
            ratios.add_column(f"vs {p}", justify="right")
        table: dict[tuple[str, str], dict[str, float]] = {}
        for r in results["ratios"]:
            table.setdefault((r["case"], r["backend"]), {})[r["peer"]] = r["speedup"]
        for case in results["cases"]:
            for b in (n for n in names if kinds[n] == "longflash"):
                got = table.get((case["key"], b))
                if got is None:
                    continue
                ratios.add_row(
                    labels[case["key"]], b, *(f"{got[p]:.2f}×" if p in got else "–" for p in peers)
                )
        tables.append(ratios)
    return tables


def skip_reasons(results: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(contender, reason, how many cases) for every distinct skip or failed check."""
    counts: dict[tuple[str, str], int] = {}
    for m in results["measurements"]:
        if m["status"] != "ok":
            key = (m["contender"], m["reason"])
            counts[key] = counts.get(key, 0) + 1
    return [(c, r, n) for (c, r), n in counts.items()]


def print_summary(results: dict[str, Any], console: Console) -> None:
    ceil = results.get("ceilings", {})
    mm, cp = ceil.get("matmul"), ceil.get("copy")
    unit, mult = rate_unit(results)
    parts = []
    if mm:
        parts.append(f"{mm['dtype']} matmul {mm['m']}³: {mm['tflops'] * mult:.4g} {unit}")
    if cp:
        parts.append(f"copy: {cp['tb_per_s'] * 1e3:.4g} GB/s (read + write)")
    m = results["machine"]
    where = m["gpu"]["name"] if m.get("gpu") else m.get("cpu", "?")
    console.print(f"[bold]{where}[/bold] · {results['config']['framework']} · " + " · ".join(parts))
    for t in summary_tables(results):
        console.print(t)
    reasons = skip_reasons(results)
    if reasons:
        console.print("[bold]not measured[/bold]")
        for c, r, n in reasons:
            console.print(f"  {escape(c)}: {escape(r)} [dim]({n} case{'s' if n > 1 else ''})[/dim]")


def compare(a: dict[str, Any], b: dict[str, Any], console: Console) -> Table:
    """Each (case, contender) present in both runs: rate in A, rate in B, B / A."""
    unit, mult = rate_unit(b)
    labels = {c["key"]: c["label"] for c in a["cases"] + b["cases"]}
    ma = {(m["case"], m["contender"]): m for m in a["measurements"] if m["tflops"]}
    t = Table(
        title=f"{unit}: A = {a['date']} ({a['machine']['slug']}), "
        f"B = {b['date']} ({b['machine']['slug']})",
        title_justify="left",
    )
    for col in ("case", "contender", "A", "B", "B / A"):
        t.add_column(col, justify="left" if col in ("case", "contender") else "right")
    for m in b["measurements"]:
        old = ma.get((m["case"], m["contender"]))
        if old is None or not m["tflops"]:
            continue
        t.add_row(
            labels[m["case"]],
            m["contender"],
            f"{old['tflops'] * mult:.3g}",
            f"{m['tflops'] * mult:.3g}",
            f"{m['tflops'] / old['tflops']:.2f}×",
        )
    console.print(t)
    return t


def load(path: str | os.PathLike) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not str(data.get("schema", "")).startswith("longflash-bench/"):
        raise ValueError(f"{path} is not a longflash bench result (no 'schema' key)")
    return data
