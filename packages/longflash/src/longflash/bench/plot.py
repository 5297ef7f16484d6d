"""The PNG beside each results file: throughput against sequence length per (direction,
mask, head dim), one line per contender, the measured matmul rate dashed; and peak memory
against sequence length. Needs matplotlib (the `bench` extra)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from longflash.bench.cases import short_dtype
from longflash.bench.report import rate_unit

# Solid thick lines for LongFlash, thin ones for peers; a colour per contender that stays
# the same in every panel.
_MARKERS = "os^Dv<>pPX*h"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(results: dict[str, Any], path: str | Path) -> Path | None:
    """Write the figure to ``path``; warn and return None when matplotlib is missing."""
    if not have_matplotlib():
        warnings.warn(
            "matplotlib is not installed, so no plot was written (pip install 'longflash[bench]')",
            stacklevel=2,
        )
        return None
    fig = figure(results)
    if fig is None:
        return None
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def figure(results: dict[str, Any]):
    """The matplotlib Figure of a results dict (None when it has no case)."""
    from matplotlib.figure import Figure

    unit, mult = rate_unit(results)
    cases = {c["key"]: c for c in results["cases"]}
    contenders = results["contenders"]
    dtypes = sorted({c["dtype"] for c in cases.values()})
    columns = sorted(
        {(c["direction"], c["causal"]) for c in cases.values()},
        key=lambda dc: (dc[0] != "fwd", dc[1]),
    )
    head_dims = sorted({c["Dqk"] for c in cases.values()})
    if not columns:
        return None
    mem_dim = 128 if 128 in head_dims else head_dims[-1]

    # series[(direction, causal, head dim)][(contender, dtype)] = [(N, rate, mem)]
    series: dict[tuple, dict[tuple, list]] = {}
    for m in results["measurements"]:
        if m["status"] != "ok" or m["tflops"] is None:
            continue
        c = cases[m["case"]]
        panel = series.setdefault((c["direction"], c["causal"], c["Dqk"]), {})
        panel.setdefault((m["contender"], c["dtype"]), []).append(
            (c["Nq"], m["tflops"] * mult, m["peak_mem_bytes"])
        )

    colors = _colors(len(contenders))
    style = {c["name"]: (colors[i], _MARKERS[i % len(_MARKERS)]) for i, c in enumerate(contenders)}
    dashes = {d: ls for d, ls in zip(dtypes, ("-", "--", ":", "-."))}

    nrows, ncols = len(head_dims) + 1, len(columns)
    fig = Figure(figsize=(4.6 * ncols + 2.4, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    ceiling = results.get("ceilings", {}).get("matmul")
    handles: dict[str, Any] = {}
    seqlens = sorted({c["Nq"] for c in cases.values()})

    mems = [
        p[2] for panel in series.values() for pts in panel.values() for p in pts if p[2] is not None
    ]
    mem_unit, mem_div = ("GiB", 2**30) if mems and max(mems) >= 2**30 else ("MiB", 2**20)

    def draw(ax, key, value_index: int) -> None:
        panel = series.get(key, {})
        for c in contenders:  # the order of the run: LongFlash first, then the peers
            for dtype in dtypes:
                pts = sorted(
                    p for p in panel.get((c["name"], dtype), []) if p[value_index] is not None
                )
                if not pts:
                    continue
                color, marker = style[c["name"]]
                lf = c["kind"] == "longflash"
                label = c["name"] if len(dtypes) == 1 else f"{c['name']} ({short_dtype(dtype)})"
                div = mem_div if value_index == 2 else 1
                (line,) = ax.plot(
                    [p[0] for p in pts],
                    [p[value_index] / div for p in pts],
                    color=color,
                    marker=marker,
                    markersize=5 if lf else 4,
                    linewidth=2.4 if lf else 1.2,
                    linestyle=dashes[dtype],
                    label=label,
                    zorder=3 if lf else 2,
                )
                handles.setdefault(label, line)

    for col, (direction, causal) in enumerate(columns):
        mask = "causal" if causal else "no mask"
        for row, d in enumerate(head_dims):
            ax = axes[row][col]
            draw(ax, (direction, causal, d), 1)
            if ceiling:
                label = f"{ceiling['dtype']} matmul {ceiling['m']}³ (measured)"
                h = ax.axhline(
                    ceiling["tflops"] * mult, color="0.35", linestyle="--", linewidth=1.2, zorder=1
                )
                handles.setdefault(label, h)
            ax.set_title(f"{direction}, {mask}, head dim {d}", fontsize=10)
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
            _seq_axis(ax, seqlens)
        ax = axes[-1][col]
        draw(ax, (direction, causal, mem_dim), 2)
        what = "forward" if direction == "fwd" else "forward + backward"
        ax.set_title(f"peak memory, {what}, {mask}, head dim {mem_dim}", fontsize=10)
        ax.set_ylabel(f"{mem_unit} above inputs")
        _memory_axis(ax)
        _seq_axis(ax, seqlens)

    m = results["machine"]
    where = m["gpu"]["name"] if m.get("gpu") else m.get("cpu", "")
    shapes = _shape_note(list(cases.values()))
    fig.suptitle(
        f"LongFlash bench · {where} · {results['config']['framework']} · "
        f"{', '.join(short_dtype(d) for d in dtypes)} · {results['date'][:10]}\n{shapes}",
        fontsize=11,
    )
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="outside right center",
        fontsize=9,
        frameon=False,
    )
    return fig


def _memory_axis(ax) -> None:
    """Log scale when the panel's lines span a decade or more (plain attention's N² next to the
    O(N) kernels), else linear from 0: inside one decade a log axis has no labelled tick."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if ys and max(ys) >= 10 * min(ys):
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, 1.15 * max(ys, default=1.0))


def _seq_axis(ax, seqlens: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens)
    ax.set_xticklabels([f"{n // 1024}K" if n >= 1024 else str(n) for n in seqlens], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("sequence length N")
    ax.grid(True, alpha=0.3)


def _shape_note(cases: list[dict]) -> str:
    tokens = sorted({c["B"] * c["Nq"] for c in cases})
    widths = sorted({c["Hq"] * c["Dqk"] for c in cases})
    heads = sorted({c["Hq"] for c in cases})
    parts = []
    if len(tokens) == 1:
        parts.append(f"B·N = {tokens[0]}")
    else:
        parts.append("batch = max(1, tokens / N)")
    parts.append(f"H·D = {widths[0]}" if len(widths) == 1 else f"H = {'/'.join(map(str, heads))}")
    return ", ".join(parts) + "; FLOPs: fwd 4·B·H·N²·D (½ causal), bwd 2.5× fwd"


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
