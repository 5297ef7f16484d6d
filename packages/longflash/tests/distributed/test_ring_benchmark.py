"""benchmarks/ring.py across several processes (torch gloo) and host devices (JAX): every
variant's output and gradients are checked against one device's attention over the whole
sequence, and the summary carries the figures the multi-GPU runs report (same-N speed-up,
weak-scaling efficiency against one device at N/P tokens, exposed communication)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]
RING = ROOT / "benchmarks" / "ring.py"
SMALL = ["--device", "cpu", "--seqlen", "512", "--heads", "2", "--dim", "16", "--reps", "1"]
SMALL += ["--warmup", "0", "--no-plot"]


def _module():
    spec = importlib.util.spec_from_file_location("ring_benchmark", RING)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(cmd: list[str], out: Path, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(
        [*cmd, *SMALL, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # No input array is baked into a compiled program as a constant (at 1M tokens XLA spent
    # minutes folding Ulysses' exchanges of a captured 2 GiB dout on the host).
    assert "constants were captured" not in proc.stderr
    (path,) = out.glob("ring-*.json")
    return json.loads(path.read_text())


def _check_summary(doc: dict, world: int) -> None:
    assert doc["t1"]["seqlen"] == 512
    assert doc["t1_local"]["seqlen"] == 512 // world
    rows = {f"{r['fn']} {r['layout']}": r for r in doc["summary"]}
    assert set(rows) == {"ring zigzag", "ring contiguous", "ulysses contiguous"}
    for name, row in rows.items():
        assert row["check_ok"], (name, row["check_rel_error"])
        assert set(row["check_rel_error"]) == {"out", "dq", "dk", "dv"}
        # bfloat16 against bfloat16: well inside the suite's bounds (2e-2 out, 4e-2 grads)
        assert max(row["check_rel_error"].values()) < 1e-2, (name, row)
        assert math.isclose(row["speedup"], doc["t1"]["fwd_bwd_ms"] / row["fwd_bwd_ms"])
        assert math.isclose(row["efficiency_same_n"], row["speedup"] / world)
        assert row["efficiency_weak"] > 0


def test_torch_ring_benchmark_checks_every_variant(tmp_path):
    doc = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(RING),
        ],
        tmp_path,
    )
    assert doc["mode"] == "multi" and doc["ring"]["world"] == 2
    _check_summary(doc, 2)
    for row in doc["summary"]:
        if row["fn"] == "ring":
            # ring time minus the same rank's compute alone
            assert "exposed_comm_ms" in row


def test_jax_ring_benchmark_checks_every_variant(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_CAPTURED_CONSTANTS_WARN_BYTES"] = "1000"  # warn about any array constant
    doc = _run([sys.executable, str(RING), "--framework", "jax"], tmp_path, env)
    assert doc["mode"] == "jax" and doc["ring"]["world"] == 2
    _check_summary(doc, 2)


@pytest.mark.parametrize(
    "errors, ok",
    [
        ({"out": 1e-3, "dq": 3e-2}, True),
        ({"out": 3e-2, "dq": 1e-3}, False),  # out's bound is 2e-2
        ({"out": 1e-3, "dk": 5e-2}, False),  # the gradients' is 4e-2
        ({"out": float("nan"), "dq": 0.0}, False),
    ],
)
def test_check_fails_beyond_the_suites_bounds(errors, ok):
    assert _module()._check_entry("bfloat16", errors)["ok"] is ok


def test_weak_scaling_efficiency_is_per_gpu_speed_over_one_gpu_at_n_over_p():
    ring = _module()
    config = {"seqlen": 4096, "batch": 1, "heads": 8, "dim": 128, "causal": True, "window": None}
    t1_local_ms = 10.0
    doc = {
        "config": config,
        "t1": {"fwd_bwd_ms": 80.0},
        "t1_local": {"seqlen": 2048, "fwd_bwd_ms": t1_local_ms},
    }
    # causal work grows as N^2: 4x the work of one rank's length on 2 GPUs, ideally in
    # 2 * T1(N/2)
    eff = ring._efficiencies(doc, 2 * t1_local_ms, 2)
    assert math.isclose(eff["efficiency_weak"], 1.0, rel_tol=1e-3)
    assert math.isclose(eff["speedup"], 4.0)
    assert math.isclose(eff["efficiency_same_n"], 2.0)


def test_scaling_joins_runs_at_several_world_sizes(tmp_path):
    """Runs at P = 2 and 4 with the same tokens per rank (256) make one weak-scaling series,
    each with its one-device P = 1 point; a run of another configuration is refused."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for world, n in ((2, 512), (4, 1024)):
        cmd = [*torchrun, "--nproc-per-node", str(world), str(RING)]
        args = [*SMALL, "--seqlen", str(n), "--out", str(tmp_path / f"p{world}"), "--no-check"]
        args += ["--layouts", "zigzag"]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(tmp_path.glob("p*/ring-multi-*.json"))
    assert len(runs) == 2
    ring = _module()
    doc = ring.scaling(runs, tmp_path / "scaling", plot=False)
    rows = {(r["variant"], r["world"], r["local_seqlen"]): r for r in doc["rows"]}
    for world in (2, 4):
        row = rows[("ring zigzag", world, 256)]
        assert row["seqlen"] == 256 * world and 0 < row["efficiency_weak"]
    assert rows[("one device", 1, 256)]["efficiency_weak"] == 1.0
    assert (tmp_path / "scaling").glob("ring-scaling-*.json")

    other = json.loads(runs[0].read_text())
    other["config"]["dim"] = 64
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="dim differ"):
        ring.scaling([runs[1], bad], tmp_path / "scaling", plot=False)
