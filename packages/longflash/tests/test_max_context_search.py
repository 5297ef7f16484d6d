"""benchmarks/max_context.py on the CPU: the doubling-then-bisection search over synthetic
probes (thresholds, resolution, time budget, errors), and one tiny training step of its
LLaMA model with each attention variant, which must agree."""

from __future__ import annotations

import json
import math

import pytest
from _scripts import load_script

K = 1024


mc = load_script("benchmarks/max_context.py", "max_context")


def threshold_probe(limit: int, log: list[int] | None = None):
    def probe(n: int) -> bool:
        if log is not None:
            log.append(n)
        return n <= limit

    return probe


# -- the search ---------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [1024, 1500, 5000, 20 * K + 5, 100_000, 300 * K - 1])
@pytest.mark.parametrize("start", [1024, 4096, 32 * K])
def test_exact_resolution_finds_the_largest_multiple(limit, start):
    log: list[int] = []
    s = mc.find_max_length(threshold_probe(limit, log), start=start, multiple=K, resolution=K)
    assert s.stopped == "resolved"
    assert s.max_fit == limit // K * K
    assert s.first_fail == s.max_fit + K
    assert len(log) == len(set(log)), "a length was tried twice"
    assert all(n % K == 0 for n in log)
    assert [t.n for t in s.trials] == log
    assert all(t.fits == (t.n <= limit) for t in s.trials)


@pytest.mark.parametrize("limit", [17 * K, 40_000, 200 * K + 3, 3_000_000])
def test_fractional_resolution_brackets_the_limit(limit):
    s = mc.find_max_length(threshold_probe(limit), start=4 * K, multiple=K, resolution=1 / 16)
    assert s.stopped == "resolved"
    assert s.max_fit <= limit < s.first_fail
    assert s.first_fail - s.max_fit <= s.resolution
    # The first bracket is [L, 2L] from the doubling: 1/16 of it, in whole multiples.
    first_hi = min(t.n for t in s.trials if not t.fits and t.phase == "double")
    assert s.resolution == max(K, (first_hi // 2) // 16 // K * K)
    phases = [t.phase for t in s.trials]
    assert phases == sorted(phases, key=["double", "bisect"].index)


def test_doubling_then_bisection_sequence():
    log: list[int] = []
    s = mc.find_max_length(
        threshold_probe(100 * K, log), start=16 * K, multiple=K, resolution=8 * K
    )
    # 16K 32K 64K fit, 128K fails; then 96K fits, 112K fails, 104K fails: [96K, 104K).
    assert log == [16 * K, 32 * K, 64 * K, 128 * K, 96 * K, 112 * K, 104 * K]
    assert (s.max_fit, s.first_fail) == (96 * K, 104 * K)


def test_start_that_fails_halves_first():
    s = mc.find_max_length(threshold_probe(5 * K), start=64 * K, multiple=K, resolution=K)
    assert [t.phase for t in s.trials][:4] == ["double", "halve", "halve", "halve"]
    assert (s.max_fit, s.first_fail) == (5 * K, 6 * K)


def test_nothing_fits():
    s = mc.find_max_length(threshold_probe(100), start=8 * K, multiple=K)
    assert s.stopped == "nothing_fits"
    assert s.max_fit is None and s.first_fail == K
    assert [t.n for t in s.trials] == [8 * K, 4 * K, 2 * K, K]


def test_max_length_caps_the_doubling():
    log: list[int] = []
    s = mc.find_max_length(
        threshold_probe(10**9, log), start=3 * K, multiple=K, max_length=20 * K + 7
    )
    assert s.stopped == "max_length"
    assert (s.max_fit, s.first_fail) == (20 * K, None)
    assert log == [3 * K, 6 * K, 12 * K, 20 * K]


def test_start_is_rounded_up_to_the_multiple():
    log: list[int] = []
    mc.find_max_length(threshold_probe(50_000, log), start=1000, multiple=512, resolution=512)
    assert log[0] == 1024 and all(n % 512 == 0 for n in log)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_budget_stops_cleanly_with_the_bracket_so_far():
    clock = FakeClock()
    limit = 150 * K

    def cost(n: int) -> float:  # seconds a trial takes: quadratic, like attention
        return (n / (64 * K)) ** 2 * 60

    def probe(n: int):
        clock.t += cost(n)
        return mc.Trial(n=n, fits=n <= limit, status="fit" if n <= limit else "oom")

    deadline = 400.0
    s = mc.find_max_length(
        probe,
        start=32 * K,
        multiple=K,
        deadline=deadline,
        clock=clock,
        estimate=lambda trials, n: cost(n),
    )
    assert s.stopped == "budget"
    assert clock.t <= deadline, "a trial was started that could not end in time"
    assert "would take" in s.note
    # The bracket is still true: what fit fits, what failed fails.
    assert s.max_fit is not None and s.max_fit <= limit
    assert s.first_fail is None or s.first_fail > limit
    # 32K (15 s), 64K (60 s), 128K (240 s) fit; 256K (960 s) does not fit in the time.
    assert [t.n for t in s.trials] == [32 * K, 64 * K, 128 * K]


def test_budget_with_the_default_estimate_and_a_spent_budget():
    clock = FakeClock()

    def probe(n: int):
        clock.t += (n / K) ** 2 * 1e-3
        return n <= 90 * K

    s = mc.find_max_length(probe, start=8 * K, multiple=K, deadline=10.0, clock=clock)
    assert s.stopped == "budget" and clock.t <= 10.0
    assert all(t.elapsed_s > 0 for t in s.trials)  # measured on the clock around the probe
    clock.t = 11.0
    s = mc.find_max_length(probe, start=8 * K, multiple=K, deadline=10.0, clock=clock)
    assert s.stopped == "budget" and s.trials == [] and s.max_fit is None


def test_quadratic_estimate():
    trials = [mc.Trial(n=8 * K, fits=True, elapsed_s=2.0), mc.Trial(n=64 * K, fits=False)]
    assert mc.quadratic_estimate(trials, 16 * K) == pytest.approx(8.0)
    assert mc.quadratic_estimate(trials, 4 * K) == 0.0  # nothing at or below: no basis
    # A failed trial is no basis (it may have stopped early).
    assert mc.quadratic_estimate(trials, 128 * K) == pytest.approx(2.0 * 16**2)


def test_an_error_trial_ends_the_search():
    def probe(n: int):
        if n >= 64 * K:
            return mc.Trial(n=n, fits=False, status="error", error="illegal memory access")
        return True

    s = mc.find_max_length(probe, start=16 * K, multiple=K)
    assert s.stopped == "error" and "illegal memory access" in s.note
    assert (s.max_fit, s.first_fail) == (32 * K, None)


def test_probe_answering_for_another_length_is_refused():
    with pytest.raises(ValueError, match="answered for"):
        mc.find_max_length(lambda n: mc.Trial(n=n + 1, fits=True), start=K)


def test_parsers():
    assert mc.parse_length("4K") == 4096 and mc.parse_length("1M") == 1 << 20
    assert mc.parse_length("1500") == 1500 and mc.parse_length("1.5K") == 1536
    assert mc.parse_resolution("1/16") == pytest.approx(1 / 16)
    assert mc.parse_resolution("0.25") == pytest.approx(0.25)
    assert mc.parse_resolution("4K") == 4096
    assert mc.resolution_tokens(1 / 16, 128 * K, 256 * K, K) == 8 * K
    assert mc.resolution_tokens(1 / 16, 4 * K, 8 * K, K) == K  # never below one multiple
    assert mc.resolution_tokens(3000, 0, 10**6, K) == 3 * K
    spec = mc._variant_spec("naive=2K,longflash=128K", mc.DEFAULT_START, mc.parse_length)
    assert spec == {"naive": 2 * K, "sdpa": mc.DEFAULT_START["sdpa"], "longflash": 128 * K}
    assert set(mc._variant_spec("8K", mc.DEFAULT_START, mc.parse_length).values()) == {8 * K}
    start = mc._start_spec("naive=16K,longflash=192K,1b:longflash=320K", ["7b", "1b"])
    assert start["7b:longflash"] == 192 * K and start["1b:longflash"] == 320 * K
    assert start["7b:naive"] == start["1b:naive"] == 16 * K
    with pytest.raises(SystemExit):
        mc._start_spec("3b:naive=1K", ["7b"])


def test_ratio_bounds():
    base = mc.Search(20 * K, 22 * K, "resolved", "", K)
    ours = mc.Search(200 * K, 208 * K, "resolved", "", 8 * K)
    r = mc.ratio_summary(base, ours)
    assert r["ratio"] == pytest.approx(10.0)
    assert r["lower"] == pytest.approx(200 / 22) and r["upper"] == pytest.approx(208 / 20)
    open_top = mc.Search(256 * K, None, "budget", "", None)
    r = mc.ratio_summary(base, open_top)
    assert r["upper"] is None and r["lower"] == pytest.approx(256 / 22)
    assert mc.ratio_summary(mc.Search(None, K, "nothing_fits", "", None), ours)["ratio"] is None


def test_extrapolate_max():
    pytest.importorskip("numpy")
    lin = [mc.Trial(n=n, fits=True, peak_allocated_gib=30 + n / K * 0.5) for n in (64 * K, 128 * K)]
    assert mc.extrapolate_max(lin, 130.0, 1) == pytest.approx(200 * K)
    quad = [mc.Trial(n=n * K, fits=True, peak_allocated_gib=10 + 0.25 * n * n) for n in (4, 8, 16)]
    assert mc.extrapolate_max(quad, 110.0, 2) == pytest.approx(20 * K, rel=1e-6)
    assert mc.extrapolate_max(quad[:2], 110.0, 2) is None  # too few points for the degree


# -- the model on the CPU -----------------------------------------------------------------
torch = pytest.importorskip("torch")


def _loss_and_grads(model, tokens, attend, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(tokens[:, :-1], tokens[:, 1:], attend, **kw)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return loss.detach(), grads


def _assert_same(a, b, rtol=2e-5):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_tiny_step_agrees_across_attention_variants():
    cfg = mc.CONFIGS["tiny"]
    model = mc.build_model(cfg, torch.device("cpu"), torch.float32, seed=0)
    tokens = torch.randint(cfg.vocab, (1, 97), generator=torch.Generator().manual_seed(1))
    naive = _loss_and_grads(model, tokens, mc.make_attention("naive"))
    ours = _loss_and_grads(model, tokens, mc.make_attention("longflash", "auto"))
    sdpa = _loss_and_grads(model, tokens, mc.make_attention("sdpa"))
    _assert_same(naive, ours)
    _assert_same(naive, sdpa)
    assert math.isfinite(float(naive[0]))
    # The comparison sees the mask: attention that lets tokens see the future differs.
    from torch.nn import functional as F

    def unmasked(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    leak = _loss_and_grads(model, tokens, unmasked)
    with pytest.raises(AssertionError):
        _assert_same(naive, leak)


def test_chunked_loss_and_checkpointing_change_nothing():
    cfg = mc.CONFIGS["tiny"]
    model = mc.build_model(cfg, torch.device("cpu"), torch.float32, seed=3)
    tokens = torch.randint(cfg.vocab, (1, 50), generator=torch.Generator().manual_seed(2))
    attend = mc.make_attention("naive")
    base = _loss_and_grads(model, tokens, attend, loss_chunk=7)  # 49 = 7 chunks of 7
    _assert_same(base, _loss_and_grads(model, tokens, attend, loss_chunk=10))  # ragged end
    _assert_same(base, _loss_and_grads(model, tokens, attend, checkpoint_layers=False))
    # The chunked loss is the plain mean cross-entropy of the full logits.
    with torch.no_grad():
        x = model.embed(tokens[:, :-1])
        cos, sin = model.rotary(49, x.device)
        for blk in model.blocks:
            x = blk(x, cos, sin, attend)
        logits = model.head(model.norm(x))
        full = torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:])
    torch.testing.assert_close(base[0], full, rtol=1e-6, atol=0)


def test_param_count_matches_the_model():
    cfg = mc.CONFIGS["tiny"]
    model = mc.build_model(cfg, torch.device("cpu"), torch.float32)
    assert sum(p.numel() for p in model.parameters()) == cfg.params()
    assert 6.7e9 < mc.CONFIGS["7b"].params() < 6.8e9  # LLaMA-2 7B: 6.74B


def test_prober_records_a_step_and_classifies_failures():
    cfg = mc.CONFIGS["tiny"]
    model = mc.build_model(cfg, torch.device("cpu"), torch.float32)
    ok = mc.Prober(model, mc.make_attention("naive"), torch.device("cpu"), loss_chunk=16)(64)
    assert ok.fits and ok.status == "fit" and ok.error is None
    assert ok.step_s == pytest.approx(ok.fwd_s + ok.bwd_s) and math.isfinite(ok.loss)
    assert all(p.grad is None for p in model.parameters()), "gradients left behind"

    def failing(exc):
        def attend(q, k, v):
            raise exc

        return mc.Prober(model, attend, torch.device("cpu"), loss_chunk=16)(64)

    oom = failing(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"))
    assert (oom.fits, oom.status) == (False, "oom") and "Tried to allocate" in oom.error
    assert failing(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")).status == (
        "oom"
    )
    bad = failing(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert (bad.fits, bad.status) == (False, "error")


def test_cpu_run_writes_json_and_table(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    argv = [
        "--device", "cpu", "--configs", "tiny", "--variants", "naive,longflash",
        "--dtype", "float32", "--start", "128", "--multiple", "128", "--max-length", "256",
        "--out", str(tmp_path), "--no-plot",
    ]  # fmt: skip
    doc = mc.run(mc.parse_args(argv))
    files = list(tmp_path.glob("max-context-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["schema"] == mc.SCHEMA and "No optimizer state" in saved["statement"]
    assert [(e["variant"], e["stopped"], e["max_fit"]) for e in saved["searches"]] == [
        ("naive", "max_length", 256),
        ("longflash", "max_length", 256),
    ]
    assert saved["searches"][1]["backend"] == "reference"
    assert saved["summary"][0]["ratio"] == pytest.approx(1.0)
    assert doc["searches"][0]["trials"][0]["n"] == 128
