"""Sequence parallelism on torch.distributed (gloo, CPU) against single-device attention.

Each world size starts its processes once (tests/distributed/_torch_worker.py) and runs
every case; each rank's out, lse and gradient shards are then gathered here and compared
with longflash.attention over the whole sequence, on the reference backend. The guards
check that communication really happened: the collective counts are those of a P-step
ring, and the result is far from what the ranks compute on their own shards alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import longflash
import longflash.distributed as lfd
import pytest
import torch

WORLDS = (2, 3, 4)
# Relative Frobenius error. float64: the protocol carries each block's lse in float32, so
# the merge weights exp(lse_blk - lse) are exact to float32 rounding of lse (|lse| ~ 5 here:
# about 3e-7); observed errors are ~5e-8. float32: the bound.
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}
BATCH, SEQ, HEAD_DIM = 2, 48, 16
WORKER = Path(__file__).with_name("_torch_worker.py")


def _cases(world: int) -> dict[str, dict]:
    """name -> case; heads for Ulysses are multiples of the world size."""
    cases = {}
    for dtype in (torch.float64, torch.float32):
        dt = str(dtype).removeprefix("torch.")
        for layout in ("zigzag", "contiguous"):
            for causal in (True, False):
                name = f"ring-{layout}-{'causal' if causal else 'full'}-{dt}-gqa"
                cases[name] = dict(
                    fn="ring",
                    layout=layout,
                    dtype=dtype,
                    hq=4,
                    hk=2,
                    dv=16,
                    kwargs=dict(causal=causal, backend="reference"),
                )
        cases[f"ring-zigzag-causal-{dt}-mqa-softcap-dv8"] = dict(
            fn="ring",
            layout="zigzag",
            dtype=dtype,
            hq=4,
            hk=1,
            dv=8,
            kwargs=dict(causal=True, softcap=5.0, scale=0.3, backend="reference"),
        )
        cases[f"ulysses-causal-{dt}-gqa"] = dict(
            fn="ulysses",
            layout="contiguous",
            dtype=dtype,
            hq=2 * world,
            hk=world,
            dv=16,
            kwargs=dict(causal=True, backend="reference"),
        )
        cases[f"ulysses-window-{dt}"] = dict(
            fn="ulysses",
            layout="contiguous",
            dtype=dtype,
            hq=world,
            hk=world,
            dv=16,
            kwargs=dict(window=(7, 3), backend="reference"),
        )
    cases["ulysses-heads-not-divisible"] = dict(
        fn="ulysses",
        layout="contiguous",
        dtype=torch.float32,
        hq=world + 1,
        hk=1,
        dv=16,
        kwargs=dict(causal=True, backend="reference"),
    )
    return cases


def _inputs(case: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    dt = case["dtype"]
    return {
        "q": torch.randn(BATCH, SEQ, case["hq"], HEAD_DIM, generator=g, dtype=dt),
        "k": torch.randn(BATCH, SEQ, case["hk"], HEAD_DIM, generator=g, dtype=dt),
        "v": torch.randn(BATCH, SEQ, case["hk"], case["dv"], generator=g, dtype=dt),
        "dout": torch.randn(BATCH, SEQ, case["hq"], case["dv"], generator=g, dtype=dt),
    }


@pytest.fixture(scope="module", params=WORLDS, ids=[f"P{p}" for p in WORLDS])
def world(request, tmp_path_factory):
    """(P, cases with inputs, per-rank results): one run of P processes for all cases."""
    p = request.param
    where = tmp_path_factory.mktemp(f"gloo{p}")
    cases = {
        name: {**case, **_inputs(case, seed)} for seed, (name, case) in enumerate(_cases(p).items())
    }
    torch.save(cases, where / "cases.pt")
    # gloo over the loopback device unless told otherwise: sandboxes often cannot
    # resolve their own hostname.
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(p), str(where)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(p)
    ]
    logs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        logs.append(out.decode(errors="replace"))
    for r, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {r} of {p} failed:\n{logs[r]}"
    ranks = [torch.load(where / f"rank{r}.pt") for r in range(p)]
    return p, cases, ranks


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _gather(ranks, name, key, layout, dim=1):
    return lfd.unshard_sequence([r[name][key] for r in ranks], layout, dim=dim)


def _single_device(case):
    q, k, v = (case[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out, lse = longflash.attention(q, k, v, return_lse=True, **case["kwargs"])
    (out * case["dout"]).sum().backward()
    return out.detach(), lse, q.grad, k.grad, v.grad


CASE_NAMES = sorted(name for name in _cases(4) if "not-divisible" not in name)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_single_device(world, name):
    p, cases, ranks = world
    case, layout = cases[name], cases[name]["layout"]
    for r in ranks:
        assert "error" not in r[name], r[name].get("error")
    out, lse, dq, dk, dv = _single_device(case)
    got = {
        "out": _gather(ranks, name, "out", layout),
        "lse": _gather(ranks, name, "lse", layout, 2),
        "dq": _gather(ranks, name, "dq", layout),
        "dk": _gather(ranks, name, "dk", layout),
        "dv": _gather(ranks, name, "dv", layout),
    }
    want = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    tol = TOL[case["dtype"]]
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert got[key].shape == want[key].shape, key
        assert torch.isfinite(got[key]).all(), key
        err = _rel(got[key], want[key])
        assert err < tol, f"P={p} {name} {key}: relative error {err:.2e} >= {tol:.0e}"
    assert all(r[name]["out_requires_grad"] for r in ranks)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ring_communicates(world, layout, causal):
    """A ring that silently stayed local cannot pass: counts and results both show it."""
    p, cases, ranks = world
    name = f"ring-{layout}-{'causal' if causal else 'full'}-float64-gqa"
    case = cases[name]
    for r in ranks:
        # Forward: P-1 shifts of (k, v), each a send and a receive per tensor.
        assert r[name]["fwd"] == {"p2p_batches": [4] * (p - 1), "all_to_all": 0}
        # Backward: the same P-1 K/V shifts plus P shifts of the fp32 (dk, dv) sums.
        assert sorted(r[name]["bwd"]["p2p_batches"]) == [4] * (2 * p - 1)
        assert r[name]["bwd"]["all_to_all"] == 0
    local = []
    for rank in range(p):
        q, k, v = (lfd.shard_sequence(case[n], rank, p, layout) for n in ("q", "k", "v"))
        local.append(longflash.attention(q, k, v, causal=causal, backend="reference"))
    local = lfd.unshard_sequence(local, layout)
    ring = _gather(ranks, name, "out", layout)
    assert _rel(ring, local) > 0.05, "the ring's output equals local-only attention"
    assert _rel(ring, _single_device(case)[0]) < TOL[torch.float64]


def test_ulysses_communicates(world):
    p, _, ranks = world
    for name in ("ulysses-causal-float64-gqa", "ulysses-window-float64"):
        for r in ranks:
            # q, k, v and out, plus the lse (return_lse=True); the backward sends the
            # gradients of q, k, v and out back through the adjoint exchange.
            assert r[name]["fwd"] == {"p2p_batches": [], "all_to_all": 5}
            assert r[name]["bwd"] == {"p2p_batches": [], "all_to_all": 4}


def test_ulysses_heads_not_divisible(world):
    p, _, ranks = world
    for r in ranks:
        err = r["ulysses-heads-not-divisible"].get("error", "")
        assert err.startswith("ValueError"), err
        assert f"must both be divisible by {p}" in err and f"q heads ({p + 1})" in err


# -- argument errors that need no process group ----------------------------------------
def _shards(n=8, hq=2, hk=2):
    return (torch.randn(1, n, hq, 16), torch.randn(1, n, hk, 16), torch.randn(1, n, hk, 16))


def test_ring_rejects_window():
    with pytest.raises(longflash.UnsupportedError, match="window not supported by ring"):
        lfd.ring_attention(*_shards(), window=(4, 0))


def test_ring_rejects_bad_layout_and_lengths():
    with pytest.raises(ValueError, match="layout must be one of"):
        lfd.ring_attention(*_shards(), layout="striped")
    with pytest.raises(ValueError, match="divisible by 2"):
        lfd.ring_attention(*_shards(n=7), layout="zigzag")
    q, k, v = _shards()
    with pytest.raises(ValueError, match="equal length"):
        lfd.ring_attention(q, k[:, :4], v[:, :4], layout="contiguous")


def test_framework_arguments():
    with pytest.raises(ValueError, match="axis_name is for JAX"):
        lfd.ring_attention(*_shards(), axis_name="sp")
    with pytest.raises(TypeError, match="torch.Tensor or a jax.Array"):
        lfd.ring_attention([1.0], [1.0], [1.0])


def test_needs_initialised_process_group():
    assert not torch.distributed.is_initialized()  # the ranks run in their own processes
    with pytest.raises(RuntimeError, match="not initialised"):
        lfd.ring_attention(*_shards(), causal=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_one_rank_ring_is_attention(causal):
    """P = 1 through NoComm, the path the benchmark's schedule simulation times."""
    from longflash.distributed.torch import NoComm, RingConfig, ring_backward, ring_forward
    from longflash.frontends.torch import make_call

    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (
        torch.randn(2, 24, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)
    )
    cfg = RingConfig(make_call(q, k, v), "reference", 0, 1, "zigzag", causal)
    out, lse, step_lse = ring_forward(q, k, v, cfg, NoComm(0, 1))
    grads = ring_backward(dout, q, k, v, out, lse, step_lse, cfg, NoComm(0, 1))
    case = {
        "q": q,
        "k": k,
        "v": v,
        "dout": dout,
        "kwargs": {"causal": causal, "backend": "reference"},
    }
    want = _single_device(case)
    for got, ref in zip((out, lse, *grads), want):
        assert _rel(got, ref) < TOL[torch.float64]
