"""The `longflash` command: info, bench --quick end to end, compare, plot."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest

torch = pytest.importorskip("torch")

from longflash import cli  # noqa: E402
from longflash.bench import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def one_thread():
    # Two shared cores: OpenMP barriers across busy cores turn microsecond ops into
    # milliseconds. Timings are not asserted, so one thread changes nothing tested.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench")
    rc = cli.main(["bench", "--quick", "--out", str(out), "--quiet"])
    assert rc == 0
    files = sorted(out.iterdir())
    return out, files


def test_info_prints_backends(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for word in ("LongFlash", "packages", "devices", "backends", "reference", "torch"):
        assert word in text


def test_info_json_is_machine_readable(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"longflash", "python", "packages", "torch", "jax", "triton", "backends"} <= set(info)
    names = {b["name"]: b for b in info["backends"]}
    assert names["reference"]["available"] is True
    # First-party backends are listed even when their package is missing, with why.
    for name in ("cuda", "triton", "pallas"):
        assert name in names
        assert names[name]["available"] or names[name]["reason"]
    assert info["torch"]["version"] == torch.__version__
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()


def test_console_script_entry_point():
    (ep,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "longflash"]
    assert ep.value == "longflash.cli:main" and ep.load() is cli.main
    # One fresh process: the command and the bench package import no framework until a
    # subcommand needs one (DESIGN §3), and the script runs from a clean interpreter.
    code = (
        "import sys, longflash.cli, longflash.bench; "
        "bad = {'torch', 'jax', 'triton', 'matplotlib'} & set(sys.modules); "
        "assert not bad, bad; sys.exit(longflash.cli.main(['info', '--json']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["longflash"]


def test_bench_quick_writes_json_and_png(quick_run):
    out, files = quick_run
    jsons = [f for f in files if f.suffix == ".json"]
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(jsons) == 1 and len(pngs) == 1
    assert pngs[0].stem == jsons[0].stem
    assert jsons[0].name.startswith("bench-cpu-") or jsons[0].name.startswith("bench-")
    assert pngs[0].read_bytes()[:8] == PNG_MAGIC

    data = json.loads(jsons[0].read_text())
    assert set(data) >= {
        "schema",
        "date",
        "command",
        "machine",
        "versions",
        "config",
        "ceilings",
        "contenders",
        "cases",
        "measurements",
        "ratios",
    }
    assert data["schema"] == "longflash-bench/1"
    assert data["command"][:2] == ["longflash", "bench"]
    assert {"hostname", "cpu", "gpu", "slug"} <= set(data["machine"])
    assert {"python", "torch", "triton", "jax", "longflash", "backends"} <= set(data["versions"])
    assert data["ceilings"]["matmul"]["tflops"] > 0
    assert data["ceilings"]["copy"]["tb_per_s"] > 0
    assert data["config"]["memory_method"] in ("rss-peak", "maxrss-delta")

    names = [c["name"] for c in data["contenders"]]
    assert {"sdpa-math", "naive"} <= set(names)
    assert any(c["kind"] == "longflash" for c in data["contenders"])
    # --quick: fwd and bwd, causal and not, two sequence lengths.
    assert {(c["direction"], c["causal"]) for c in data["cases"]} == {
        ("fwd", False),
        ("fwd", True),
        ("bwd", False),
        ("bwd", True),
    }
    assert len(data["measurements"]) == len(data["cases"]) * len(names)

    for m in data["measurements"]:
        assert {
            "case",
            "contender",
            "kind",
            "status",
            "reason",
            "ms",
            "tflops",
            "flops",
            "peak_mem_bytes",
            "max_rel_err",
        } <= set(m)
        if m["status"] == "ok":
            assert m["ms"] > 0 and m["tflops"] > 0 and m["reps"] >= 1
            assert m["peak_mem_bytes"] is not None and m["peak_mem_bytes"] >= 0
            assert m["max_rel_err"] < 2e-3
        else:
            assert m["reason"]
    naive = [m for m in data["measurements"] if m["contender"] == "naive"]
    assert naive and all(m["status"] == "ok" for m in naive)
    # Every ratio joins two measured results of one case.
    timed = {
        (m["case"], m["contender"]): m["ms"] for m in data["measurements"] if m["status"] == "ok"
    }
    for r in data["ratios"]:
        assert r["speedup"] == pytest.approx(
            timed[(r["case"], r["peer"])] / timed[(r["case"], r["backend"])]
        )


def test_bench_compare_and_plot(quick_run, tmp_path, capsys):
    _, files = quick_run
    path = next(f for f in files if f.suffix == ".json")
    assert cli.main(["bench", "--compare", str(path), str(path)]) == 0
    text = capsys.readouterr().out
    assert "B / A" in text and "1.00×" in text
    png = tmp_path / "again.png"
    assert cli.main(["plot", str(path), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert report.load(path)["schema"] == "longflash-bench/1"


def test_bench_rejects_unknown_backend(capsys, tmp_path):
    rc = cli.main(["bench", "--quick", "--backends", "nonesuch", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nonesuch" in err and "reference" in err  # lists the registered names
    assert not list(tmp_path.iterdir())


def test_bench_rejects_bad_options():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dtype", "int8"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--directions", "sideways"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--causal", "--no-causal"])
