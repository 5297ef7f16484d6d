"""Sequence parallelism on torch.distributed (gloo, CPU) against single-device attention.

Each world size starts its processes once (tests/distributed/_torch_worker.py) and runs
every case; each rank's out, lse and gradient shards are then gathered here and compared
with longflash.attention over the whole sequence, on the reference backend. The guards
check that communication really happened: the collective counts are those of a P-step
ring (fewer steps where a window needs them), and the result is far from what the ranks
compute on their own shards alone. Every rank's forward also runs in this process (the
K/V transfers replaced by cutting the shards from the global inputs), which covers many
more sliding windows cheaply, and shows that a band without its shift would be caught.
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

# P = 8 is the rank count of the 8-GPU weak-scaling run (issue 6): its schedule, run here on 8
# gloo processes, is the one that run would use.
WORLDS = (2, 3, 4, 8)
# Relative Frobenius error. float64: the protocol carries each block's lse in float32, so
# the merge weights exp(lse_blk - lse) are exact to float32 rounding of lse (|lse| ~ 5 here:
# about 3e-7); observed errors are ~5e-8. float32: the bound.
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}
BATCH, SEQ, HEAD_DIM = 2, 48, 16
WORKER = Path(__file__).with_name("_torch_worker.py")


# Sliding windows over the global sequence: (label, layout, causal, window, dtype). Chunks
# are 24/16/12/6 tokens (contiguous, P = 2/3/4/8) and 12/6/3 (zigzag, P = 2/4/8): "small" windows
# stay inside a chunk, "wide" ones reach past the neighbouring chunk, one-sided ones leave
# a side unbounded. Odd P runs the zigzag ones in the contiguous layout: zigzag with odd P
# is covered without windows, and every world then has the same cases.
WINDOWS = (
    ("small", "zigzag", False, (3, 2), torch.float64),
    ("causal-wide", "zigzag", True, (29, None), torch.float64),
    ("left-only", "zigzag", False, (13, None), torch.float64),
    ("wide", "zigzag", False, (30, 13), torch.float32),
    ("causal-small", "contiguous", True, (4, None), torch.float64),
    ("wide", "contiguous", False, (30, 13), torch.float64),
    ("right-only", "contiguous", False, (None, 10), torch.float64),
    ("causal-small", "contiguous", True, (5, 7), torch.float32),
)


def _window_cases(world: int) -> dict[str, dict]:
    cases = {}
    for label, layout, causal, window, dtype in WINDOWS:
        dt = str(dtype).removeprefix("torch.")
        cases[f"ring-window-{label}-{dt}-gqa"] = dict(
            fn="ring",
            layout="contiguous" if world % 2 else layout,
            dtype=dtype,
            hq=4,
            hk=2,
            dv=16,
            kwargs=dict(causal=causal, window=window, backend="reference"),
        )
    return cases


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
    cases["ring-window-softcap-float64-mqa-dv8"] = dict(
        fn="ring",
        layout="contiguous",
        dtype=torch.float64,
        hq=4,
        hk=1,
        dv=8,
        kwargs=dict(window=(9, 4), softcap=5.0, scale=0.3, backend="reference"),
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
    return {**cases, **_window_cases(world)}


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
        assert err < tol, f"P={p} {name} ({layout}) {key}: relative error {err:.2e} >= {tol:.0e}"
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


def test_ring_window_communicates(world):
    """Windows keep the ring's transfers up to the last step in which some rank computes
    (a step the band misses on one rank still passes K/V on), and their results need
    both the other ranks' K/V and the window."""
    from longflash.distributed.schedule import ring_steps

    p, cases, ranks = world
    names = [n for n in cases if n.startswith("ring-window") and cases[n]["dtype"] == torch.float64]
    assert len(names) == 7
    truncated = 0
    for name in names:
        case, layout = cases[name], cases[name]["layout"]
        kw = case["kwargs"]
        steps = ring_steps(p, layout, kw.get("causal", False), SEQ // p, kw["window"])
        truncated += steps < p
        for r in ranks:
            # Forward: a K/V shift before each step but the last. Backward: the same, the
            # dK/dV sums passed on after each step but the last, then sent home.
            assert r[name]["fwd"] == {"p2p_batches": [4] * (steps - 1), "all_to_all": 0}, name
            bwd = [4] * (2 * steps - 1) if steps > 1 else []
            assert sorted(r[name]["bwd"]["p2p_batches"]) == bwd, name
        want = _single_device(case)[0]
        ring = _gather(ranks, name, "out", layout)
        assert _rel(ring, want) < TOL[torch.float64], name
        local = []
        for rank in range(p):
            q, k, v = (lfd.shard_sequence(case[n], rank, p, layout) for n in ("q", "k", "v"))
            local.append(longflash.attention(q, k, v, **case["kwargs"]))
        local = lfd.unshard_sequence(local, layout)
        # Local-only attention differs from the truth on the rows near chunk edges only
        # (all of them for the widest windows): still far beyond the tolerance.
        assert _rel(local, want) > 1e3 * TOL[torch.float64], f"{name}: local-only is exact"
        unwindowed = _single_device(
            {**case, "kwargs": {k: v for k, v in kw.items() if k != "window"}}
        )[0]
        assert _rel(unwindowed, want) > 1e3 * TOL[torch.float64], f"{name}: window is a no-op"
    # Contiguous shards and a band narrower than a shard: the ring stops early.
    assert truncated >= (1 if p > 2 else 0)


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


def test_ring_validates_window():
    with pytest.raises(ValueError, match="window left must be >= 0"):
        lfd.ring_attention(*_shards(), window=(-1, 0))


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


@pytest.mark.parametrize(
    "causal, window",
    [(True, None), (False, None), (False, (5, 2)), (True, (30, None))],
    ids=["causal", "full", "window", "causal-window"],
)
def test_one_rank_ring_is_attention(causal, window):
    """P = 1 through NoComm, the path the benchmark's schedule simulation times."""
    from longflash.distributed.torch import NoComm, RingConfig, ring_backward, ring_forward
    from longflash.frontends.torch import make_call

    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (
        torch.randn(2, 24, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4)
    )
    cfg = RingConfig(make_call(q, k, v), "reference", 0, 1, "zigzag", causal, window)
    out, lse, step_lse = ring_forward(q, k, v, cfg, NoComm(0, 1))
    grads = ring_backward(dout, q, k, v, out, lse, step_lse, cfg, NoComm(0, 1))
    case = {
        "q": q,
        "k": k,
        "v": v,
        "dout": dout,
        "kwargs": {"causal": causal, "window": window, "backend": "reference"},
    }
    want = _single_device(case)
    for got, ref in zip((out, lse, *grads), want):
        assert _rel(got, ref) < TOL[torch.float64]


# -- the forward of every rank in one process -----------------------------------------
class _ShardRing:
    """The ring's K/V transfers inside one process: the n-th shift hands over the K/V
    shard this rank holds at step n, cut from the global inputs. The forward needs
    nothing else from the other ranks, so every rank's forward runs exactly."""

    def __init__(self, rank: int, world: int, layout: str, k, v):
        self.rank, self.world_size = rank, world
        self._shards = [
            [lfd.shard_sequence(x, r, world, layout).contiguous() for x in (k, v)]
            for r in range(world)
        ]
        self._step = 0

    def shift(self, send, recv, tag=0):
        from longflash.distributed.schedule import source_rank
        from longflash.distributed.torch import _Pending

        self._step += 1
        return _Pending([], self._shards[source_rank(self.rank, self._step, self.world_size)], send)


def _emulated_forward(world, layout, causal, window, seq=60, seed=3):
    """(ring out, ring lse, single-device out, lse) over every rank's forward."""
    from longflash.distributed.torch import RingConfig, ring_forward
    from longflash.frontends.torch import make_call

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, seq, h, 8, generator=g, dtype=torch.float64) for h in (2, 1, 1))
    outs, lses = [], []
    for rank in range(world):
        qs, ks, vs = (lfd.shard_sequence(x, rank, world, layout) for x in (q, k, v))
        call = make_call(qs, ks, vs)
        cfg = RingConfig(call, "reference", rank, world, layout, causal, window)
        comm = _ShardRing(rank, world, layout, k, v)
        out, lse, _ = ring_forward(qs, ks.contiguous(), vs.contiguous(), cfg, comm)
        outs.append(out)
        lses.append(lse)
    want = longflash.attention(
        q, k, v, causal=causal, window=window, return_lse=True, backend="reference"
    )
    got = (lfd.unshard_sequence(outs, layout), lfd.unshard_sequence(lses, layout, dim=2))
    return got, want


# Windows against chunks of 30/20 (contiguous, P = 2, 3) and 10/6 (zigzag, P = 3, 5):
# inside a chunk, across several, one-sided, degenerate (0, 0), wider than N.
EMULATED = [(0, 0), (2, 5), (7, None), (None, 4), (17, 3), (23, 41), (100, 100)]


@pytest.mark.parametrize(
    "world, layout", [(2, "contiguous"), (3, "contiguous"), (3, "zigzag"), (5, "zigzag")]
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_emulated_ring_forward_windows(world, layout, causal):
    for window in EMULATED:
        (out, lse), (want_out, want_lse) = _emulated_forward(world, layout, causal, window)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), window
        assert _rel(out, want_out) < TOL[torch.float64], window
        assert _rel(lse, want_lse) < TOL[torch.float64], window


def test_unshifted_band_would_fail(monkeypatch):
    """The guard the comparisons rely on: blocks that keep the window as given, relative
    to their own corner instead of shifted by their offset from the global diagonal,
    give a far different result, which these tests would report."""
    from longflash.call import normalize_window
    from longflash.distributed import torch as ring_torch
    from longflash.distributed.schedule import Block, step_blocks

    def unshifted(rank, step, world, layout, causal, local_len, window=None):
        band = normalize_window(causal, window)
        return tuple(
            Block(b.q0, b.q1, b.k0, b.k1, None if b.window is None else band)
            for b in step_blocks(rank, step, world, layout, causal, local_len, window)
        )

    (out, _), (want, _) = _emulated_forward(4, "contiguous", False, (17, 3))
    assert _rel(out, want) < TOL[torch.float64]
    monkeypatch.setattr(ring_torch, "step_blocks", unshifted)
    for layout, causal, window in (("contiguous", False, (17, 3)), ("zigzag", True, (4, 0))):
        (out, _), (want, _) = _emulated_forward(
            5 if layout == "zigzag" else 4, layout, causal, window
        )
        assert _rel(out, want) > 0.05, (layout, window)
