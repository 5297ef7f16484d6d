"""Sequence parallelism in JAX (shard_map over 4 host devices) against one device.

The cases run in one subprocess (tests/distributed/_jax_worker.py), because the device
count must be fixed before jax is imported: each under jit and grad, with shard_map's
default checks. Out, lse and gradients are compared here with longflash.attention over
the whole sequence on one device, on the reference backend.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax  # noqa: F401  (the worker needs it; fail here, not skip, when it is missing)
import numpy as np
import pytest
from longflash.distributed.schedule import ring_steps

WORLD = 4
# Relative Frobenius error; float64 is bounded by the float32 lse the protocol carries
# (see test_distributed_torch.py).
TOL = {"float64": 1e-6, "float32": 1e-5}
BATCH, SEQ, HEAD_DIM = 2, 64, 16
WORKER = Path(__file__).with_name("_jax_worker.py")


def _cases() -> dict[str, dict]:
    cases = {}
    for dtype in ("float64", "float32"):
        for layout in ("zigzag", "contiguous"):
            for causal in (True, False):
                cases[f"ring-{layout}-{'causal' if causal else 'full'}-{dtype}-gqa"] = dict(
                    fn="ring",
                    layout=layout,
                    dtype=dtype,
                    hq=4,
                    hk=2,
                    dv=16,
                    kwargs=dict(causal=causal, backend="reference"),
                )
    cases["ring-zigzag-causal-float64-mqa-softcap-dv8"] = dict(
        fn="ring",
        layout="zigzag",
        dtype="float64",
        hq=4,
        hk=1,
        dv=8,
        kwargs=dict(causal=True, softcap=5.0, scale=0.3, backend="reference"),
    )
    cases["ulysses-causal-float64-gqa"] = dict(
        fn="ulysses",
        layout="contiguous",
        dtype="float64",
        hq=8,
        hk=4,
        dv=16,
        kwargs=dict(causal=True, backend="reference"),
    )
    cases["ulysses-window-float32"] = dict(
        fn="ulysses",
        layout="contiguous",
        dtype="float32",
        hq=4,
        hk=4,
        dv=16,
        kwargs=dict(window=(9, 2), backend="reference"),
    )
    cases["ulysses-heads-not-divisible"] = dict(
        fn="ulysses",
        layout="contiguous",
        dtype="float32",
        hq=6,
        hk=2,
        dv=16,
        kwargs=dict(causal=True, backend="reference"),
    )
    # Sliding windows against chunks of 16 (contiguous) and 8 (zigzag) tokens: inside a
    # chunk, past the neighbouring chunk, one-sided, with causal, softcap and MQA. Few:
    # each costs seconds of XLA compilation (a lax.switch over the ranks' blocks per step).
    for label, layout, dtype, hk, dv, kwargs in (
        ("small", "zigzag", "float64", 2, 16, dict(window=(5, 2))),
        ("causal-wide", "contiguous", "float64", 2, 16, dict(causal=True, window=(20, None))),
        ("left-only", "contiguous", "float32", 2, 16, dict(window=(11, None))),
        (
            "right-only-wide-softcap-mqa",
            "contiguous",
            "float64",
            1,
            8,
            dict(window=(None, 19), softcap=5.0, scale=0.3),
        ),
    ):
        cases[f"ring-window-{label}-{layout}-{dtype}"] = dict(
            fn="ring",
            layout=layout,
            dtype=dtype,
            hq=4,
            hk=hk,
            dv=dv,
            kwargs=dict(kwargs, backend="reference"),
        )
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    where = tmp_path_factory.mktemp("jax4")
    rng = np.random.default_rng(0)
    cases = {}
    for name, case in _cases().items():
        shapes = {
            "q": (case["hq"], HEAD_DIM),
            "k": (case["hk"], HEAD_DIM),
            "v": (case["hk"], case["dv"]),
            "dout": (case["hq"], case["dv"]),
        }
        cases[name] = {
            **case,
            **{n: rng.standard_normal((BATCH, SEQ, *s)) for n, s in shapes.items()},
        }
    with open(where / "cases.pkl", "wb") as f:
        pickle.dump(cases, f)
    env = {
        **os.environ,
        # Compiling the unrolled rings dominates the run; LLVM's optimisation of the
        # CPU code buys nothing at these sizes and costs about 40% of the CPU time.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={WORLD} "
        "--xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(where)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(where / "results.pkl", "rb") as f:
        return cases, pickle.load(f)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


GOOD = sorted(n for n in _cases() if n != "ulysses-heads-not-divisible")


@pytest.mark.parametrize("name", GOOD)
def test_matches_single_device(results, name):
    cases, res = results
    got = res[name]
    assert "error" not in got, got.get("error")
    tol = TOL[cases[name]["dtype"]]
    for key in ("out", "lse", "dq", "dk", "dv"):
        want = got["ref"][key]
        assert got[key].shape == want.shape and got[key].dtype == want.dtype, key
        assert np.isfinite(got[key]).all(), key
        err = _rel(got[key], want)
        assert err < tol, f"{name} {key}: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("name", [n for n in GOOD if n.startswith("ring")])
def test_ring_communicates(results, name):
    cases, res = results
    got = res[name]
    # The ring runs P steps, fewer when a window leaves every rank's last steps empty.
    # In the traced program: 2(steps-1) K/V shifts forward; backward 2(steps-1) more and
    # 2·steps shifts of the dK/dV sums (the last one home). The lowered forward holds its
    # 2(steps-1) collective permutes.
    kw = cases[name]["kwargs"]
    steps = ring_steps(
        WORLD, cases[name]["layout"], kw.get("causal", False), SEQ // WORLD, kw.get("window")
    )
    assert steps == WORLD or "window" in kw
    assert got["ppermute"] == 2 * (steps - 1) + 2 * (steps - 1) + 2 * steps
    assert got["hlo_collective_permute"] == 2 * (steps - 1)
    assert got["all_to_all"] == 0
    assert _rel(got["out"], got["ref"]["out"]) < TOL[cases[name]["dtype"]]
    # Local-only attention is wrong on every row that needs another shard's keys: with a
    # small window, only the rows near the chunk edges.
    far = 1e3 * TOL[cases[name]["dtype"]] if "window" in cases[name]["kwargs"] else 0.05
    assert _rel(got["out"], got["local"]) > far, "the ring's output equals local-only"


def test_ulysses_communicates(results):
    _, res = results
    # forward: q, k, v, out and lse; backward: the adjoints of q, k, v and out.
    assert res["ulysses-causal-float64-gqa"]["all_to_all"] == 5 + 4
    assert res["ulysses-causal-float64-gqa"]["ppermute"] == 0


def test_errors(results):
    _, res = results
    err = res["ulysses-heads-not-divisible"].get("error", "")
    assert err.startswith("ValueError") and "must both be divisible by 4" in err, err


def test_framework_arguments():
    import jax.numpy as jnp
    import longflash.distributed as lfd

    x = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="pass the mesh axis"):
        lfd.ring_attention(x, x, x)
    with pytest.raises(ValueError, match="group is a torch.distributed process group"):
        lfd.ulysses_attention(x, x, x, group=object(), axis_name="sp")
    with pytest.raises(ValueError, match="not a mesh axis"):
        lfd.ring_attention(x, x, x, axis_name="sp")


def test_backend_results_without_varying_axes_differentiate_under_shard_map():
    """A backend whose results carry no varying mesh axes (an FFI call, as the cuda
    backend's on GPUs, or a host callback here) still differentiates inside shard_map,
    plain and through Ulysses, with the reference backend's gradients; and the ring's
    gradient hands its manual computations no array constants."""
    worker = Path(__file__).with_name("_jax_callback_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(worker)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = dict(line.split() for line in proc.stdout.split("\n") if line)
    assert float(errors.pop("manual_computations")) >= 2  # the ring's forward and backward
    assert float(errors.pop("constant_inputs")) == 0
    assert set(errors) == {"ulysses", "local"}
    assert all(float(e) < 1e-5 for e in errors.values()), errors
