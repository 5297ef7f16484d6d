"""The IO model of benchmarks/io.py (docs/io.md): closed-form checks, the tiles it assumes
against the kernel sources, ncu CSV parsing, and the CPU dry run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _scripts import load_script

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def io():
    # Loaded under its own name: "io" would collide with the standard library.
    return load_script("benchmarks/io.py", "longflash_bench_io")


def test_forward_terms_closed_form(io):
    N, d, H = 16384, 128, 2
    m = io.model_fwd(N, d, H, io.cuda_tiles(d))
    nd = N * d * 2
    assert m["compulsory"] == H * (4 * nd + 4 * N)
    assert m["passes"] == N // 128
    # K and V once per 128-query block, Q and O once, lse once.
    assert m["l2_model"] == H * (2 * nd + 4 * N + (N // 128) * 2 * nd)
    # One head's K/V (8 MiB) fits in 50 MiB: DRAM sees only the compulsory bytes.
    assert m["fits_l2"] and m["dram_model"] == m["compulsory"]


def test_forward_reread_term_scales_as_n2_d_over_br(io):
    # The tiled term is passes * 2*N*d*e = 2*N^2*d*e/Br: 4x per doubling of N, 2x per d.
    t = io.Tiles(fwd_rows=128, fwd_cols=128, kv_keys=64, kv_rows=64)

    def reread(N, d):
        m = io.model_fwd(N, d, 1, t)
        return m["l2_model"] - (2 * N * d * 2 + 4 * N)

    assert reread(8192, 128) == 4 * reread(4096, 128)
    assert reread(8192, 128) == 2 * reread(8192, 64)
    big = io.Tiles(fwd_rows=256, fwd_cols=128, kv_keys=64, kv_rows=64)
    assert io.model_fwd(8192, 128, 1, big)["passes"] * 2 == io.model_fwd(8192, 128, 1, t)["passes"]


def test_spill_when_working_set_exceeds_l2(io):
    small = io.Machine(sms=132, l2_bytes=4 << 20)
    m = io.model_fwd(65536, 128, 1, io.cuda_tiles(128), small)
    # 512 CTAs over 132 SMs: 4 waves; K/V (32 MiB) no longer fit, so each wave re-reads them.
    assert not m["fits_l2"] and m["waves_per_head"] == 4
    assert m["dram_model"] - m["compulsory"] == 3 * 2 * 65536 * 128 * 2
    assert m["dram_read_model"] + m["dram_write_model"] == m["dram_model"]


def test_backward_floor_and_threshold(io):
    d = 128
    m = io.model_bwd(4096, d, 4, io.cuda_tiles(d))
    assert m["floor"] > m["compulsory"]  # fp32 dQ accumulator and per-kernel re-reads
    assert m["dram_read_model"] + m["dram_write_model"] == m["dram_model"]
    n = io.spill_threshold("cuda", d, 8, "bwd")
    assert n is not None
    tiles = io.cuda_tiles(d)
    assert io.model_bwd(n, d, 8, tiles)["dram_model"] > io.model_bwd(n, d, 8, tiles)["floor"]
    below = io.model_bwd(n - 1024, d, 8, tiles)
    assert below["dram_model"] == below["floor"]


def test_naive_square_passes(io):
    f = io.model_naive(4096, 64, 1, "fwd")
    b = io.model_naive(4096, 64, 1, "bwd")
    assert f["square_bytes"] == 4 * 4096 * 4096 * 2
    assert b["square_bytes"] == 7 * 4096 * 4096 * 2
    assert f["dram_read_model"] + f["dram_write_model"] == f["dram_model"]


def test_cuda_tiles_match_kernel_sources(io):
    fwd = (REPO / "cuda/src/sm90/fwd.cuh").read_text()
    params = (REPO / "cuda/src/params.h").read_text()
    # The default forward: two consumer warpgroups of 64 query rows (the hd64 v3 variant
    # with three is opt-in and not what io.py models).
    assert "int kConsumerWGs_ = 2," in fwd and "kBlockM = 64 * kConsumerWGs;" in fwd
    assert "kBlockN = kDqk <= 128 ? 128 : (kDqk <= 192 ? 96 : 64);" in fwd
    assert re.search(r"kBwdBlockN = 64;", params) and re.search(r"kBwdBlockM = 64;", params)
    v5 = (REPO / "cuda/src/sm90/bwd_v5.cuh").read_text()
    assert "kBlockM = kDqk == 64 ? 128 : 64;" in v5 and "kBlockN = 128;" in v5
    assert "kDqk == kDv && (kDqk == 64 || kDqk == 128)" in v5  # where v5/v7 (the default) run
    d256 = (REPO / "cuda/src/sm90/bwd_d256.cuh").read_text()  # v6, the default at d 256
    assert "kBlockM = 64;" in d256 and "kBlockN = 64;" in d256
    assert [(io.cuda_tiles(d).kv_keys, io.cuda_tiles(d).kv_rows) for d in (64, 128, 256)] == [
        (128, 128),
        (128, 64),
        (64, 64),
    ]
    assert [io.cuda_tiles(d).fwd_cols for d in (64, 128, 192, 256)] == [128, 128, 96, 64]


def test_triton_tiles_from_configs(io):
    table = json.loads(
        (REPO / "packages/longflash-triton/src/longflash_triton/configs.json").read_text()
    )["sm90"]

    def entry(kernel):
        # The non-causal ("full") entry, else the any-mask one: the lookup io.py models.
        return table.get(f"{kernel}/128/full") or table[f"{kernel}/128/*"]

    t = io.triton_tiles(128)
    assert t.fwd_rows == entry("fwd")["BM"]
    assert t.kv_keys == entry("dkdv")["BN"]
    assert t.dq_rows == entry("dq")["BM"]


CSV = """==PROF== Connected to process 1
"ID","Process ID","Kernel Name","dram__bytes_read.sum","lts__t_bytes.sum"
"","","","byte","byte"
"0","1","at::cuda::spin_kernel(long)","0","64"
"1","1","fwd_kernel","1,000","5,000"
"2","1","at::cuda::spin_kernel(long)","0","64"
"3","1","at::cuda::spin_kernel(long)","0","64"
"4","1","bwd_preprocess","10","20"
"5","1","bwd_kernel","300","4,000"
"6","1","at::cuda::spin_kernel(long)","0","64"
"""


def test_parse_and_segment(io):
    rows = io.parse_ncu_csv(CSV)
    assert [r["ID"] for r in rows] == list(range(7))
    segs = io.segment(rows)
    assert [[r["Kernel Name"] for r in s] for s in segs] == [
        ["fwd_kernel"],
        ["bwd_preprocess", "bwd_kernel"],
    ]
    summ = io.summarize(segs[1], ["dram__bytes_read.sum", "lts__t_bytes.sum"])
    assert summ["dram__bytes_read.sum"] == 310 and summ["lts__t_bytes.sum"] == 4020


def test_dry_run_and_plot(io, tmp_path, capsys):
    assert io.main(["--dry-run", "--head-dims", "64,128", "--seqlens", "1K,2K"]) == 0
    text = capsys.readouterr().out
    assert "Model (cuda" in text and "naive DRAM" in text
    pytest.importorskip("matplotlib")
    # A results file as the GPU run writes it, with measurements equal to the model.
    args = io.argparse.Namespace(
        head_dims=[64], seqlens=[1024, 2048], heads=2, naive=True, naive_max_gib=1.0
    )
    rows = io.model_rows("cuda", io.build_plan(args), io.Machine())
    for r in rows:
        for who in ("ours", "naive"):
            m = r[who]
            r[f"{who}_measured"] = {
                "status": "ok",
                "dram_read": m["dram_read_model"],
                "dram_write": m["dram_write_model"],
                "dram": m["dram_model"],
                "l2": m["l2_model"],
            }
    part = {"backend": "cuda", "machine": {"l2_bytes": 50 << 20}, "device": {}, "rows": rows}
    assert io.finish([part], tmp_path, "io-test") == 0
    assert (tmp_path / "io-test.json").exists() and (tmp_path / "io-test.png").exists()
    assert "1.00" in capsys.readouterr().out
