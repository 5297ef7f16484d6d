"""The README's results block is generated from the committed result files: it must match
what benchmarks/readme_results.py renders from them today."""

from __future__ import annotations

import json
from pathlib import Path

from _scripts import load_script

rr = load_script("benchmarks/readme_results.py", "readme_results")


def test_readme_block_is_up_to_date():
    assert rr.main(["--check"]) == 0, "run python benchmarks/readme_results.py"


def _bench_doc(
    path: Path,
    *,
    quick: bool,
    ms: dict[str, float],
    framework: str = "torch",
    key: str = "c",
    date: str = "2026-01-01T00:00:00",
) -> None:
    case = {
        "key": key,
        "label": f"fwd d128 N16K {key}",
        "direction": "fwd",
        "causal": False,
        "Dqk": 128,
        "Nq": 16384,
        "Nk": 16384,
    }
    doc = {
        "date": date,
        "config": {"device": "cuda", "framework": framework, "quick": quick},
        "machine": {"gpu": {"name": "GPU"}},
        "command": ["longflash", "bench"],
        "contenders": [{"name": name} for name in ms],
        "cases": [case],
        "measurements": [
            {
                "case": key,
                "contender": name,
                "status": "ok",
                "ms": t,
                "tflops": 100 / t,
                "kind": "longflash" if name == "ours" else "peer",
            }
            for name, t in ms.items()
        ],
    }
    path.write_text(json.dumps(doc))


def test_table_reads_ratios_from_the_files(tmp_path, monkeypatch):
    monkeypatch.setattr(rr, "RESULTS", tmp_path)
    _bench_doc(
        tmp_path / "bench-a.json", quick=False, ms={"ours": 1.0, "sdpa-flash": 2.0, "naive": 9.0}
    )
    # A --quick run is a smoke test: it must not feed the table.
    _bench_doc(tmp_path / "bench-b.json", quick=True, ms={"ours": 100.0, "sdpa-flash": 1.0})
    text = rr.render()
    assert "| `ours` | 100 (2.00× FA2) |" in text
    _bench_doc(tmp_path / "bench-a.json", quick=False, ms={"ours": 1.0, "sdpa-flash": 2.0})
    page = rr.render_bench_page()
    assert "| fwd d128 N16K c | 100 | 50 |" in page
    assert "2.00–2.00× FA2" in text and "9.00–9.00× plain" in text


def test_ratios_pair_only_contenders_of_one_run(tmp_path, monkeypatch):
    """A later run without a peer must not be compared with that peer from an earlier process."""
    monkeypatch.setattr(rr, "RESULTS", tmp_path)
    _bench_doc(
        tmp_path / "bench-a.json",
        quick=False,
        ms={"ours": 1.0, "sdpa-flash": 2.0, "naive": 9.0},
        date="2026-01-01T00:00:00",
    )
    _bench_doc(
        tmp_path / "bench-b.json",
        quick=False,
        ms={"ours": 0.5, "sdpa-flash": 2.0},
        date="2026-01-02T00:00:00",
    )
    text = rr.render()
    assert "| `ours` | 200 (4.00× FA2) |" in text  # the newer run, its own FA2
    assert "4.00–4.00× FA2" in text
    assert "plain" not in text.split("Across every case")[1].split("\n\n")[1]


def test_stale_block_is_reported(tmp_path, monkeypatch):
    readme, page = tmp_path / "README.md", tmp_path / "benchmarks.md"
    readme.write_text(f"x\n{rr.BEGIN}\nold\n{rr.END}\ny\n")
    page.write_text(f"a\n{rr.BENCH_BEGIN}\nold\n{rr.BENCH_END}\nb\n")
    monkeypatch.setattr(rr, "README", readme)
    monkeypatch.setattr(rr, "BENCH_PAGE", page)
    monkeypatch.setattr(rr, "RESULTS", tmp_path)
    assert rr.main(["--check"]) == 1
    assert rr.main([]) == 0 and rr.main(["--check"]) == 0
    assert readme.read_text().startswith("x\n") and readme.read_text().endswith("\ny\n")
    assert "No full GPU run" in page.read_text() and page.read_text().endswith("\nb\n")


def test_jax_runs_get_their_own_table_and_page_section(tmp_path, monkeypatch):
    monkeypatch.setattr(rr, "RESULTS", tmp_path)
    _bench_doc(tmp_path / "bench-t.json", quick=False, ms={"ours": 1.0, "sdpa-flash": 2.0})
    _bench_doc(
        tmp_path / "bench-j.json",
        quick=False,
        framework="jax",
        ms={"ours": 1.0, "pallas-mha": 1.5, "jax-xla": 4.0},
    )
    text = rr.render()
    torch_part, jax_part = text.split("JAX front-end")
    # JAX peers never leak into the torch table, and the other way round.
    assert "| `ours` | 100 (2.00× FA2) |" in torch_part and "XLA" not in torch_part
    assert "| `ours` | 100 (1.50× JAX Pallas, 4.00× XLA) |" in jax_part and "FA2" not in jax_part
    # An older run measuring other cases stays on the bench page; one fully superseded goes.
    _bench_doc(tmp_path / "bench-old.json", quick=False, ms={"ours": 2.0}, key="d", date="2025")
    _bench_doc(tmp_path / "bench-dup.json", quick=False, ms={"ours": 3.0}, date="2025-06")
    page = rr.render_bench_page()
    assert "bench-old.json" in page and "bench-dup.json" not in page
    assert "bench-t.json" in page and "bench-j.json" in page
