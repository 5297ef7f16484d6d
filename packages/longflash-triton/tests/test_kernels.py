"""Kernel-specific tests: the block ranges the kernels iterate over, the backend object."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE
from longflash.call import AttentionCall
from longflash_triton import CAPABILITIES, backend
from longflash_triton.tiles import band_blocks


@triton.jit
def _band_probe(
    OUT,
    len_r,
    len_c,
    lo_w,
    hi_w,
    HAS_LO: tl.constexpr,
    HAS_HI: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
):
    r0 = tl.program_id(0) * R
    c0, c1, c2, c3 = band_blocks(r0, R, len_r, len_c, lo_w, hi_w, HAS_LO, HAS_HI, C)
    tl.store(
        OUT + tl.program_id(0) * 4 + tl.arange(0, 4),
        tl.where(
            tl.arange(0, 4) == 0,
            c0,
            tl.where(tl.arange(0, 4) == 1, c1, tl.where(tl.arange(0, 4) == 2, c2, c3)),
        ),
    )


def _visible(len_r, len_c, lo_w, hi_w):
    off = len_c - len_r
    r = torch.arange(len_r)[:, None]
    c = torch.arange(len_c)[None, :]
    m = torch.ones(len_r, len_c, dtype=torch.bool)
    if lo_w is not None:
        m &= c >= r + off - lo_w
    if hi_w is not None:
        m &= c <= r + off + hi_w
    return m


@pytest.mark.parametrize("len_r,len_c", [(37, 37), (20, 53), (53, 20), (16, 16), (5, 70)])
@pytest.mark.parametrize(
    "lo_w,hi_w", [(None, None), (None, 0), (3, 0), (0, 0), (9, 4), (None, 11), (2, None), (40, 40)]
)
def test_band_blocks_skip_masked_tiles(len_r, len_c, lo_w, hi_w):
    """The ranges the kernels loop over cover every visible (row, column) pair, contain no
    column block that no valid row of the block sees (fully masked tiles are skipped), and
    the mask-free middle range really needs no mask."""
    from longflash_triton import interpret

    interpret.patch()
    R, C = 16, 16
    n_r = triton.cdiv(len_r, R)
    out = torch.zeros(n_r * 4, dtype=torch.int32, device=DEVICE)
    _band_probe[(n_r,)](
        out, len_r, len_c, lo_w or 0, hi_w or 0, lo_w is not None, hi_w is not None, R, C
    )
    got = out.view(n_r, 4).cpu()
    vis = _visible(len_r, len_c, lo_w, hi_w)
    for i in range(n_r):
        c0, c1, c2, c3 = got[i].tolist()
        assert c0 % C == 0 and c0 <= c1 <= c2 <= c3 or c3 <= c0, got[i]
        rows = vis[i * R : (i + 1) * R]
        cols_seen = rows.any(0).nonzero().flatten()
        if len(cols_seen) == 0:
            assert c3 <= c0, f"row block {i} sees nothing but loops over [{c0}, {c3})"
            continue
        assert c0 <= cols_seen.min() and cols_seen.max() < c3
        for j0 in range(c0, c3, C):
            block = rows[:, j0 : j0 + C]
            assert block.any(), f"row block {i}: column block {j0} is fully masked"
            if c1 <= j0 < c2:
                assert block.shape[1] == C and block.all(), f"block {j0} is not mask-free"
        # tight: the first and last column blocks hold a visible column
        assert cols_seen.min() // C == c0 // C and cols_seen.max() // C == (c3 - 1) // C


def _call(**kw) -> AttentionCall:
    base = dict(
        framework="torch",
        device=DEVICE,
        dtype="bfloat16",
        B=1,
        Nq=8,
        Nk=8,
        Hq=2,
        Hk=1,
        Dqk=64,
        Dv=64,
        causal=False,
        scale=0.125,
    )
    base.update(kw)
    return AttentionCall(**base)


def test_check_accepts_every_feature():
    call = _call(causal=True, window=(4, 0), softcap=30.0, Dqk=192, Dv=96)
    assert backend.check(call) == []


def test_check_reasons():
    reasons = backend.check(_call(framework="jax", dtype="float64", Dqk=320, Dv=8))
    text = "; ".join(reasons)
    assert "jax front-end not supported" in text
    assert "dtype float64 not supported" in text
    assert "head_dim 320 > 256" in text
    assert len(reasons) == 3


def test_check_float32_only_in_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.check(_call(dtype="float32", device="cpu")) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = backend.check(_call(dtype="float32", device="cuda"))
    assert len(reasons) == 1 and "float32" in reasons[0] and "TRITON_INTERPRET" in reasons[0]


def test_check_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("TRITON_INTERPRET=1" in r for r in backend.check(_call(device="cpu")))


def test_capabilities_are_the_one_table():
    assert backend.frameworks == CAPABILITIES.frameworks
    assert set(CAPABILITIES.dtypes) == {"float16", "bfloat16"}
    assert "float32" in CAPABILITIES.interpret_dtypes
    assert CAPABILITIES.head_dim_max == 256


def test_import_is_cheap():
    code = "import sys, longflash_triton; print(any(m in sys.modules for m in ('triton', 'torch')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_registered_through_entry_point():
    import longflash

    info = {b.name: b for b in longflash.backends()}
    assert "triton" in info and info["triton"].priority == 50
    assert info["triton"].available, info["triton"].reason
