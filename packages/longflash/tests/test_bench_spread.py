"""benchmarks/bench_spread.py: a target counts as met only when the median over the runs meets
it and no run falls short by more than the slack."""

from __future__ import annotations

import json
from pathlib import Path

from _scripts import load_script

bs = load_script("benchmarks/bench_spread.py", "bench_spread")


def _run(tmp_path: Path, name: str, fwd128: float, bwd64: float, small: float = 0.5) -> Path:
    cases, ratios = [], []
    for key, direction, d, n, speedup in (
        ("a", "fwd", 128, 4096, fwd128),
        ("b", "bwd", 64, 16384, bwd64),
        ("c", "fwd", 64, 1024, small),  # under --min-n: never checked
    ):
        cases.append({"key": key, "direction": direction, "causal": False, "Dqk": d, "Nq": n})
        ratios.append({"case": key, "backend": "cuda", "peer": "sdpa-flash", "speedup": speedup})
        ratios.append({"case": key, "backend": "cuda", "peer": "sdpa-cudnn", "speedup": 0.1})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"cases": cases, "ratios": ratios}))
    return path


TARGETS = ["--target", "*=1.5", "--target", "fwd:d128=1.75"]


def test_met_when_median_and_every_run_hold(tmp_path, capsys):
    runs = [_run(tmp_path, f"r{i}", f, 1.6) for i, f in enumerate((1.76, 1.74, 1.80))]
    assert bs.main([str(p) for p in runs] + TARGETS) == 0
    out = capsys.readouterr().out
    assert "every target met" in out
    assert "N=1024" not in out


def test_missed_when_the_median_falls_short(tmp_path, capsys):
    runs = [_run(tmp_path, f"r{i}", f, 1.6) for i, f in enumerate((1.745, 1.748, 1.80))]
    assert bs.main([str(p) for p in runs] + TARGETS) == 1
    assert "d128 fwd N=4096" in capsys.readouterr().out.split("MISSED")[0].splitlines()[-1]


def test_missed_when_one_run_is_beyond_the_slack(tmp_path):
    runs = [_run(tmp_path, f"r{i}", 1.8, b) for i, b in enumerate((1.6, 1.6, 1.48))]
    paths = [str(p) for p in runs]
    assert bs.main(paths + TARGETS) == 1  # 1.48 < 0.99 * 1.5
    assert bs.main(paths + TARGETS + ["--slack", "0.02"]) == 0


def test_most_specific_target_applies():
    targets = bs.parse_targets(["*=1.5", "fwd=1.6", "fwd:d128=1.75", "d64=1.2"])
    assert bs._target_for(targets, "fwd", 128) == 1.75
    assert bs._target_for(targets, "fwd", 64) == 1.6
    assert bs._target_for(targets, "bwd", 64) == 1.2
    assert bs._target_for(targets, "bwd", 256) == 1.5
    assert bs._target_for({}, "bwd", 256) is None
