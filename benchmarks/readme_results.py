"""The README's results section, generated from the result files under benchmarks/results/.

Every figure in the block between the README's ``<!-- results:begin -->`` and
``<!-- results:end -->`` markers is read from a committed JSON file, so the README cannot
drift from what was measured:

  python benchmarks/readme_results.py          # rewrite the blocks (README, docs/benchmarks.md)
  python benchmarks/readme_results.py --check  # exit 1 if the block is stale (a test runs this)

Sources: the GPU runs of ``longflash bench`` (bench-*.json, not --quick; where several
files measured the same case and contender, the newest wins), ``benchmarks/max_context.py``
(max-context-*.json), ``benchmarks/ring.py`` (ring-single-*.json, ring-multi-*.json,
ring-jax-*.json) and ``benchmarks/io.py``
(io-*.json). Only the standard library is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BENCH_PAGE = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
BENCH_BEGIN, BENCH_END = "<!-- bench:begin -->", "<!-- bench:end -->"
#: Peers shown beside the LongFlash backends, per front-end of `longflash bench`.
PEERS = {
    "torch": ("sdpa-flash", "sdpa-cudnn", "flex"),
    "jax": ("pallas-mha", "jax-cudnn", "jax-xla"),
}
PEER_NAMES = {
    "sdpa-flash": "FA2",
    "sdpa-cudnn": "cuDNN",
    "flex": "Flex",
    "naive": "plain",
    "pallas-mha": "JAX Pallas",
    "jax-cudnn": "JAX cuDNN",
    "jax-xla": "XLA",
}
HEADLINE_D, HEADLINE_N = 128, 16384


def _load(pattern: str) -> list[tuple[Path, dict]]:
    out = []
    for p in sorted(RESULTS.glob(pattern)):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{p}: unreadable result file: {exc}") from exc
    return out


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def gpu_bench_docs(framework: str = "torch") -> list[tuple[Path, dict]]:
    """Full (not --quick) runs of `longflash bench` on a GPU through one front-end, oldest
    first."""
    docs = []
    for path, doc in _load("bench-*.json"):
        cfg = doc.get("config", {})
        if (
            cfg.get("device") == "cuda"
            and cfg.get("framework", "torch") == framework
            and not cfg.get("quick")
        ):
            docs.append((path, doc))
    return sorted(docs, key=lambda pd: pd[1].get("date", ""))


def merged_measurements(docs: Iterable[tuple[Path, dict]]) -> dict[tuple[str, str], dict]:
    """(case key, contender) -> the latest measurement, joined with its case and source file,
    and with `same_run`: every contender's measurement of that case in the same run (ratios are
    taken only between those)."""
    merged: dict[tuple[str, str], dict] = {}
    for path, doc in docs:
        cases = {c["key"]: c for c in doc["cases"]}
        ok = [m for m in doc["measurements"] if m.get("status") == "ok" and m.get("ms")]
        runs: dict[str, dict[str, dict]] = {}
        for m in ok:
            runs.setdefault(m["case"], {})[m["contender"]] = m
        for m in ok:
            merged[(m["case"], m["contender"])] = dict(
                m,
                case_info=cases[m["case"]],
                source=path.name,
                gpu=doc["machine"]["gpu"],
                same_run=runs[m["case"]],
            )
    return merged


def _cell(ms: dict[str, dict], name: str, peers: Iterable[str]) -> str:
    m = ms.get(name)
    if m is None:
        return "–"
    # A ratio only against a peer timed in the same run as this measurement.
    ratios = [
        f"{m_p['ms'] / m['ms']:.2f}× {PEER_NAMES[p]}"
        for p in peers
        if (m_p := m["same_run"].get(p))
    ]
    return f"{m['tflops']:.0f}" + (f" ({', '.join(ratios)})" if ratios else "")


def kernel_table(merged: dict[tuple[str, str], dict], framework: str = "torch") -> list[str]:
    """hd128, N = 16K (the issues' headline shape): one row per LongFlash backend."""
    by_case: dict[str, dict[str, dict]] = {}
    for (_key, contender), m in merged.items():
        c = m["case_info"]
        if c["Dqk"] == HEADLINE_D and c["Nq"] == HEADLINE_N and c["Nk"] == HEADLINE_N:
            by_case.setdefault(f"{c['direction']}{' causal' if c['causal'] else ''}", {})[
                contender
            ] = m
    cols = ("fwd", "fwd causal", "bwd", "bwd causal")
    if not by_case:
        return ["_No full GPU run of `longflash bench` at head dim 128, N = 16K is committed._"]
    ours = sorted({n for ms in by_case.values() for n, m in ms.items() if m["kind"] == "longflash"})
    peers = [p for p in PEERS[framework] if any(p in ms for ms in by_case.values())]
    lines = [
        "| backend | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name in ours + peers:
        label = f"`{name}`" if name in ours else f"{name} (peer)"
        row = [_cell(by_case.get(c, {}), name, peers if name in ours else ()) for c in cols]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    sources = sorted({m["source"] for ms in by_case.values() for m in ms.values()})
    gpu = next(iter(next(iter(by_case.values())).values()))["gpu"]["name"]
    # The matmul ceiling is timed through the run's own framework; JAX's 8192³ bf16 dot runs
    # well below cuBLAS through torch, so only the torch runs' fractions are comparable.
    fractions = [
        f"`{n}` {m['fraction_of_matmul']:.2f}"
        for n in ours
        if framework == "torch"
        and (m := by_case.get("fwd", {}).get(n))
        and m.get("fraction_of_matmul")
    ]
    lines += [
        "",
        f"TFLOP/s on one {gpu}, bf16, head dim {HEADLINE_D}, N = {_k(HEADLINE_N)}, "
        "batch × N = 16K tokens, 16 heads; in brackets the speed-up over each peer timed in "
        f"the same process. Source: {', '.join(f'`{s}`' for s in sources)}."
        + (
            f" Forward as a fraction of the bf16 matmul rate measured in the same run: "
            f"{', '.join(fractions)}."
            if fractions
            else ""
        ),
    ]
    return lines


def best_speedups(merged: dict[tuple[str, str], dict]) -> list[str]:
    """Per LongFlash backend: the largest and smallest speed-up over FA2 and over plain
    PyTorch attention across every measured case (the claim 'up to ...' with its range)."""
    by_case: dict[str, dict[str, dict]] = {}
    for (key, contender), m in merged.items():
        by_case.setdefault(key, {})[contender] = m
    lines = []
    ours = sorted({n for (_, n), m in merged.items() if m["kind"] == "longflash"})
    for name in ours:
        parts = []
        for peer in ("sdpa-flash", "naive"):
            pairs = [
                (m_p["ms"] / ms[name]["ms"], ms[name]["case_info"])
                for ms in by_case.values()
                if name in ms and (m_p := ms[name]["same_run"].get(peer))
            ]
            if not pairs:
                continue
            lo, hi = min(pairs, key=lambda p: p[0]), max(pairs, key=lambda p: p[0])
            ns = sorted({c["Nq"] for _, c in pairs})
            parts.append(
                f"{lo[0]:.2f}–{hi[0]:.2f}× {PEER_NAMES[peer]} over {len(pairs)} cases "
                f"(N {_k(ns[0])}–{_k(ns[-1])}; best: {hi[1]['label']})"
            )
        if parts:
            lines.append(f"- `{name}`: " + "; ".join(parts))
    return lines


def context_lines() -> list[str]:
    lines = []
    docs = _load("max-context-*.json")
    if docs:
        path, doc = docs[-1]
        for s in doc["summary"]:
            bound = f"≥ {s['lower']:.1f}×" if s.get("upper") is None else f"{s['ratio']:.1f}×"
            stopped = (
                ""
                if s.get("longflash_first_fail")
                else " (search stopped by its time budget: a lower bound)"
            )
            lines.append(
                f"- LLaMA-architecture **{s['config'].upper()}** training step: "
                f"plain PyTorch attention fits "
                f"{_k(s['baseline_max'])} tokens, LongFlash {_k(s['longflash_max'])}{stopped}: "
                f"{bound} longer (`{path.name}`)."
            )
    docs = _load("ring-single-*.json")
    if docs:
        path, doc = docs[-1]
        t1, cfg = doc["t1"], doc["config"]
        lines.append(
            f"- One causal attention over **{cfg['seqlen']:,} tokens** ({cfg['heads']} heads, "
            f"head dim {cfg['dim']}, {doc['backend']}): forward {t1['fwd_ms'] / 1e3:.1f} s "
            f"({t1['fwd_tflops']:.0f} TFLOP/s), backward {t1['bwd_ms'] / 1e3:.1f} s "
            f"({t1['bwd_tflops']:.0f} TFLOP/s), {t1['peak_mem_gib']:.1f} GiB (`{path.name}`)."
        )
    for pattern, front in (("ring-multi-*.json", ""), ("ring-jax-*.json", "JAX shard_map, ")):
        docs = [(p, d) for p, d in _load(pattern) if d.get("summary")]
        if docs:
            # the longest sequence, newest among equals
            lines.append(_ring_line(*max(docs, key=lambda pd: pd[1]["config"]["seqlen"]), front))
    docs = _load("io-*.json")
    if docs:
        path, doc = docs[-1]
        rows = [r for r in doc["rows"] if r.get("d") == HEADLINE_D and r.get("N") == HEADLINE_N]
        ratio = _io_ratio(rows)
        if ratio:
            lines.append(
                f"- HBM traffic at head dim {HEADLINE_D}, N = {_k(HEADLINE_N)} (Nsight Compute): "
                f"plain PyTorch attention moves {ratio['fwd']:.0f}× (forward) and "
                f"{ratio['bwd']:.0f}× (backward) the DRAM bytes of ours (`{path.name}`)."
            )
    return lines


def _ring_line(path: Path, doc: dict, front: str) -> str:
    """One line of benchmarks/ring.py's multi-GPU run (torchrun or JAX): each variant's time,
    same-N speed-up and weak-scaling efficiency, and the check against one GPU."""
    rows = {f"{r['fn']} {r['layout']}": r for r in doc["summary"]}
    world, cfg = doc["ring"]["world"], doc["config"]
    gpu = (doc["machine"].get("gpu") or {}).get("name", "GPU")
    parts = [
        f"{name} {r['fwd_bwd_ms'] / 1e3:.2f} s ({r['speedup']:.2f}×, weak-scaling "
        f"efficiency {r['efficiency_weak']:.2f})"
        for name, r in rows.items()
        if "speedup" in r and "efficiency_weak" in r
    ]
    checked = [r for r in rows.values() if "check_ok" in r]
    check = ""
    if checked and all(r["check_ok"] for r in checked):
        worst = max(e for r in checked for e in r["check_rel_error"].values())
        first = doc["check"][0]  # torchrun: one list per rank; JAX: one entry per variant
        ref = (first[0] if isinstance(first, list) else first)["reference_backend"]
        check = (
            f"; every output and gradient checked against one GPU's {ref} result "
            f"(relative error ≤ {worst:.1e})"
        )
    backend = doc["ring"]["backend"]
    return (
        f"- The same attention over **{cfg['seqlen']:,} tokens on {world} {gpu}s** "
        f"({front}{backend}, forward + backward; one GPU with {backend}: "
        f"{doc['t1']['fwd_bwd_ms'] / 1e3:.2f} s): "
        + "; ".join(parts)
        + check
        + f" (`{path.name}`)."
    )


def _io_ratio(rows: list[dict]) -> dict[str, float]:
    out = {}
    for r in rows:
        ours, naive = r.get("ours_measured") or {}, r.get("naive_measured") or {}
        if ours.get("status") == naive.get("status") == "ok" and ours.get("dram"):
            out[r["direction"]] = naive["dram"] / ours["dram"]
    return out if len(out) == 2 else {}


def render() -> str:
    merged = merged_measurements(gpu_bench_docs())
    lines = [BEGIN, "<!-- generated by benchmarks/readme_results.py: do not edit by hand -->", ""]
    lines += kernel_table(merged)
    speed = best_speedups(merged)
    if speed:
        lines += ["", "Across every case of those runs (bf16, forward and backward):", ""] + speed
    jax_runs = merged_measurements(gpu_bench_docs("jax"))
    if jax_runs:
        lines += ["", "Through the JAX front-end (`longflash bench --framework jax`):", ""]
        lines += kernel_table(jax_runs, "jax")
    context = context_lines()
    if context:
        lines += ["", "Long context and memory:", ""] + context
    lines.append(END)
    return "\n".join(lines)


def render_bench_page() -> str:
    """docs/benchmarks.md: per front-end, the newest full GPU run and every older one that
    measured cases the newer ones did not (e.g. other head dims); every contender, the PNG."""
    lines = [BENCH_BEGIN, "<!-- generated by benchmarks/readme_results.py: do not edit by hand -->"]
    shown_any = False
    for framework in ("torch", "jax"):
        seen: set[str] = set()
        for path, doc in reversed(gpu_bench_docs(framework)):
            keys = {c["key"] for c in doc["cases"]}
            if keys <= seen:
                continue
            seen |= keys
            lines += _bench_run(path, doc)
            shown_any = True
    if not shown_any:
        lines.append("_No full GPU run of `longflash bench` is committed yet._")
    lines.append(BENCH_END)
    return "\n".join(lines)


def _bench_run(path: Path, doc: dict) -> list[str]:
    gpu, ceil = doc["machine"]["gpu"]["name"], doc.get("ceilings", {}).get("matmul") or {}
    names = [c["name"] for c in doc["contenders"]]
    got = {(m["case"], m["contender"]): m for m in doc["measurements"]}
    shown = [n for n in names if any(got.get((c["key"], n), {}).get("ms") for c in doc["cases"])]
    lines = [
        "",
        f"`{' '.join(doc['command'])}` on one {gpu}, {doc['date'][:10]} "
        f"(`{path.name}`). TFLOP/s, median of the timed runs with the L2 flushed; "
        "– = skipped (reason in the JSON)."
        + (
            f" Measured bf16 matmul rate in the same run: {ceil['tflops']:.0f} TFLOP/s "
            f"({ceil['m']}³)."
            if ceil
            else ""
        ),
        "",
        "| case | " + " | ".join(shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for c in doc["cases"]:
        cells = []
        for n in shown:
            m = got.get((c["key"], n), {})
            cells.append(
                f"{m['tflops']:.0f}" if m.get("status") == "ok" and m.get("tflops") else "–"
            )
        lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    png = path.with_suffix(".png")
    if png.exists():
        lines += ["", f"![{path.stem}](../benchmarks/results/{png.name})"]
    return lines


def _replace_block(text: str, begin: str, end: str, block: str, name: str) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{name} has no {begin} … {end} block")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


def updated_readme(text: str) -> str:
    return _replace_block(text, BEGIN, END, render(), "README.md")


def updated_bench_page(text: str) -> str:
    return _replace_block(text, BENCH_BEGIN, BENCH_END, render_bench_page(), "docs/benchmarks.md")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    args = ap.parse_args(argv)
    stale = []
    for path, update in ((README, updated_readme), (BENCH_PAGE, updated_bench_page)):
        text = path.read_text()
        new = update(text)
        if new == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(new)
            print(f"rewrote the results block of {path}")
    if args.check and stale:
        names = ", ".join(p.name for p in stale)
        print(f"stale results block in {names}: run python benchmarks/readme_results.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
