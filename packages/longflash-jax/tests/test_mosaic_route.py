"""Which lowering a forward gets (Mosaic GPU or Triton), checked on the CPU.

The Mosaic kernel itself needs a Hopper GPU and jax >= 0.11; these tests cover the routing
around it: LONGFLASH_PALLAS_LOWERING, the calls Mosaic declines (they stay on Triton), the
measured "auto" table, what explain() says, and that the CPU never imports the Mosaic module.
"""

from __future__ import annotations

import subprocess
import sys
import types

import jax.numpy as jnp
import longflash
import pytest
from longflash.call import AttentionCall, Varlen, normalize_window
from longflash.registry import REGISTRY
from longflash_jax import backend, kernels, mosaic_route
from longflash_jax.problem import problem_of

ENV = mosaic_route.LOWERING_ENV


def _call(N=1024, Nk=None, D=128, Dv=None, causal=True, window=None, device="cuda", **kw):
    base = dict(
        framework="jax",
        device=device,
        dtype="bfloat16",
        B=2,
        Nq=N,
        Nk=Nk or N,
        Hq=8,
        Hk=2,
        Dqk=D,
        Dv=Dv or D,
        causal=causal,
        scale=D**-0.5,
        window=normalize_window(causal, window),
    )
    base.update(kw)
    return AttentionCall(**base)


@pytest.fixture
def hopper(monkeypatch):
    """A process that could run Mosaic GPU kernels (the runtime probe says yes)."""
    monkeypatch.setattr(mosaic_route, "runtime_reason", lambda: "")


@pytest.fixture
def measured(monkeypatch):
    """tiles.json's auto table, replaced: Mosaic won hd128 causal, Triton hd128 full."""
    data = dict(mosaic_route.table())
    data["lowering"] = {"hd128-causal": "mosaic", "hd128-full": "triton"}
    monkeypatch.setattr(mosaic_route, "table", lambda: data)


def test_dense_training_shapes_are_eligible():
    for kw in [
        dict(),
        dict(causal=False),
        dict(N=1000, Nk=1304),  # lengths not multiples of the tile, Nq != Nk
        dict(N=1304, Nk=1000, Hk=1),
        dict(D=64),
        dict(D=256, causal=False),
        dict(dtype="float16"),
    ]:
        assert mosaic_route.mosaic_reasons(problem_of(_call(**kw))) == [], kw


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(window=(64, 0)), "sliding window"),
        (dict(causal=False, window=(8, 3)), "sliding window"),
        (dict(softcap=30.0), "softcap"),
        (dict(D=128, Dv=64), "head dims 128/64"),
        (dict(D=96), "head dims 96/96"),
        (dict(N=1001), "multiples of 8"),
        (dict(N=40), "shorter than one tile"),
        (dict(device="cpu"), "NVIDIA GPUs only"),
        (dict(varlen=Varlen(None, None, 2048, 2048)), "varlen"),
    ],
)
def test_mosaic_declines_with_a_reason(kw, words):
    reasons = mosaic_route.mosaic_reasons(problem_of(_call(**kw)))
    assert any(words in r for r in reasons), reasons


def test_default_is_auto_and_auto_without_data_is_triton(monkeypatch, hopper):
    monkeypatch.delenv(ENV, raising=False)
    assert mosaic_route.requested() == "auto"
    data = dict(mosaic_route.table())
    data["lowering"] = {}
    monkeypatch.setattr(mosaic_route, "table", lambda: data)
    lowering, why = mosaic_route.choose(problem_of(_call()))
    assert lowering == "triton" and "no Mosaic measurement for hd128-causal" in why


def test_auto_follows_the_measured_table(monkeypatch, hopper, measured):
    monkeypatch.setenv(ENV, "auto")
    assert mosaic_route.choose(problem_of(_call(causal=True)))[0] == "mosaic"
    lowering, why = mosaic_route.choose(problem_of(_call(causal=False)))
    assert lowering == "triton" and "keeps hd128-full on Triton" in why
    # Ineligible calls stay on Triton whatever the table says.
    lowering, why = mosaic_route.choose(problem_of(_call(causal=True, softcap=5.0)))
    assert lowering == "triton" and "softcap" in why


def test_forced_lowerings(monkeypatch, hopper, measured):
    monkeypatch.setenv(ENV, "triton")
    assert mosaic_route.choose(problem_of(_call()))[0] == "triton"
    monkeypatch.setenv(ENV, "mosaic")
    # hd128 full measured faster on Triton, but the user asked for Mosaic.
    assert mosaic_route.choose(problem_of(_call(causal=False))) == ("mosaic", f"{ENV}=mosaic")
    lowering, why = mosaic_route.choose(problem_of(_call(window=(16, 0))))
    assert lowering == "triton" and "sliding window" in why


def test_no_hopper_means_triton(monkeypatch, measured):
    monkeypatch.setenv(ENV, "mosaic")
    monkeypatch.setattr(mosaic_route, "runtime_reason", lambda: "GPU compute capability 8.0")
    lowering, why = mosaic_route.choose(problem_of(_call()))
    assert lowering == "triton" and "unavailable: GPU compute capability 8.0" in why


def test_runtime_probe_on_this_machine():
    # jax 0.10 (CI) is refused by version; a newer jax on a CPU has no GPU to run on.
    mosaic_route.runtime_reason.cache_clear()
    try:
        why = mosaic_route.runtime_reason()
    finally:
        mosaic_route.runtime_reason.cache_clear()
    assert why and ("jax" in why or "GPU" in why), why


def test_unknown_value_declines_every_call(monkeypatch):
    monkeypatch.setenv(ENV, "cutlass")
    reasons = backend.check(_call())
    assert any(ENV in r and "cutlass" in r for r in reasons), reasons
    monkeypatch.setenv(ENV, "MOSAIC")  # case does not matter
    assert backend.check(_call()) == []


def test_explain_names_the_lowering(monkeypatch, hopper, measured):
    monkeypatch.setenv(ENV, "auto")
    text = REGISTRY.explain(_call(causal=True))
    line = next(x for x in text.splitlines() if x.strip().startswith("pallas:"))
    assert "forward: Mosaic GPU lowering" in line and "backward: Triton lowering" in line
    text = REGISTRY.explain(_call(causal=True, softcap=3.0))
    line = next(x for x in text.splitlines() if x.strip().startswith("pallas:"))
    assert "forward: Triton lowering" in line and "softcap" in line


def test_explain_on_cpu_says_interpreter(monkeypatch):
    monkeypatch.setenv("LONGFLASH_PALLAS_INTERPRET", "1")
    q = jnp.zeros((1, 32, 2, 64), jnp.bfloat16)
    text = longflash.explain(q, q, q, causal=True)
    line = next(x for x in text.splitlines() if x.strip().startswith("pallas:"))
    assert "Pallas interpreter" in line


def test_forward_dispatches_to_the_mosaic_kernel(monkeypatch, hopper):
    """With Mosaic chosen, kernels.forward calls mosaic.forward with tiles.json's tile
    (a stand-in module here: the real one needs a GPU)."""
    seen = {}

    class Tile:
        def __init__(self, **kw):
            self.kw = kw

    def fake_forward(p, tile, q, k, v):
        seen.update(p=p, tile=tile.kw)
        return "out", "lse"

    fake = types.ModuleType("longflash_jax.mosaic")
    fake.MosaicTile, fake.forward = Tile, fake_forward
    monkeypatch.setitem(sys.modules, "longflash_jax.mosaic", fake)
    import longflash_jax

    monkeypatch.setattr(longflash_jax, "mosaic", fake, raising=False)
    monkeypatch.setenv(ENV, "mosaic")
    call = _call(N=256, D=64)
    q = jnp.zeros((2, 256, 8, 64), jnp.bfloat16)
    k = jnp.zeros((2, 256, 2, 64), jnp.bfloat16)
    assert kernels.forward(call, q, k, k) == ("out", "lse")
    assert seen["p"] == problem_of(call)
    assert seen["tile"] == mosaic_route.mosaic_tile(problem_of(call))


def test_cpu_never_imports_the_mosaic_module():
    code = (
        "import os, sys\n"
        "os.environ['LONGFLASH_PALLAS_INTERPRET'] = '1'\n"
        "os.environ['LONGFLASH_PALLAS_LOWERING'] = 'mosaic'\n"
        "import jax.numpy as jnp, longflash\n"
        "q = jnp.ones((1, 16, 1, 16), jnp.bfloat16)\n"
        "out = longflash.attention(q, q, q, causal=True, backend='pallas')\n"
        "assert out.shape == q.shape\n"
        "mods = ('longflash_jax.mosaic', 'jax.experimental.pallas.mosaic_gpu')\n"
        "bad = [m for m in mods if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_shipped_table_picks_what_the_h200_measured(monkeypatch, hopper):
    """tiles.json as shipped: the hd128 and hd64 forwards (causal and full) measured faster on
    Mosaic; hd256 was not timed and stays on Triton."""
    monkeypatch.delenv(ENV, raising=False)
    for d in (64, 128):
        for causal in (True, False):
            assert mosaic_route.choose(problem_of(_call(D=d, causal=causal)))[0] == "mosaic"
    lowering, why = mosaic_route.choose(problem_of(_call(D=256)))
    assert lowering == "triton" and "no Mosaic measurement" in why


# -- the backward ------------------------------------------------------------------------


def test_backward_dense_training_shapes_are_eligible():
    for kw in [
        dict(),
        dict(causal=False),
        dict(N=1000, Nk=1304),
        dict(N=1304, Nk=1000, Hk=1),
        dict(D=64),
        dict(D=64, causal=False, dtype="float16"),
    ]:
        assert mosaic_route.mosaic_bwd_reasons(problem_of(_call(**kw))) == [], kw


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(window=(64, 0)), "sliding window"),
        (dict(softcap=30.0), "softcap"),
        (dict(D=128, Dv=64), "head dims 128/64"),
        (dict(D=256), "head dims 256/256"),  # the forward takes hd256, the backward not
        (dict(D=96), "head dims 96/96"),
        (dict(N=1001), "multiples of 8"),
        (dict(N=40), "shorter than one tile"),
        (dict(device="cpu"), "NVIDIA GPUs only"),
        (dict(varlen=Varlen(None, None, 2048, 2048)), "varlen"),
        (dict(scale=-0.1), "scale -0.1 <= 0"),
    ],
)
def test_mosaic_backward_declines_with_a_reason(kw, words):
    reasons = mosaic_route.mosaic_bwd_reasons(problem_of(_call(**kw)))
    assert any(words in r for r in reasons), reasons


def test_backward_auto_without_a_backward_measurement_is_triton(monkeypatch, hopper, measured):
    """The forward's measurement says nothing about the backward: auto keeps Triton."""
    monkeypatch.setenv(ENV, "auto")
    p = problem_of(_call(causal=True))
    assert mosaic_route.choose(p)[0] == "mosaic"
    lowering, why = mosaic_route.choose_backward(p)
    assert lowering == "triton" and "no Mosaic measurement for bwd-hd128-causal" in why


def test_backward_auto_follows_its_own_entries(monkeypatch, hopper):
    data = dict(mosaic_route.table())
    data["lowering"] = {"bwd-hd128-causal": "mosaic", "bwd-hd128-full": "triton"}
    monkeypatch.setattr(mosaic_route, "table", lambda: data)
    monkeypatch.setenv(ENV, "auto")
    lowering, why = mosaic_route.choose_backward(problem_of(_call(causal=True)))
    assert lowering == "mosaic" and "bwd-hd128-causal" in why
    lowering, why = mosaic_route.choose_backward(problem_of(_call(causal=False)))
    assert lowering == "triton" and "keeps bwd-hd128-full on Triton" in why
    # The forward keys are separate: hd128-causal has no forward entry here.
    assert mosaic_route.choose(problem_of(_call(causal=True)))[0] == "triton"
    lowering, why = mosaic_route.choose_backward(problem_of(_call(causal=True, softcap=2.0)))
    assert lowering == "triton" and "softcap" in why


def test_backward_forced(monkeypatch, hopper):
    monkeypatch.setenv(ENV, "mosaic")
    assert mosaic_route.choose_backward(problem_of(_call())) == ("mosaic", f"{ENV}=mosaic")
    lowering, why = mosaic_route.choose_backward(problem_of(_call(D=256)))
    assert lowering == "triton" and "head dims 256/256" in why
    monkeypatch.setenv(ENV, "triton")
    assert mosaic_route.choose_backward(problem_of(_call()))[0] == "triton"


def test_backward_needs_hopper(monkeypatch):
    monkeypatch.setenv(ENV, "mosaic")
    monkeypatch.setattr(mosaic_route, "runtime_reason", lambda: "no GPU visible to jax")
    lowering, why = mosaic_route.choose_backward(problem_of(_call()))
    assert lowering == "triton" and "unavailable: no GPU visible" in why


def test_shipped_table_picks_the_measured_backward(monkeypatch, hopper):
    """The H200 measured the Mosaic backward faster than Triton's at hd128 (causal and full):
    auto picks it there. At hd64 neither won at both lengths, so the table keeps Triton."""
    monkeypatch.delenv(ENV, raising=False)
    bwd = {k: v for k, v in mosaic_route.table()["lowering"].items() if k.startswith("bwd-")}
    assert set(bwd) == {"bwd-hd128-full", "bwd-hd128-causal", "bwd-hd64-full", "bwd-hd64-causal"}
    for causal in (True, False):
        lowering, why = mosaic_route.choose_backward(problem_of(_call(D=128, causal=causal)))
        assert lowering == "mosaic" and "measured faster for bwd-hd128-" in why
        lowering, why = mosaic_route.choose_backward(problem_of(_call(D=64, causal=causal)))
        assert lowering == "triton" and "keeps bwd-hd64-" in why
    # The hd64 forward runs on Mosaic while its backward stays on Triton.
    assert mosaic_route.choose(problem_of(_call(D=64, causal=False)))[0] == "mosaic"


def test_shipped_backward_tiles_cover_64_and_128():
    for d in (64, 128):
        t = mosaic_route.mosaic_bwd_tiles(problem_of(_call(D=d)))
        assert set(t) == {"dkdv", "dq", "fused"}
        assert t["fused"] is False  # measured slower on the H200: the two kernels are the default
        for kernel in (t["dkdv"], t["dq"]):
            assert set(kernel) == {"block_q", "block_k", "stages"}
            # wgmma M is 64 rows per warpgroup; N and K multiples of 16.
            assert kernel["block_q"] % 16 == 0 and kernel["block_k"] % 16 == 0


def test_explain_names_the_backward_lowering(monkeypatch, hopper):
    monkeypatch.setenv(ENV, "mosaic")
    line = next(
        x
        for x in REGISTRY.explain(_call(causal=False)).splitlines()
        if x.strip().startswith("pallas:")
    )
    assert "forward: Mosaic GPU lowering" in line and "backward: Mosaic GPU lowering" in line
    line = next(
        x for x in REGISTRY.explain(_call(D=256)).splitlines() if x.strip().startswith("pallas:")
    )
    assert "forward: Mosaic GPU lowering" in line
    assert "backward: Triton lowering (Mosaic GPU does not take it: head dims 256/256" in line


def test_backward_dispatches_to_the_mosaic_kernel(monkeypatch, hopper):
    """With Mosaic chosen, kernels.backward calls mosaic_bwd.backward with tiles.json's
    tiles (a stand-in module here: the real one needs a GPU)."""
    seen = {}

    class Tile:
        def __init__(self, **kw):
            self.kw = kw

    class Tiles:
        def __init__(self, dkdv, dq, fused):
            self.kw = {"dkdv": dkdv.kw, "dq": dq.kw, "fused": fused}

    def fake_backward(p, tiles, do, q, k, v, out, lse):
        seen.update(p=p, tiles=tiles.kw)
        return "dq", "dk", "dv"

    fake = types.ModuleType("longflash_jax.mosaic_bwd")
    fake.MosaicTile, fake.MosaicBwdTiles, fake.backward = Tile, Tiles, fake_backward
    monkeypatch.setitem(sys.modules, "longflash_jax.mosaic_bwd", fake)
    import longflash_jax

    monkeypatch.setattr(longflash_jax, "mosaic_bwd", fake, raising=False)
    monkeypatch.setenv(ENV, "mosaic")
    call = _call(N=256, D=64)
    q = jnp.zeros((2, 256, 8, 64), jnp.bfloat16)
    k = jnp.zeros((2, 256, 2, 64), jnp.bfloat16)
    lse = jnp.zeros((2, 8, 256), jnp.float32)
    assert kernels.backward(call, q, q, k, k, q, lse) == ("dq", "dk", "dv")
    assert seen["p"] == problem_of(call)
    assert seen["tiles"] == mosaic_route.mosaic_bwd_tiles(problem_of(call))
    # An explicit Triton request, or Triton tiles, never reaches the Mosaic module.
    seen.clear()
    monkeypatch.setattr(kernels, "_backward", lambda p, t, *arrays: "triton")
    assert kernels.backward(call, q, q, k, k, q, lse, lowering="triton") == "triton"
    assert (
        kernels.backward(call, q, q, k, k, q, lse, tiles=kernels.tiles_for(problem_of(call)))
        == "triton"
    )
    monkeypatch.setenv(ENV, "triton")
    assert kernels.backward(call, q, q, k, k, q, lse) == "triton"
    assert not seen


def test_cpu_grad_never_imports_the_mosaic_backward():
    code = (
        "import os, sys\n"
        "os.environ['LONGFLASH_PALLAS_INTERPRET'] = '1'\n"
        "os.environ['LONGFLASH_PALLAS_LOWERING'] = 'mosaic'\n"
        "import jax, jax.numpy as jnp, longflash\n"
        "q = jnp.ones((1, 16, 1, 16), jnp.float32).astype(jnp.bfloat16)\n"
        "f = lambda q: longflash.attention(q, q, q, causal=True, backend='pallas')"
        ".astype(jnp.float32).sum()\n"
        "g = jax.grad(f)(q)\n"
        "assert g.shape == q.shape\n"
        "mods = ('longflash_jax.mosaic_bwd', 'longflash_jax.mosaic',"
        " 'jax.experimental.pallas.mosaic_gpu')\n"
        "bad = [m for m in mods if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
