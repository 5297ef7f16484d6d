"""The benchmark harness: FLOP convention, grids, ratios, timing statistics, and how a
contender that fails or computes the wrong thing is recorded."""

from __future__ import annotations

import math
import sys

import pytest
from longflash.bench import (
    BenchConfig,
    Case,
    Contender,
    Measurement,
    Skip,
    compute_ratios,
    core,
    plot,
    timing,
)
from longflash.bench.cases import attention_flops
from longflash.bench.runner import make_cases
from longflash.call import AttentionCall


# -- FLOPs ----------------------------------------------------------------------------------
def test_flops_convention():
    B, H, N, D = 2, 3, 5, 11
    fwd = 4 * B * H * N * N * D
    assert attention_flops(B, H, N, N, D) == fwd
    assert attention_flops(B, H, N, N, D, causal=True) == fwd / 2
    assert attention_flops(B, H, N, N, D, direction="bwd") == 2.5 * fwd
    assert attention_flops(B, H, N, N, D, causal=True, direction="bwd") == 2.5 * fwd / 2
    # Nq != Nk and Dqk != Dv: the head dim is the mean of the two.
    assert attention_flops(1, 1, 3, 7, 8, 24) == 4 * 3 * 7 * 16


def test_case_flops_counts_query_heads_and_matches_core():
    case = Case("bwd", True, "bfloat16", B=2, Nq=64, Nk=128, Hq=8, Hk=2, Dqk=64, Dv=32)
    assert case.flops() == 2.5 * 4 * 2 * 8 * 64 * 128 * 48 / 2
    call = AttentionCall(
        framework="torch",
        device="cpu",
        dtype="bfloat16",
        B=2,
        Nq=64,
        Nk=128,
        Hq=8,
        Hk=2,
        Dqk=64,
        Dv=32,
        causal=True,
        scale=0.125,
    )
    assert case.flops() == call.flops(backward=True)


def test_case_rejects_bad_fields():
    with pytest.raises(ValueError, match="direction"):
        Case("sideways", False, "float32", 1, 8, 8, 1, 1, 8, 8)
    with pytest.raises(ValueError, match="multiple"):
        Case("fwd", False, "float32", 1, 8, 8, 3, 2, 8, 8)


# -- grids ----------------------------------------------------------------------------------
def test_gpu_default_grid():
    cases = make_cases(BenchConfig(), "cuda")
    assert {c.Dqk for c in cases} == {64, 128, 256}
    assert {c.Nq for c in cases} == {1024, 2048, 4096, 8192, 16384}
    assert {c.dtype for c in cases} == {"bfloat16"}
    assert {(c.direction, c.causal) for c in cases} == {
        ("fwd", False),
        ("fwd", True),
        ("bwd", False),
        ("bwd", True),
    }
    for c in cases:
        assert c.B * c.Nq == 16384 and c.Hq * c.Dqk == 2048 and c.Hk == c.Hq
    long = make_cases(BenchConfig(long=True), "cuda")
    assert max(c.Nq for c in long) == 131072
    assert all(c.B == 1 for c in long if c.Nq >= 16384)


def test_cpu_grid_and_options():
    cases = make_cases(BenchConfig(), "cpu")
    assert {c.Dqk for c in cases} == {64} and {c.Hq for c in cases} == {4}
    assert {c.dtype for c in cases} == {"float32"}
    assert all(c.B * c.Nq == 2048 for c in cases)
    cfg = BenchConfig(
        head_dims=[128],
        seqlens=[4096],
        batch_tokens=1024,
        heads=8,
        kv_heads=2,
        causal=[True],
        directions=["bwd"],
        dtypes=["float16"],
    )
    (only,) = make_cases(cfg, "cuda")
    assert (only.B, only.Nq, only.Hq, only.Hk, only.causal, only.direction, only.dtype) == (
        1,
        4096,
        8,
        2,
        True,
        "bwd",
        "float16",
    )


# -- ratios -----------------------------------------------------------------------------------
def _m(case, name, kind, ms, status="ok"):
    t = None if ms is None else timing.Timing(ms, ms, ms, 0.0, 5, 1)
    return Measurement(case, name, kind, status, timing=t)


def test_ratios_from_fake_timings():
    a = Case("fwd", False, "bfloat16", 1, 1024, 1024, 16, 16, 128, 128)
    b = Case("fwd", True, "bfloat16", 1, 1024, 1024, 16, 16, 128, 128)
    ms = [
        _m(a, "cuda", "longflash", 2.0),
        _m(a, "triton", "longflash", 4.0),
        _m(a, "sdpa-flash", "peer", 6.0),
        _m(a, "naive", "peer", 1.0),
        _m(a, "sdpa-cudnn", "peer", None, status="skipped"),
        _m(a, "flex", "peer", 3.0, status="incorrect"),  # a wrong answer ranks nothing
        _m(b, "cuda", "longflash", 1.0),
        _m(b, "sdpa-flash", "peer", 5.0),
    ]
    got = {(r["case"], r["backend"], r["peer"]): r["speedup"] for r in compute_ratios(ms)}
    assert got == {
        (a.key, "cuda", "sdpa-flash"): 3.0,
        (a.key, "cuda", "naive"): 0.5,
        (a.key, "triton", "sdpa-flash"): 1.5,
        (a.key, "triton", "naive"): 0.25,
        (b.key, "cuda", "sdpa-flash"): 5.0,
    }
    # TFLOP/s follows from the same time: 4·1·16·1024²·128 / 2 ms.
    assert ms[0].tflops == pytest.approx(4 * 16 * 1024**2 * 128 / 2e-3 / 1e12)


# -- timing ---------------------------------------------------------------------------------
def test_summarize_median_and_spread():
    t = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0], warmup=2)
    assert (t.median_ms, t.min_ms, t.max_ms, t.reps, t.warmup) == (3.0, 1.0, 5.0, 5, 2)
    assert t.iqr_ms > 0
    with pytest.raises(ValueError):
        timing.summarize([], 0)


def test_policy_counts():
    p = timing.TimingPolicy(warmup_ms=50, rep_ms=250, min_reps=5, max_reps=1000)
    assert p.counts(1.0) == (50, 250)
    assert p.counts(0.001) == (1000, 1000)
    assert p.counts(100.0) == (1, 5)
    fixed = timing.TimingPolicy(50, 250, 5, 1000, reps=7)
    assert fixed.counts(1.0) == (7, 7)


def test_wallclock_timer_runs_warmup_then_reps():
    calls = []
    p = timing.TimingPolicy(warmup_ms=0, rep_ms=0, min_reps=4, max_reps=4, estimate_runs=1)
    t = timing.time_wallclock(lambda: calls.append(1), p)
    assert t.reps == 4 and len(calls) == 1 + 4


def test_host_peak_memory_sees_an_allocation():
    np = pytest.importorskip("numpy")
    probe = timing.HostPeakMemory()
    got = probe.measure(lambda: np.ones(64 * 2**20 // 8))  # 64 MiB, touched
    if probe.method == "rss-peak":
        assert 60 * 2**20 <= got <= 200 * 2**20
    else:
        assert got >= 0


def test_sample_rows_cover_both_ends():
    rows = core.sample_rows(1000, 64)
    assert rows[0] == 0 and rows[-1] == 999 and len(rows) == 64
    assert core.sample_rows(10, 64) == list(range(10))


def test_describe_error():
    assert core.describe_error(MemoryError()).startswith("out of memory")
    assert core.describe_error(RuntimeError("CUDA out of memory. Tried")).startswith(
        "out of memory"
    )
    assert core.describe_error(Skip("head_dim 512 > 256")) == "head_dim 512 > 256"
    assert core.describe_error(ValueError("bad\nmore")) == "ValueError: bad"


# -- the torch harness on the CPU ---------------------------------------------------------------
torch = pytest.importorskip("torch")

TINY = dict(dtype="float32", B=1, Nq=64, Nk=64, Hq=2, Hk=2, Dqk=16, Dv=16)


@pytest.fixture(scope="module")
def harness():
    from longflash.bench.torch_harness import TorchHarness

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # timings are not asserted; see test_cli.one_thread
    yield TorchHarness("cpu", reps=2)
    torch.set_num_threads(before)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_peer_is_measured_and_correct(harness, direction, causal):
    (naive,) = harness.contenders(backends=[], peers=["naive"])
    m = harness.measure(Case(direction, causal, **TINY), naive)
    assert m.status == "ok", m.reason
    assert m.timing.reps == 2 and m.ms > 0 and m.tflops > 0
    assert m.max_rel_err < 1e-5
    assert m.peak_mem_bytes is not None


def test_longflash_reference_paths_are_contenders(harness):
    cs = harness.contenders(backends=["reference"], peers=[])
    names = [c.name for c in cs]
    assert names == ["reference:exact", "reference:blockwise"]
    m = harness.measure(Case("bwd", True, **TINY), cs[1])
    assert m.status == "ok", m.reason
    assert m.kind == "longflash"


def test_gqa_case_reaches_sdpa_with_enable_gqa(harness):
    (sdpa,) = harness.contenders(backends=[], peers=["sdpa-math"])
    case = Case("fwd", True, **{**TINY, "Hq": 4, "Hk": 2})
    m = harness.measure(case, sdpa)
    assert m.status == "ok", m.reason
    assert m.max_rel_err < 1e-5


def test_contender_that_raises_is_skipped(harness):
    def make(case):
        def boom(q, k, v):
            raise RuntimeError("kernel exploded\nsecond line")

        return boom

    bad = Contender("boom", "peer", "raises", make)
    m = harness.measure(Case("fwd", False, **TINY), bad)
    assert m.status == "skipped"
    assert "RuntimeError: kernel exploded" in m.reason and m.timing is None

    def declines(case):
        raise Skip("head_dim 16 not supported")

    m = harness.measure(
        Case("bwd", False, **TINY), Contender("picky", "longflash", "declines", declines)
    )
    assert (m.status, m.reason) == ("skipped", "head_dim 16 not supported")


def test_unavailable_backend_is_skipped_with_its_reason(harness):
    (cuda,) = harness.contenders(backends=["cuda"], peers=[])
    m = harness.measure(Case("fwd", False, **TINY), cuda)
    assert m.status == "skipped" and m.reason  # e.g. "package longflash-cuda is not installed"


def test_wrong_output_is_flagged(harness):
    def make(case):
        return lambda q, k, v: v * 1.5  # plausible shape, wrong numbers

    m = harness.measure(Case("fwd", False, **TINY), Contender("liar", "peer", "wrong", make))
    assert m.status == "incorrect" and "rel. error" in m.reason
    assert m.timing is not None  # still timed, but ratios ignore it


# -- the jax harness on the CPU -----------------------------------------------------------------
def test_jax_harness_measures_and_records_failures():
    pytest.importorskip("jax")
    from longflash.bench.jax_harness import JaxHarness

    h = JaxHarness("cpu", reps=1)
    names = [c.name for c in h.contenders(backends=None, peers=None)]
    assert {"jax-xla", "naive"} <= set(names) and "reference:exact" in names
    (naive,) = h.contenders(backends=[], peers=["naive"])
    for direction in ("fwd", "bwd"):
        m = h.measure(Case(direction, True, **TINY), naive)
        assert m.status == "ok", m.reason
        assert m.max_rel_err < 1e-5 and m.ms > 0 and m.peak_mem_bytes

    def make(case):
        def boom(q, k, v):
            raise NotImplementedError("no such kernel")

        return boom

    m = h.measure(Case("fwd", False, **TINY), Contender("boom", "peer", "raises", make))
    assert m.status == "skipped" and "NotImplementedError: no such kernel" in m.reason
    (pallas,) = h.contenders(backends=[], peers=["pallas-mha"])
    m = h.measure(Case("fwd", False, **TINY), pallas)
    assert m.status == "skipped" and "GPU" in m.reason


# -- plot without matplotlib -----------------------------------------------------------------
def test_plot_warns_without_matplotlib(monkeypatch, tmp_path):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plot.have_matplotlib()
    results = {"cases": [], "contenders": [], "measurements": [], "config": {"device": "cpu"}}
    with pytest.warns(UserWarning, match="matplotlib"):
        assert plot.plot(results, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_dense_guard_uses_score_matrix_size():
    case = Case("bwd", False, "float32", 2, 1000, 3000, 4, 4, 64, 64)
    assert core.dense_bytes(case) == 4 * 4 * 2 * 4 * 1000 * 3000
    assert math.isclose(
        core.dense_bytes(Case("fwd", False, "float32", 2, 1000, 3000, 4, 4, 64, 64)),
        2 * 4 * 2 * 4 * 1000 * 3000,
    )


# -- plot: the memory panels ---------------------------------------------------------------
def _memory_results(mems: dict[str, list[int]]) -> dict:
    """A GPU run of forward cases at N = 1K and 4K whose contenders used `mems` bytes."""
    seqlens = (1024, 4096)
    cases = [
        dict(
            key=f"fwd-{n}",
            direction="fwd",
            causal=False,
            dtype="bfloat16",
            B=1,
            Nq=n,
            Hq=16,
            Dqk=128,
            label=f"fwd N{n}",
        )
        for n in seqlens
    ]
    return {
        "date": "2026-11-29 00:00:00",
        "config": {"device": "cuda", "framework": "torch"},
        "machine": {"gpu": {"name": "test GPU"}},
        "cases": cases,
        "contenders": [{"name": name, "kind": "peer"} for name in mems],
        "measurements": [
            dict(case=c["key"], contender=name, status="ok", tflops=100.0, peak_mem_bytes=b)
            for name, bs in mems.items()
            for c, b in zip(cases, bs)
        ],
    }


@pytest.mark.parametrize(
    "mems, scale",
    [
        # within a decade (the O(N) kernels side by side): linear, from 0
        ({"a": [64 << 20, 65 << 20], "b": [64 << 20, 70 << 20]}, "linear"),
        # plain attention's N² scores next to them: log
        ({"a": [64 << 20, 65 << 20], "naive": [2 << 30, 32 << 30]}, "log"),
    ],
)
def test_memory_panel_has_labelled_ticks(mems, scale):
    """Every memory panel gets at least two labelled y ticks: a log axis whose values all lie
    inside one decade had none (the H200 bench of session 10 showed empty axes)."""
    pytest.importorskip("matplotlib")
    fig = plot.figure(_memory_results(mems))
    fig.canvas.draw()
    ax = fig.axes[-1]  # the memory row (a single column here)
    assert "memory" in ax.get_title()
    assert ax.get_yscale() == scale
    lo, hi = ax.get_ylim()
    labels = [
        t.get_text()
        for t in ax.get_yticklabels()
        if t.get_text() and lo <= t.get_position()[1] <= hi
    ]
    assert len(labels) >= 2, labels
