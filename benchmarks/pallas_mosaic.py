"""The pallas backend's Mosaic GPU forward against its Triton-lowered forward, on one H200.

From the repository root (PYTHONPATH covering packages/*/src, jax >= 0.11 with CUDA):

    python benchmarks/pallas_mosaic.py --budget-s 150     # JSON to $OUT (or --out)

Phases, each within the budget (what does not fit is listed under "skipped"):
  correctness  the Mosaic forward (out, lse) against the float64 oracle of the shared suite
               (longflash.testing: same checks and bf16/fp16 tolerances as the conformance
               suite): causal and not, Nq != Nk, lengths not multiples of the tile, GQA,
               hd 64/128/256, fp16
  timing       hd128 bf16, N = 4K and 16K (batch*N = 16K, 16 heads), causal and not: Mosaic
               forward, Triton-lowered forward, jax.nn.dot_product_attention(cudnn) and JAX's
               Pallas mha, in one process; Mosaic vs Triton outputs cross-checked
  variants     other Mosaic tiles at 16K
TFLOP/s count 4*B*H*N^2*D (half when causal). Times: pallas_tune.bench (medians of batches
of back-to-back calls after a compiling warm-up). The table goes to stdout last.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pallas_tune import Budget, bench  # noqa: E402  (one timing method for both scripts)

K = 1024
# name: (B, Nq, Nk, Hq, Hk, D, causal, dtype)
CHECKS: dict[str, tuple[int, int, int, int, int, int, bool, str]] = {
    "hd128-1000-full": (2, 1000, 1000, 4, 4, 128, False, "bfloat16"),
    "hd128-1000x1304-causal-gqa": (2, 1000, 1304, 8, 2, 128, True, "bfloat16"),
    "hd128-1304x1000-causal-mqa": (1, 1304, 1000, 4, 1, 128, True, "bfloat16"),
    "hd64-2048-causal-gqa": (1, 2048, 2048, 4, 2, 64, True, "bfloat16"),
    "hd256-1096-full": (1, 1096, 1096, 2, 2, 256, False, "bfloat16"),
    "hd128-4k-causal-fp16": (1, 4 * K, 4 * K, 2, 2, 128, True, "float16"),
}
TIMED = [(n, c) for n in (4 * K, 16 * K) for c in (False, True)]
VARIANTS = [(64, 64, 2), (64, 64, 3), (64, 128, 2)]


def log(budget: Budget, msg: str) -> None:
    print(f"[{budget.elapsed():6.1f}s] {msg}", flush=True)


def inputs(shape_q, shape_k, dtype: str, seed: int = 0) -> tuple[Any, Any, Any]:
    import jax
    import jax.numpy as jnp

    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    dt = jnp.dtype(dtype)
    return (
        jax.random.normal(kq, shape_q, jnp.float32).astype(dt),
        jax.random.normal(kk, shape_k, jnp.float32).astype(dt),
        jax.random.normal(kv, shape_k, jnp.float32).astype(dt),
    )


def forward_fn(call: Any, lowering: str) -> Any:
    import jax
    from longflash_jax import kernels

    return jax.jit(lambda q, k, v: kernels.forward(call, q, k, v, lowering=lowering))


def check_phase(budget: Budget, res: dict[str, Any]) -> None:
    import numpy as np
    from longflash.frontends import jax as fe
    from longflash.testing.oracle import attention_oracle
    from longflash.testing.tolerances import compare, errors

    for name, (b, nq, nk, hq, hk, d, causal, dtype) in CHECKS.items():
        if budget.until(0.35) < 0:
            res["skipped"].append(f"check {name}")
            continue
        row: dict[str, Any] = {"name": name, "dtype": dtype}
        try:
            q, k, v = inputs((b, nq, hq, d), (b, nk, hk, d), dtype)
            call = fe.make_call(q, k, v, causal=causal, scale=None, window=None, softcap=None)
            out, lse = forward_fn(call, "mosaic")(q, k, v)
            got = {"out": np.asarray(out, np.float64), "lse": np.asarray(lse, np.float64)}
            ref = attention_oracle(q, k, v, causal=causal)
            row["errors"] = {n: float(e) for n, e in errors(got, ref).items()}
            row["problems"] = compare(got, ref, dtype)
            row["ok"] = not row["problems"]
        except Exception as exc:
            row["ok"] = False
            row["exception"] = "".join(traceback.format_exception_only(exc))[-3000:]
        res["checks"].append(row)
        log(budget, f"check {name}: {'ok' if row['ok'] else 'FAIL'} {row.get('errors', '')}")
        if "exception" in row:
            print(row["exception"], flush=True)


def peers(n: int, causal: bool, d: int) -> dict[str, Any]:
    import jax

    scale = d**-0.5
    out = {
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
        )
    }
    try:
        from jax.experimental.pallas.ops.gpu import attention as pa

        out["pallas_mha"] = lambda q, k, v: pa.mha(
            q, k, v, None, sm_scale=scale, causal=causal, block_sizes=pa.BlockSizes.get_default()
        )
    except Exception as exc:  # recorded, not fatal: the comparison that matters is ours
        out["pallas_mha_error"] = repr(exc)
    return out


def time_phase(budget: Budget, res: dict[str, Any], reps: int) -> None:
    import jax
    import jax.numpy as jnp
    from longflash.frontends import jax as fe

    d, h = 128, 16
    for n, causal in TIMED:
        b = 16 * K // n
        name = f"hd{d}-{n // K}k{'-causal' if causal else ''}"
        flops = 4.0 * b * h * n * n * d / (2 if causal else 1)
        row: dict[str, Any] = {"name": name, "B": b, "N": n, "H": h, "D": d, "causal": causal}
        q, k, v = inputs((b, n, h, d), (b, n, h, d), "bfloat16", seed=1)
        call = fe.make_call(q, k, v, causal=causal, scale=None, window=None, softcap=None)
        impls: dict[str, Any] = {
            "mosaic": forward_fn(call, "mosaic"),
            "triton": forward_fn(call, "triton"),
        }
        for key, fn in peers(n, causal, d).items():
            if callable(fn):
                impls[key] = jax.jit(fn)
            else:
                row[key] = fn
        outs = {}
        for impl, fn in impls.items():
            if budget.until(0.8) < 0:
                res["skipped"].append(f"time {name} {impl}")
                continue
            try:
                t = bench(fn, q, k, v, reps=reps, batch_s=0.02)
                row[impl] = {"ms": t * 1e3, "tflops": flops / t / 1e12}
                if impl in ("mosaic", "triton"):
                    outs[impl] = fn(q, k, v)
            except Exception as exc:
                row[impl] = {"error": "".join(traceback.format_exception_only(exc))[-2000:]}
            log(budget, f"{name} {impl}: {row[impl]}")
        if len(outs) == 2:
            (om, lm), (ot, lt) = outs["mosaic"], outs["triton"]
            diff = jnp.linalg.norm((om.astype(jnp.float32) - ot.astype(jnp.float32)).ravel())
            row["mosaic_vs_triton_out_rel"] = float(
                diff / jnp.linalg.norm(ot.astype(jnp.float32).ravel())
            )
            row["mosaic_vs_triton_lse_maxabs"] = float(jnp.max(jnp.abs(lm - lt)))
        res["timing"].append(row)


def variant_phase(budget: Budget, res: dict[str, Any], reps: int) -> None:
    from longflash.frontends import jax as fe
    from longflash_jax import mosaic
    from longflash_jax.problem import problem_of

    d, h, n = 128, 16, 16 * K
    for causal in (False, True):
        q, k, v = inputs((1, n, h, d), (1, n, h, d), "bfloat16", seed=1)
        call = fe.make_call(q, k, v, causal=causal, scale=None, window=None, softcap=None)
        p = problem_of(call)
        flops = 4.0 * h * n * n * d / (2 if causal else 1)
        for bq, bk, st in VARIANTS:
            tag = f"hd128-16k{'-causal' if causal else ''} mosaic({bq},{bk},{st})"
            if budget.left() < 15:
                res["skipped"].append(tag)
                continue
            try:
                import jax

                fn = jax.jit(functools.partial(mosaic.forward, p, mosaic.MosaicTile(bq, bk, st)))
                t = bench(fn, q, k, v, reps=reps, batch_s=0.02)
                row = {"name": tag, "ms": t * 1e3, "tflops": flops / t / 1e12}
            except Exception as exc:
                row = {"name": tag, "error": "".join(traceback.format_exception_only(exc))[-1500:]}
            res["variants"].append(row)
            log(budget, f"{tag}: {row}")


def table(res: dict[str, Any]) -> str:
    lines = ["", "Mosaic GPU forward, correctness (relative Frobenius error vs float64 oracle):"]
    for c in res["checks"]:
        e = c.get("errors", {})
        lines.append(
            f"  {c['name']:30s} {'ok  ' if c['ok'] else 'FAIL'}"
            f" out {e.get('out', float('nan')):.2e}"
            f"  lse {e.get('lse', float('nan')):.2e}  {'; '.join(c.get('problems', []))[:120]}"
            + (" EXCEPTION" if "exception" in c else "")
        )
    lines.append("")
    head = f"  {'hd128 bf16 fwd':16s} {'mosaic':>8s} {'triton':>8s} {'cudnn':>8s} {'pl.mha':>8s}"
    lines.append(head + "  mosaic/triton  winner   (TFLOP/s)")
    for r in res["timing"]:
        tf = {
            i: (r.get(i) or {}).get("tflops") for i in ("mosaic", "triton", "cudnn", "pallas_mha")
        }
        cells = " ".join(f"{tf[i]:8.1f}" if tf[i] else f"{'-':>8s}" for i in tf)
        ratio = tf["mosaic"] / tf["triton"] if tf["mosaic"] and tf["triton"] else None
        win = ("mosaic" if ratio > 1 else "triton") if ratio else "-"
        rs = f"{ratio:13.3f}" if ratio else f"{'-':>13s}"
        lines.append(f"  {r['name']:16s} {cells}  {rs}  {win}")
    for v in res["variants"]:
        lines.append(f"  {v['name']:40s} {v.get('tflops', float('nan')):8.1f}")
    if res["skipped"]:
        lines.append("  skipped: " + ", ".join(res["skipped"]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip", default="", help="comma list of phases: checks,timing,variants")
    args = ap.parse_args()
    budget = Budget(args.budget_s)
    import jax
    from longflash_jax import mosaic_route

    res: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": platform.node(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "mosaic_runtime_reason": mosaic_route.runtime_reason(),
        "checks": [],
        "timing": [],
        "variants": [],
        "skipped": [],
    }
    skip = set(filter(None, args.skip.split(",")))
    log(
        budget,
        f"jax {jax.__version__} on {res['devices']}; runtime: "
        f"{res['mosaic_runtime_reason'] or 'Mosaic GPU usable'}",
    )
    if "checks" not in skip:
        check_phase(budget, res)
    if "timing" not in skip:
        time_phase(budget, res, args.reps)
    if "variants" not in skip:
        variant_phase(budget, res, args.reps)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pallas_mosaic-h200.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(table(res), flush=True)
    return 0 if all(c["ok"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
