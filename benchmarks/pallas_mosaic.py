"""The pallas backend's Mosaic GPU kernels against its Triton-lowered ones, on one H200.

From the repository root (PYTHONPATH covering packages/*/src, jax >= 0.11 with CUDA):

    python benchmarks/pallas_mosaic.py --budget-s 150     # JSON to $OUT (or --out)
    python benchmarks/pallas_mosaic.py --phases bwd-checks --budget-s 60 --name bwd-checks

Phases (--phases, default all, in this order), each within the budget (what does not fit is
listed under "skipped"):
  checks        the Mosaic forward (out, lse) against the float64 oracle of the shared suite
                (longflash.testing: same checks and bf16/fp16 tolerances as the conformance
                suite): causal and not, Nq != Nk, lengths not multiples of the tile, GQA,
                hd 64/128/256, fp16
  timing        bf16, hd128 (or --dims), N = 4K and 16K (batch*N = 16K, H = 2048/D), causal
                and not: Mosaic forward, Triton-lowered forward,
                jax.nn.dot_product_attention(cudnn) and JAX's Pallas mha, in one process;
                Mosaic vs Triton outputs cross-checked
  variants      other Mosaic forward tiles at 16K
  bwd-checks    the Mosaic backward (dq, dk, dv) against the float64 oracle with the shared
                suite's checks and tolerances (zero rows, unseen keys, NaN, bf16/fp16 bounds):
                causal and not, ragged N, Nq != Nk both ways, GQA/MQA, hd 64/128, fp16; the
                smallest case first, so that a hang shows which kernel hangs
  bwd-timing    bf16, hd128 (or --dims), 4K and 16K, causal and not, in one process: Mosaic
                backward, Triton-lowered backward, jax cuDNN, JAX's Pallas mha and XLA
                backward (each given the forward's residuals); at 4K both of ours also against
                the float32 blockwise reference of pallas_tune, within the bf16 tolerances
  bwd-variants  other Mosaic backward tiles at 16K
TFLOP/s count 4*B*H*N^2*D for the forward, 2.5x that for the backward (half when causal).
Times: pallas_tune.bench (medians of batches of back-to-back calls after a compiling warm-up).
The table goes to stdout last.
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


def timed(dims: tuple[int, ...]) -> list[tuple[int, int, int, bool]]:
    """(D, H, N, causal) of the timing phases: the bench grid's H = 2048 / D, B = 16K / N."""
    return [(d, 2048 // d, n, c) for d in dims for n, c in TIMED]


VARIANTS = [(64, 64, 2), (64, 64, 3), (64, 128, 2)]
# name: (B, Nq, Nk, Hq, Hk, D, causal, dtype); smallest first
BWD_CHECKS: dict[str, tuple[int, int, int, int, int, int, bool, str]] = {
    "hd128-512-full": (1, 512, 512, 2, 2, 128, False, "bfloat16"),
    "hd128-512-causal": (1, 512, 512, 2, 2, 128, True, "bfloat16"),
    "hd128-1000-full": (2, 1000, 1000, 4, 4, 128, False, "bfloat16"),
    "hd128-1000x1304-causal-gqa": (2, 1000, 1304, 8, 2, 128, True, "bfloat16"),
    "hd128-1304x1000-causal-mqa": (1, 1304, 1000, 4, 1, 128, True, "bfloat16"),
    "hd128-1000-full-mqa": (1, 1000, 1000, 4, 1, 128, False, "bfloat16"),
    "hd64-2048-causal-gqa": (1, 2048, 2048, 4, 2, 64, True, "bfloat16"),
    "hd64-1000x1304-full-fp16": (1, 1000, 1304, 6, 3, 64, False, "float16"),
    "hd128-4k-causal-fp16": (1, 4 * K, 4 * K, 2, 2, 128, True, "float16"),
}
# (dkdv (block_q, block_k, stages), dq (block_q, block_k, stages)); the first is tiles.json's
# (dkdv, dq, fused); fused = dQ reduced in the dK/dV kernel (no dQ kernel), timed last
BWD_VARIANTS = [
    ((64, 64, 2), (64, 64, 2), False),
    ((64, 64, 3), (64, 64, 3), False),
    ((32, 64, 2), (64, 64, 2), False),
    ((64, 64, 2), (64, 128, 2), False),
    ((64, 64, 2), (64, 64, 2), True),
]
PHASES = (
    "checks",
    "timing",
    "variants",
    "bwd-checks",
    "bwd-timing",
    "bwd-checks-fused",
    "bwd-variants",
)


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


def selected(table: dict[str, Any], cases: tuple[str, ...]) -> dict[str, Any]:
    """The entries of a check table whose names contain one of ``cases`` (all when empty)."""
    return {n: c for n, c in table.items() if not cases or any(s in n for s in cases)}


def check_phase(budget: Budget, res: dict[str, Any], cases: tuple[str, ...] = ()) -> None:
    import numpy as np
    from longflash.frontends import jax as fe
    from longflash.testing.oracle import attention_oracle
    from longflash.testing.tolerances import compare, errors

    for name, (b, nq, nk, hq, hk, d, causal, dtype) in selected(CHECKS, cases).items():
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


def time_phase(budget: Budget, res: dict[str, Any], reps: int, dims=(128,)) -> None:
    import jax
    import jax.numpy as jnp
    from longflash.frontends import jax as fe

    for d, h, n, causal in timed(dims):
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


# -- backward --------------------------------------------------------------------------


def backward_fn(call: Any, lowering: str) -> Any:
    import jax
    from longflash_jax import kernels

    return jax.jit(
        lambda do, q, k, v, o, lse: kernels.backward(call, do, q, k, v, o, lse, lowering=lowering)
    )


def fused_backward_fn(call: Any) -> Any:
    """The Mosaic backward with dQ fused into the dK/dV kernel (tiles.json's tiles)."""
    import jax
    from longflash_jax import mosaic_bwd, mosaic_route
    from longflash_jax.problem import problem_of

    p = problem_of(call)
    t = mosaic_route.mosaic_bwd_tiles(p)
    tiles = mosaic_bwd.MosaicBwdTiles(
        mosaic_bwd.MosaicTile(**t["dkdv"]), mosaic_bwd.MosaicTile(**t["dq"]), fused=True
    )
    return jax.jit(functools.partial(mosaic_bwd.backward, p, tiles))


def bwd_check_phase(
    budget: Budget, res: dict[str, Any], fused: bool = False, cases: tuple[str, ...] = ()
) -> None:
    import jax
    import numpy as np
    from longflash.frontends import jax as fe
    from longflash.testing.oracle import attention_oracle
    from longflash.testing.tolerances import compare, errors

    variant = "fused" if fused else "two-kernel"
    for name, (b, nq, nk, hq, hk, d, causal, dtype) in selected(BWD_CHECKS, cases).items():
        if budget.until(0.9) < 0:
            res["skipped"].append(f"bwd-check {variant} {name}")
            continue
        row: dict[str, Any] = {"name": name, "dtype": dtype, "variant": variant}
        log(budget, f"bwd-check {variant} {name}: start")  # a hang leaves this line last
        try:
            q, k, v = inputs((b, nq, hq, d), (b, nk, hk, d), dtype)
            do = inputs((b, nq, hq, d), (b, nq, hq, d), dtype, seed=3)[0]
            call = fe.make_call(q, k, v, causal=causal, scale=None, window=None, softcap=None)
            fwd = forward_fn(call, "triton")  # the known-good forward: isolates the backward
            out, lse = fwd(q, k, v)
            args = (do, q, k, v, out, lse)
            fn = fused_backward_fn(call) if fused else backward_fn(call, "mosaic")
            dq, dk, dv = jax.block_until_ready(fn(*args))
            f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
            got = {"out": f64(out), "lse": f64(lse), "dq": f64(dq), "dk": f64(dk), "dv": f64(dv)}
            ref = attention_oracle(q, k, v, do, causal=causal)
            row["errors"] = {n: float(e) for n, e in errors(got, ref).items()}
            row["problems"] = compare(got, ref, dtype)
            row["ok"] = not row["problems"]
            if fused:
                res["bwd_checks"].append(row)
                log(
                    budget,
                    f"bwd-check {variant} {name}: {'ok' if row['ok'] else 'FAIL'} "
                    f"{row['errors']} {'; '.join(row['problems'])[:300]}",
                )
                continue
            # the Triton-lowered backward on the same inputs, for scale
            tri = dict(zip(("dq", "dk", "dv"), map(f64, backward_fn(call, "triton")(*args))))
            tri_errors = errors(dict(got, **tri), ref)
            row["triton_errors"] = {g: float(tri_errors[g]) for g in tri}
        except Exception as exc:
            row["ok"] = False
            row["exception"] = "".join(traceback.format_exception_only(exc))[-3000:]
        res["bwd_checks"].append(row)
        log(
            budget,
            f"bwd-check {variant} {name}: {'ok' if row['ok'] else 'FAIL'} {row.get('errors', '')} "
            f"{'; '.join(row.get('problems', []))[:300]}",
        )
        if "exception" in row:
            print(row["exception"], flush=True)


def bwd_peers(causal: bool, d: int) -> dict[str, Any]:
    """name -> forward function whose vjp is timed (JAX's implementations)."""
    import jax

    scale = d**-0.5
    out: dict[str, Any] = {
        f"jax_{impl}": functools.partial(
            jax.nn.dot_product_attention, scale=scale, is_causal=causal, implementation=impl
        )
        for impl in ("cudnn", "xla")
    }
    try:
        from jax.experimental.pallas.ops.gpu import attention as pa

        out["pallas_mha"] = lambda q, k, v: pa.mha(
            q, k, v, None, sm_scale=scale, causal=causal, block_sizes=pa.BlockSizes.get_default()
        )
    except Exception as exc:
        out["pallas_mha_error"] = repr(exc)
    return out


def bwd_time_phase(budget: Budget, res: dict[str, Any], reps: int, dims=(128,)) -> None:
    import jax
    import jax.numpy as jnp
    from longflash.frontends import jax as fe
    from pallas_tune import reference, rel_err, tolerances

    tol = tolerances()["grad"]
    for d, h, n, causal in timed(dims):
        b = 16 * K // n
        name = f"hd{d}-{n // K}k{'-causal' if causal else ''}"
        flops = 2.5 * 4.0 * b * h * n * n * d / (2 if causal else 1)
        row: dict[str, Any] = {"name": name, "B": b, "N": n, "H": h, "D": d, "causal": causal}
        q, k, v = inputs((b, n, h, d), (b, n, h, d), "bfloat16", seed=1)
        do = inputs((b, n, h, d), (b, n, h, d), "bfloat16", seed=2)[0]
        call = fe.make_call(q, k, v, causal=causal, scale=None, window=None, softcap=None)
        try:
            out, lse = forward_fn(call, "triton")(q, k, v)
        except Exception as exc:
            row["error"] = "".join(traceback.format_exception_only(exc))[-2000:]
            res["bwd_timing"].append(row)
            continue
        ours = {"mosaic": backward_fn(call, "mosaic"), "triton": backward_fn(call, "triton")}
        grads = {}
        for impl, fn in ours.items():
            if budget.until(0.85) < 0:
                res["skipped"].append(f"bwd-time {name} {impl}")
                continue
            try:
                args = (do, q, k, v, out, lse)
                t = bench(fn, *args, reps=reps, batch_s=0.02)
                row[impl] = {"ms": t * 1e3, "tflops": flops / t / 1e12}
                grads[impl] = fn(*args)
            except Exception as exc:
                row[impl] = {"error": "".join(traceback.format_exception_only(exc))[-2000:]}
            log(budget, f"bwd {name} {impl}: {row[impl]}")
        if len(grads) == 2:
            row["mosaic_vs_triton_rel"] = {
                g: rel_err(a, b_.astype(jnp.float32))
                for g, a, b_ in zip(("dq", "dk", "dv"), grads["mosaic"], grads["triton"])
            }
        if n <= 4 * K and grads and budget.until(0.85) > 0:
            try:
                ref = reference(q, k, v, do, causal=causal, scale=d**-0.5, block=512)
                for impl, gs in grads.items():
                    errs = {g: rel_err(x, ref[g]) for g, x in zip(("dq", "dk", "dv"), gs)}
                    row[impl]["fp32_ref_errors"] = errs
                    row[impl]["fp32_ref_ok"] = all(e <= tol for e in errs.values())
                del ref
            except Exception as exc:
                row["reference_error"] = repr(exc)
        for impl, f in bwd_peers(causal, d).items():
            if not callable(f):
                row[impl] = {"error": f}
                continue
            if budget.until(0.85) < 0:
                res["skipped"].append(f"bwd-time {name} {impl}")
                continue
            try:
                _, vjp = jax.vjp(f, q, k, v)
                bj = jax.jit(lambda vjp, do: vjp(do))
                t = bench(bj, vjp, do, reps=reps, batch_s=0.02)
                row[impl] = {"ms": t * 1e3, "tflops": flops / t / 1e12}
            except Exception as exc:
                row[impl] = {"error": "".join(traceback.format_exception_only(exc))[-1500:]}
            log(budget, f"bwd {name} {impl}: {row[impl]}")
        res["bwd_timing"].append(row)


def bwd_variant_phase(budget: Budget, res: dict[str, Any], reps: int, fused: bool) -> None:
    import jax
    from longflash.frontends import jax as fe
    from longflash_jax import kernels, mosaic_bwd
    from longflash_jax.problem import problem_of

    d, h, n = 128, 16, 16 * K
    for causal in (False, True):
        q, k, v = inputs((1, n, h, d), (1, n, h, d), "bfloat16", seed=1)
        do = inputs((1, n, h, d), (1, n, h, d), "bfloat16", seed=2)[0]
        call = fe.make_call(q, k, v, causal=causal, scale=None, window=None, softcap=None)
        p = problem_of(call)
        out, lse = kernels.forward(call, q, k, v, lowering="triton")
        flops = 2.5 * 4.0 * h * n * n * d / (2 if causal else 1)
        for dkdv, dq, fuse in BWD_VARIANTS:
            if fuse and not fused:
                continue
            what = "fused" if fuse else f"dq{dq}"
            tag = f"hd128-16k{'-causal' if causal else ''} bwd dkdv{dkdv} {what}"
            if budget.left() < 15:
                res["skipped"].append(tag)
                continue
            try:
                t = mosaic_bwd.MosaicBwdTiles(
                    mosaic_bwd.MosaicTile(*dkdv), mosaic_bwd.MosaicTile(*dq), fused=fuse
                )
                fn = jax.jit(functools.partial(mosaic_bwd.backward, p, t))
                sec = bench(fn, do, q, k, v, out, lse, reps=reps, batch_s=0.02)
                row = {"name": tag, "ms": sec * 1e3, "tflops": flops / sec / 1e12}
                # the two kernels apart: which one to work on next
                st = jax.jit(functools.partial(mosaic_bwd.preprocess, p, t))(do, out, lse)
                kernels_apart = [("dkdv", functools.partial(mosaic_bwd.dkdv_call, fused=fuse))]
                if not fuse:
                    kernels_apart.insert(0, ("dq", mosaic_bwd.dq_call))
                for kname, call_of in kernels_apart:
                    kf = jax.jit(call_of(p, getattr(t, kname)))
                    row[f"{kname}_ms"] = bench(kf, q, k, v, do, st, reps=reps, batch_s=0.02) * 1e3
            except Exception as exc:
                row = {"name": tag, "error": "".join(traceback.format_exception_only(exc))[-1500:]}
            res["bwd_variants"].append(row)
            log(budget, f"{tag}: {row}")


def table(res: dict[str, Any]) -> str:
    lines = []
    if res["checks"]:
        lines += [
            "",
            "Mosaic GPU forward, correctness (relative Frobenius error vs float64 oracle):",
        ]
    for c in res["checks"]:
        e = c.get("errors", {})
        lines.append(
            f"  {c['name']:30s} {'ok  ' if c['ok'] else 'FAIL'}"
            f" out {e.get('out', float('nan')):.2e}"
            f"  lse {e.get('lse', float('nan')):.2e}  {'; '.join(c.get('problems', []))[:120]}"
            + (" EXCEPTION" if "exception" in c else "")
        )
    if res["timing"]:
        head = f"  {'bf16 fwd':16s} {'mosaic':>8s} {'triton':>8s} {'cudnn':>8s} {'pl.mha':>8s}"
        lines += ["", head + "  mosaic/triton  winner   (TFLOP/s)"]
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
    if res["bwd_checks"]:
        lines += [
            "",
            "Mosaic GPU backward, correctness (relative Frobenius error vs float64 oracle):",
        ]
    for c in res["bwd_checks"]:
        e = c.get("errors", {})
        te = c.get("triton_errors", {})
        cells = "  ".join(f"{g} {e.get(g, float('nan')):.2e}" for g in ("dq", "dk", "dv"))
        tri = max(te.values()) if te else float("nan")
        lines.append(
            f"  {c['name'][:26] + (' F' if c.get('variant') == 'fused' else ''):30s}"
            f" {'ok  ' if c['ok'] else 'FAIL'} {cells}  (triton max {tri:.2e})"
            f"  {'; '.join(c.get('problems', []))[:100]}"
            + (" EXCEPTION" if "exception" in c else "")
        )
    if res["bwd_timing"]:
        labels = ("mosaic", "triton", "cudnn", "pl.mha", "xla")
        lines += [
            "",
            f"  {'bf16 bwd':16s}"
            + "".join(f" {x:>8s}" for x in labels)
            + "  x triton    x mha    x xla  x cudnn  fp32-ref ok  (TFLOP/s)",
        ]
    for r in res["bwd_timing"]:
        tf = {
            i: (r.get(i) or {}).get("tflops")
            for i in ("mosaic", "triton", "jax_cudnn", "pallas_mha", "jax_xla")
        }
        cells = " ".join(f"{tf[i]:8.1f}" if tf[i] else f"{'-':>8s}" for i in tf)
        m = tf["mosaic"]
        ratios = " ".join(
            f"{m / tf[i]:8.2f}" if m and tf[i] else f"{'-':>8s}"
            for i in ("triton", "pallas_mha", "jax_xla", "jax_cudnn")
        )
        ok = (r.get("mosaic") or {}).get("fp32_ref_ok")
        lines.append(f"  {r['name']:16s} {cells}  {ratios}  {'-' if ok is None else ok}")
    for v in res["bwd_variants"]:
        lines.append(
            f"  {v['name']:56s} {v.get('tflops', float('nan')):8.1f}"
            f"  dq {v.get('dq_ms', float('nan')):.2f} ms"
            f"  dkdv {v.get('dkdv_ms', float('nan')):.2f} ms"
        )
    if res["skipped"]:
        lines.append("  skipped: " + ", ".join(res["skipped"]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip", default="", help="comma list of phases to skip")
    ap.add_argument(
        "--phases", default=",".join(PHASES), help="comma list, of: " + ", ".join(PHASES)
    )
    ap.add_argument("--name", default="", help="suffix of the JSON file name")
    ap.add_argument("--no-fused", action="store_true", help="bwd-variants without the fused dQ")
    ap.add_argument(
        "--dims", default="128", help="head dims of the timing phases (H = 2048 / D), e.g. 64,128"
    )
    ap.add_argument(
        "--cases",
        default="",
        help="comma list: the check phases run only the cases whose names contain one, e.g. hd64",
    )
    args = ap.parse_args()
    cases = tuple(filter(None, args.cases.split(",")))
    names = list(dict.fromkeys([*CHECKS, *BWD_CHECKS]))
    if cases and not any(s in n for s in cases for n in names):
        ap.error(f"--cases {args.cases}: no check is named so; the checks: {', '.join(names)}")
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
        "bwd_checks": [],
        "bwd_timing": [],
        "bwd_variants": [],
        "skipped": [],
    }
    unknown = set(filter(None, (args.phases + "," + args.skip).split(","))) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")
    skip = set(filter(None, args.skip.split(","))) | (set(PHASES) - set(args.phases.split(",")))
    dims = tuple(int(x) for x in args.dims.split(","))
    if any(d not in (64, 128, 256) for d in dims):
        ap.error(f"--dims {args.dims}: the timing phases take 64, 128 and 256")
    log(
        budget,
        f"jax {jax.__version__} on {res['devices']}; runtime: "
        f"{res['mosaic_runtime_reason'] or 'Mosaic GPU usable'}",
    )
    if "checks" not in skip:
        check_phase(budget, res, cases)
    if "timing" not in skip:
        time_phase(budget, res, args.reps, dims)
    if "variants" not in skip:
        variant_phase(budget, res, args.reps)
    if "bwd-checks" not in skip:
        bwd_check_phase(budget, res, cases=cases)
    if "bwd-timing" not in skip:
        bwd_time_phase(budget, res, args.reps, dims)
    if "bwd-checks-fused" not in skip:
        bwd_check_phase(budget, res, fused=True, cases=cases)
    if "bwd-variants" not in skip:
        bwd_variant_phase(budget, res, args.reps, fused=not args.no_fused)
    os.makedirs(args.out, exist_ok=True)
    suffix = f"-{args.name}" if args.name else ""
    with open(os.path.join(args.out, f"pallas_mosaic-h200{suffix}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(table(res), flush=True)
    return 0 if all(c["ok"] for c in res["checks"] + res["bwd_checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
