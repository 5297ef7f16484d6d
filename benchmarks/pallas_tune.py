"""Check, tune and benchmark the Pallas backend against JAX's own attention, in one run.

On one H200 (from the repository root, after installing longflash and longflash-jax):

    python benchmarks/pallas_tune.py                  # about 7 minutes; JSON to $OUT
    python benchmarks/pallas_tune.py --cpu-smoke      # tiny shapes, interpret mode, CPU

Phases, in order of priority; each has a deadline within --budget-s, and work that does
not fit is skipped and listed under "skipped" in the JSON and the table:
  correctness  16K (causal and not) and 128K (causal) forward + backward against a
               blockwise float32 jnp reference (HIGHEST precision matmuls)
  tune hd128   tile variants of each kernel (fwd, dq, dkdv) at N=16K, causal and not;
               every variant's result is checked against the reference before it is timed
  report hd128 N=4K/8K/16K (batch*N=16K, 16 heads), causal and not: ours next to
               jax.nn.dot_product_attention cudnn and xla, the Pallas attention JAX ships
               (ops.gpu.attention.mha, Triton lowering) and, forward only, JAX's Mosaic
               GPU attention (ops.gpu.attention_mgpu) as the yardstick for a Mosaic port
  tune/report  the same for hd64 and hd256 at N=1K (2048/hd heads)
  long         our forward and backward at 128K (hd128, 4 heads, causal)

Times are medians over repeated batches of back-to-back calls (one sync per batch), after
a warm-up call that compiles. TFLOP/s use 4*B*H*Nq*Nk*D for the forward (half when
causal) and 2.5x that for the backward. The table goes to stdout last; everything goes to
$OUT (or --out): pallas_tune-h200.json, pallas_tune-h200.png, and tiles_tuned-h200.json,
tiles.json's "cuda" section with the winners in place.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

SECTIONS = ("correctness", "tune", "report", "long")


# -- shapes and variants --------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    N: int
    H: int
    D: int
    causal: bool

    def flops(self, backward: bool = False) -> float:
        f = 4.0 * self.B * self.H * self.N * self.N * self.D
        f = f / 2 if self.causal else f
        return 2.5 * f if backward else f


def gpu_shapes() -> dict[str, list[Shape]]:
    k = 1024
    hd128 = [
        Shape(f"hd128-{n // k}k{'-causal' if c else ''}", 16 * k // n, n, 16, 128, c)
        for n in (4 * k, 8 * k, 16 * k)
        for c in (False, True)
    ]
    small = [
        Shape(f"hd{d}-1k{'-causal' if c else ''}", 16, k, 2048 // d, d, c)
        for d in (64, 256)
        for c in (False, True)
    ]
    return {
        "correctness": [
            Shape("check-16k", 1, 16 * k, 16, 128, False),
            Shape("check-16k-causal", 1, 16 * k, 16, 128, True),
            Shape("check-128k-causal", 1, 128 * k, 4, 128, True),
        ],
        "tune": [
            Shape("hd128-16k", 1, 16 * k, 16, 128, False),
            Shape("hd128-16k-causal", 1, 16 * k, 16, 128, True),
            Shape("hd64-1k", 16, k, 32, 64, False),
            Shape("hd256-1k", 16, k, 8, 256, False),
        ],
        "report": hd128 + small,
        "long": [Shape("long-128k-causal", 1, 128 * k, 4, 128, True)],
    }


def cpu_shapes() -> dict[str, list[Shape]]:
    return {
        "correctness": [
            Shape("check-64", 1, 64, 2, 32, False),
            Shape("check-96-causal", 1, 96, 2, 32, True),
        ],
        "tune": [Shape("hd32-64", 1, 64, 2, 32, False)],
        "report": [
            Shape("hd32-64", 2, 64, 2, 32, False),
            Shape("hd32-64-causal", 2, 64, 2, 32, True),
        ],
        "long": [Shape("long-128-causal", 1, 128, 2, 32, True)],
    }


# (block_q, block_k, num_warps, num_stages) per kernel and padded head dim. Chosen from
# configurations that compile for sm_90 without register spills and within shared
# memory (checked offline with Triton 3.6 on the Triton IR Pallas emits; see
# benchmarks/NOTES-pallas.md); the GPU decides among them.
GPU_VARIANTS: dict[int, dict[str, list[tuple[int, int, int, int]]]] = {
    64: {
        "fwd": [
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (64, 128, 4, 3),
            (128, 128, 8, 2),
        ],
        "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2)],
        "dkdv": [(64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3)],
    },
    128: {
        "fwd": [
            (128, 64, 8, 3),
            (128, 64, 8, 2),
            (128, 128, 8, 2),
            (128, 128, 8, 3),
            (64, 128, 8, 3),
            (64, 64, 4, 3),
            (128, 32, 8, 3),
        ],
        "dq": [
            (128, 64, 8, 2),
            (128, 64, 8, 3),
            (64, 64, 4, 3),
            (64, 128, 8, 2),
            (128, 32, 8, 3),
            (64, 64, 8, 3),
        ],
        "dkdv": [
            (64, 64, 8, 3),
            (32, 128, 8, 2),
            (32, 128, 8, 3),
            (64, 64, 8, 2),
            (32, 64, 8, 3),
            (64, 32, 8, 3),
            (64, 128, 8, 2),
        ],
    },
    256: {
        "fwd": [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3), (32, 128, 8, 2)],
        "dq": [(64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2)],
        "dkdv": [(64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)],
    },
}
CPU_VARIANTS = {
    "fwd": [(16, 16, 4, 1), (32, 32, 4, 1)],
    "dq": [(16, 16, 4, 1), (32, 16, 4, 1)],
    "dkdv": [(16, 16, 4, 1), (16, 32, 4, 1)],
}


# -- timing ---------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def until(self, fraction: float) -> float:
        """Seconds left before ``fraction`` of the budget has elapsed."""
        return self.seconds * fraction - self.elapsed()


def bench(fn: Any, *args: Any, reps: int, batch_s: float) -> float:
    """Median seconds per call: batches of back-to-back calls, one sync per batch."""
    import jax

    jax.block_until_ready(fn(*args))  # compile + warm
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    n = max(1, min(1000, int(batch_s / max(one, 1e-7))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


# -- the float32 reference ------------------------------------------------------------
def reference(
    q: Any, k: Any, v: Any, do: Any, *, causal: bool, scale: float, block: int
) -> dict[str, Any]:
    """Blockwise float32 attention (bottom-right causal), forward and backward. Each
    block of query rows holds its full score rows, so the softmax is the plain one."""
    import jax.numpy as jnp
    from jax import lax

    hp = lax.Precision.HIGHEST
    b, nq, h, _ = q.shape
    nk = k.shape[1]
    block = min(block, nq)
    assert nq % block == 0
    nb = nq // block
    tr = lambda x: jnp.swapaxes(x.astype(jnp.float32), 1, 2)  # (B, H, N, D)
    qf, kf, vf, dof = tr(q), tr(k), tr(v), tr(do)
    cols = jnp.arange(nk)

    def scores(i, qi):
        s = jnp.einsum("bhqd,bhkd->bhqk", qi, kf, precision=hp) * scale
        if causal:
            rows = i * block + jnp.arange(block)
            s = jnp.where(cols[None, :] <= rows[:, None] + (nk - nq), s, -jnp.inf)
        return s

    def rows_of(x, i):
        return lax.dynamic_slice_in_dim(x, i * block, block, axis=2)

    def fwd(i):
        s = scores(i, rows_of(qf, i))
        m = jnp.max(s, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        den = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhqk,bhkd->bhqd", p, vf, precision=hp) / den
        return o, (m + jnp.log(den))[..., 0]

    o, lse = lax.map(fwd, jnp.arange(nb))
    o = jnp.moveaxis(o, 0, 2).reshape(b, h, nq, -1)
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, h, nq)
    delta = jnp.sum(dof * o, axis=-1)

    def bwd(carry, i):
        dk, dv = carry
        qi, doi = rows_of(qf, i), rows_of(dof, i)
        lse_i = lax.dynamic_slice_in_dim(lse, i * block, block, axis=2)
        dl_i = lax.dynamic_slice_in_dim(delta, i * block, block, axis=2)
        p = jnp.exp(scores(i, qi) - lse_i[..., None])
        dv = dv + jnp.einsum("bhqk,bhqd->bhkd", p, doi, precision=hp)
        dp = jnp.einsum("bhqd,bhkd->bhqk", doi, vf, precision=hp)
        ds = p * (dp - dl_i[..., None]) * scale
        dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, qi, precision=hp)
        return (dk, dv), jnp.einsum("bhqk,bhkd->bhqd", ds, kf, precision=hp)

    (dk, dv), dq = lax.scan(bwd, (jnp.zeros_like(kf), jnp.zeros_like(vf)), jnp.arange(nb))
    dq = jnp.moveaxis(dq, 0, 2).reshape(b, h, nq, -1)
    back = lambda x: jnp.swapaxes(x, 1, 2)
    return {"out": back(o), "lse": lse, "dq": back(dq), "dk": back(dk), "dv": back(dv)}


def rel_err(x: Any, ref: Any) -> float:
    import jax.numpy as jnp

    x = x.astype(jnp.float32)
    num = jnp.linalg.norm((x - ref).ravel())
    den = jnp.linalg.norm(ref.ravel())
    return float(num / jnp.maximum(den, 1e-30))


def lse_err(x: Any, ref: Any) -> float:
    import jax.numpy as jnp

    return float(jnp.max(jnp.abs(x - ref)))


def tolerances() -> dict[str, float]:
    try:
        from longflash.testing import TOLERANCES

        return dict(TOLERANCES["bfloat16"])
    except Exception:  # the shared suite is not installed: its bf16 bounds
        return {"out": 2e-2, "lse": 2e-3, "grad": 4e-2}


# -- the run --------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace):
        import jax

        self.args = args
        self.cpu = args.cpu_smoke
        self.budget = Budget(args.budget_s)
        self.shapes = cpu_shapes() if self.cpu else gpu_shapes()
        self.reps = 3 if self.cpu else args.reps
        self.batch_s = 0.0 if self.cpu else 0.02
        self.tol = tolerances()
        self.results: dict[str, Any] = {"sections": {}, "skipped": [], "errors": []}
        self.rows: list[dict[str, Any]] = []
        self.best: dict[int, dict[str, tuple[int, int, int, int]]] = {}
        self.refs: dict[tuple, dict[str, Any]] = {}
        self.jax = jax

    def log(self, msg: str) -> None:
        print(f"[{self.budget.elapsed():6.1f}s] {msg}", flush=True)

    # inputs and our kernels
    def inputs(self, s: Shape, seed: int = 0) -> tuple[Any, ...]:
        import jax
        import jax.numpy as jnp

        keys = jax.random.split(jax.random.key(seed), 4)
        shape = (s.B, s.N, s.H, s.D)
        return tuple(jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16) for kk in keys)

    @staticmethod
    def _key(s: Shape) -> tuple:
        return (s.B, s.N, s.H, s.D, s.causal)

    def ref(self, s: Shape) -> dict[str, Any]:
        key = self._key(s)
        if key not in self.refs:
            q, k, v, do = self.inputs(s)
            block = 1024 if s.N >= 64 * 1024 else 2048
            f = self.jax.jit(
                lambda q, k, v, do: reference(
                    q, k, v, do, causal=s.causal, scale=s.D**-0.5, block=block
                )
            )
            self.refs[key] = self.jax.block_until_ready(f(q, k, v, do))
        return self.refs[key]

    def call_of(self, s: Shape, q: Any, k: Any, v: Any) -> Any:
        from longflash.frontends import jax as fe

        return fe.make_call(q, k, v, causal=s.causal, scale=None, window=None, softcap=None)

    def ours(self, s: Shape, tiles: Any = None) -> tuple[Any, Any]:
        from longflash_jax import kernels

        q, k, v, _ = self.inputs(s)
        call = self.call_of(s, q, k, v)
        fwd = self.jax.jit(lambda q, k, v: kernels.forward(call, q, k, v, tiles=tiles))
        bwd = self.jax.jit(
            lambda do, q, k, v, o, lse: kernels.backward(call, do, q, k, v, o, lse, tiles=tiles)
        )
        return fwd, bwd

    def tiles(self, hd: int, fwd=None, dq=None, dkdv=None, tuned: bool = True) -> Any:
        """tiles.json's tiles for head dim ``hd``, with the tuned winners (unless
        tuned=False) and then the given overrides on top."""
        from longflash_jax.problem import Tile, Tiles, table

        data = table()
        entry = data["interpret"] if self.cpu else data["cuda"][str(hd)]
        base = {n: Tile(**t) for n, t in entry.items()}
        if tuned:
            for name, t in self.best.get(hd, {}).items():
                base[name] = Tile(*t)
        for name, t in (("fwd", fwd), ("dq", dq), ("dkdv", dkdv)):
            if t is not None:
                base[name] = Tile(*t)
        return Tiles(**base)

    # sections
    def correctness(self) -> None:
        out = []
        for s in self.shapes["correctness"]:
            if self.budget.until(0.25) < 0 and out:
                self.results["skipped"].append(f"correctness {s.name}: time budget")
                continue
            self.log(f"correctness {s.name}")
            q, k, v, do = self.inputs(s)
            ref = self.ref(s)
            fwd, bwd = self.ours(s)
            o, lse = fwd(q, k, v)
            dq, dk, dv = bwd(do, q, k, v, o, lse)
            errs = {
                "out": rel_err(o, ref["out"]),
                "lse": lse_err(lse, ref["lse"]),
                "dq": rel_err(dq, ref["dq"]),
                "dk": rel_err(dk, ref["dk"]),
                "dv": rel_err(dv, ref["dv"]),
            }
            ok = (
                errs["out"] <= self.tol["out"]
                and errs["lse"] <= self.tol["lse"]
                and all(errs[g] <= self.tol["grad"] for g in ("dq", "dk", "dv"))
            )
            out.append({"shape": asdict(s), "errors": errs, "ok": ok})
            self.log(
                f"  {'OK' if ok else 'FAIL'} " + " ".join(f"{n}={e:.2e}" for n, e in errs.items())
            )
            if s.N >= 64 * 1024:  # free the 128K reference before timing
                self.refs.pop(self._key(s), None)
        self.results["sections"]["correctness"] = {"tolerances_bf16": self.tol, "checks": out}

    def _time_kernel(self, s: Shape, kind: str, variant: tuple[int, int, int, int]) -> dict:
        """One kernel of ours with one tile variant: checked, then timed alone."""
        import jax.numpy as jnp
        from longflash_jax import kernels, scores
        from longflash_jax.backward import dkdv_call, dq_call
        from longflash_jax.forward import forward_call
        from longflash_jax.problem import problem_of, tiles_for

        q, k, v, do = self.inputs(s)
        call = self.call_of(s, q, k, v)
        p = problem_of(call)
        t = tiles_for(p, self.tiles(s.D, **{kind: variant}))
        ref = self.ref(s)
        rec = {"shape": s.name, "kernel": kind, "variant": list(variant)}
        if kind == "fwd":
            f = self.jax.jit(forward_call(p, t.fwd))
            o, lse = f(q, k, v)
            rec["error"] = {"out": rel_err(o, ref["out"]), "lse": lse_err(lse, ref["lse"])}
            ok = rec["error"]["out"] <= self.tol["out"] and rec["error"]["lse"] <= self.tol["lse"]
            args = (q, k, v)
            flops = s.flops()
        else:
            o, lse = kernels.forward(call, q, k, v)
            delta = jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1), 1, 2)
            lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * scores.LOG2E)
            if kind == "dq":
                f = self.jax.jit(dq_call(p, t.dq))
                args = (q, k, v, do, lse2, delta)
                got = {"dq": f(*args)}
                flops = None  # the two backward kernels are ranked by time alone
            else:
                g = p.group
                qg = q.reshape(p.B, p.Nq, p.Hk, g, p.Dqk)
                dog = do.reshape(p.B, p.Nq, p.Hk, g, p.Dv)
                args = (
                    qg,
                    k,
                    v,
                    dog,
                    lse2.reshape(p.B, p.Hk, g, p.Nq),
                    delta.reshape(p.B, p.Hk, g, p.Nq),
                )
                f = self.jax.jit(dkdv_call(p, t.dkdv))
                dk, dv = f(*args)
                got = {"dk": dk, "dv": dv}
                flops = None
            rec["error"] = {n: rel_err(x, ref[n]) for n, x in got.items()}
            ok = all(e <= self.tol["grad"] for e in rec["error"].values())
        rec["ok"] = ok
        if not ok:
            rec["note"] = "wrong result: not timed"
            return rec
        sec = bench(f, *args, reps=self.reps, batch_s=self.batch_s)
        rec["ms"] = sec * 1e3
        if flops is not None:
            rec["tflops"] = flops / sec / 1e12
        return rec

    def tune(self, dims: tuple[int, ...], until: float) -> None:
        recs = self.results["sections"].setdefault("tune", {}).setdefault("records", [])
        for s in self.shapes["tune"]:
            if s.D not in dims:
                continue
            variants = CPU_VARIANTS if self.cpu else GPU_VARIANTS[s.D]
            for kind in ("fwd", "dq", "dkdv"):
                for var in variants[kind]:
                    if self.budget.until(until) < 0:
                        self.results["skipped"].append(f"tune {s.name} {kind} {var}: budget")
                        continue
                    try:
                        rec = self._time_kernel(s, kind, var)
                    except Exception as exc:  # a variant that does not compile or fit
                        rec = {
                            "shape": s.name,
                            "kernel": kind,
                            "variant": list(var),
                            "ok": False,
                            "note": f"{type(exc).__name__}: {str(exc)[:300]}",
                        }
                    recs.append(rec)
                    self.log(
                        f"tune {s.name} {kind} {var}: "
                        + (f"{rec['ms']:.3f} ms" if "ms" in rec else rec.get("note", ""))
                    )
        # Winner per (head dim, kernel): the fastest in total over that head dim's shapes
        # (causal and not weigh equally), among variants that ran on every shape.
        by_dim: dict[int, dict[str, dict[tuple, list[float]]]] = {}
        n_shapes: dict[int, int] = {}
        for s in self.shapes["tune"]:
            n_shapes[s.D] = n_shapes.get(s.D, 0) + 1
        dims = {s.name: s.D for s in self.shapes["tune"]}
        for r in recs:
            if "ms" in r:
                d = dims[r["shape"]]
                by_dim.setdefault(d, {}).setdefault(r["kernel"], {}).setdefault(
                    tuple(r["variant"]), []
                ).append(r["ms"])
        for d, kinds in by_dim.items():
            for kind, vs in kinds.items():
                full = {v: sum(ms) for v, ms in vs.items() if len(ms) == n_shapes[d]}
                if full:
                    self.best.setdefault(d, {})[kind] = min(full, key=full.get)
        self.results["sections"]["tune"]["best"] = {
            str(d): {k: list(v) for k, v in kv.items()} for d, kv in self.best.items()
        }

    def peers(self, s: Shape) -> dict[str, tuple[Any, Any, Any]]:
        """name -> (fwd fn, bwd builder, q transform) for JAX's implementations."""
        import jax
        import jax.numpy as jnp

        scale = s.D**-0.5
        out: dict[str, Any] = {}
        for impl in ("cudnn", "xla"):
            out[f"jax_{impl}"] = (
                lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                    q, k, v, scale=scale, is_causal=s.causal, implementation=impl
                ),
                None,
            )
        try:
            from jax.experimental.pallas.ops.gpu import attention as pallas_attention

            # Its default tiles (128 x 128 forward, 32 x 32 backward) do not fit shared
            # memory at head dim 256; there the forward tiles are halved.
            blocks = pallas_attention.BlockSizes.get_default()
            if s.D > 128:
                blocks = pallas_attention.BlockSizes(64, 64, 32, 32, 32, 32)
            out["jax_pallas_mha"] = (
                lambda q, k, v: pallas_attention.mha(
                    q,
                    k,
                    v,
                    None,
                    sm_scale=scale,
                    causal=s.causal,
                    block_sizes=blocks,
                    interpret=self.cpu,
                ),
                None,
            )
        except Exception as exc:
            self.results["errors"].append(f"jax pallas mha unavailable: {exc!r}")
        if not self.cpu and s.D % 64 == 0:
            try:
                from jax.experimental.pallas.ops.gpu import attention_mgpu as mg

                cfg = mg.TuningConfig(
                    block_q=64, block_kv=128, max_concurrent_steps=2, causal=s.causal
                )
                # It computes softmax(q k^T) unscaled: give it q * scale.
                out["jax_mosaic_fwd"] = (
                    lambda q, k, v: mg.attention(q, k, v, cfg),
                    lambda q: (q.astype(jnp.float32) * scale).astype(q.dtype),
                )
            except Exception as exc:
                self.results["errors"].append(f"jax mosaic attention unavailable: {exc!r}")
        return out

    def _record(
        self,
        s: Shape,
        impl: str,
        direction: str,
        fn: Any,
        args: tuple,
        check: dict[str, Any] | None,
    ) -> None:
        row = {
            "shape": s.name,
            "B": s.B,
            "N": s.N,
            "H": s.H,
            "D": s.D,
            "causal": s.causal,
            "impl": impl,
            "dir": direction,
        }
        try:
            if check is not None:
                row["error"] = check
            sec = bench(fn, *args, reps=self.reps, batch_s=self.batch_s)
            row.update(ms=sec * 1e3, tflops=s.flops(direction == "bwd") / sec / 1e12)
        except Exception as exc:
            row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        self.rows.append(row)
        self.log(
            f"report {s.name} {impl} {direction}: "
            + (f"{row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s" if "ms" in row else row["note"])
        )

    def report(self, section: str, dims: tuple[int, ...], until: float) -> None:
        import jax

        for s in self.shapes[section]:
            if s.D not in dims:
                continue
            if self.budget.until(until) < 0:
                self.results["skipped"].append(f"{section} {s.name}: budget")
                continue
            q, k, v, do = self.inputs(s)
            ref = self.ref(s) if section == "report" else None
            # tiles.json's tiles as well when tuning changed them, if time allows
            tuned, default = self.tiles(s.D), self.tiles(s.D, tuned=False)
            variants = [("longflash_pallas", tuned)]
            if section == "report" and tuned != default and self.budget.until(until) > 60:
                variants.append(("longflash_pallas_json", default))
            for name, tiles in variants:
                fwd, bwd = self.ours(s, tiles)
                try:
                    o, lse = fwd(q, k, v)
                    chk = None if ref is None else {"out": rel_err(o, ref["out"])}
                    self._record(s, name, "fwd", fwd, (q, k, v), chk)
                    grads = bwd(do, q, k, v, o, lse)
                    chk = (
                        None
                        if ref is None
                        else {n: rel_err(x, ref[n]) for n, x in zip(("dq", "dk", "dv"), grads)}
                    )
                    self._record(s, name, "bwd", bwd, (do, q, k, v, o, lse), chk)
                except Exception as exc:
                    self.results["errors"].append(f"{name} {s.name}: {exc!r}")
                    self.log(f"{name} {s.name} failed: {exc!r}")
            if section != "report":
                continue
            for name, (f, qmap) in self.peers(s).items():
                if self.budget.until(until) < -15:
                    self.results["skipped"].append(f"report {s.name} {name}: budget")
                    continue
                qq = q if qmap is None else qmap(q)
                try:
                    fj = jax.jit(f)
                    o = fj(qq, k, v)
                    self._record(s, name, "fwd", fj, (qq, k, v), {"out": rel_err(o, ref["out"])})
                except Exception as exc:
                    self._record(s, name, "fwd", _raiser(exc), (), None)
                    continue
                if name == "jax_mosaic_fwd":
                    continue  # its backward needs its own block config and is not causal
                try:
                    _, vjp = jax.vjp(f, qq, k, v)
                    bj = jax.jit(lambda vjp, do: vjp(do))
                    grads = bj(vjp, do)
                    chk = {n: rel_err(x, ref[n]) for n, x in zip(("dq", "dk", "dv"), grads)}
                    self._record(s, name, "bwd", bj, (vjp, do), chk)
                except Exception as exc:
                    self._record(s, name, "bwd", _raiser(exc), (), None)
            self.refs.pop(self._key(s), None)

    def ceilings(self) -> dict[str, float]:
        import jax
        import jax.numpy as jnp

        n = 256 if self.cpu else 8192
        a = jnp.ones((n, n), jnp.bfloat16)
        mm = jax.jit(lambda a, b: a @ b)
        t = bench(mm, a, a, reps=self.reps, batch_s=self.batch_s)
        x = jnp.ones((1 << (20 if self.cpu else 28),), jnp.float32)
        cp = jax.jit(lambda x: x * 1.0001)
        tc = bench(cp, x, reps=self.reps, batch_s=self.batch_s)
        return {
            "matmul_bf16_tflops": 2 * n**3 / t / 1e12,
            "copy_tb_per_s": 2 * x.size * 4 / tc / 1e12,
        }


def _raiser(exc: Exception) -> Any:
    def f(*_):
        raise exc

    return f


def environment() -> dict[str, Any]:
    import jax
    import jaxlib

    dev = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device": getattr(dev, "device_kind", str(dev)),
        "platform": dev.platform,
    }
    try:
        import longflash_jax

        env["longflash_jax"] = longflash_jax.__version__
    except Exception:
        pass
    return env


def table(run: Run) -> str:
    lines = []
    corr = run.results["sections"].get("correctness", {}).get("checks", [])
    for c in corr:
        e = c["errors"]
        lines.append(
            f"check {c['shape']['N']:>7} {'causal' if c['shape']['causal'] else '':6}"
            f" {'OK  ' if c['ok'] else 'FAIL'} out {e['out']:.1e} lse {e['lse']:.1e} "
            f"dq {e['dq']:.1e} dk {e['dk']:.1e} dv {e['dv']:.1e}"
        )
    if run.best:
        lines.append(
            "tuned tiles (block_q, block_k, warps, stages): "
            + "; ".join(
                f"hd{d} " + " ".join(f"{k}={v}" for k, v in kv.items())
                for d, kv in sorted(run.best.items())
            )
        )
    rows = [r for r in run.rows if "ms" in r]
    impls = []
    for r in run.rows:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    shapes = []
    for r in run.rows:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    short = {
        "longflash_pallas": "ours",
        "longflash_pallas_json": "ours(json)",
        "jax_cudnn": "cudnn",
        "jax_xla": "xla",
        "jax_pallas_mha": "pl.mha",
        "jax_mosaic_fwd": "mosaic",
    }
    head = (
        f"{'TFLOP/s':24}"
        + "".join(f"{short.get(i, i):>11}" for i in impls)
        + "   ours/pl.mha  ours/xla"
    )
    for direction in ("fwd", "bwd"):
        lines.append("")
        lines.append(f"{direction}: " + head)
        for sh in shapes:
            got = {r["impl"]: r for r in rows if r["shape"] == sh and r["dir"] == direction}
            cells = "".join(
                f"{got[i]['tflops']:11.0f}" if i in got else f"{'-':>11}" for i in impls
            )
            ratio = []
            for peer in ("jax_pallas_mha", "jax_xla"):
                if "longflash_pallas" in got and peer in got:
                    ratio.append(f"{got['longflash_pallas']['tflops'] / got[peer]['tflops']:11.2f}")
                else:
                    ratio.append(f"{'-':>11}")
            lines.append(f"     {sh:24}{cells}" + "".join(ratio))
    if run.results["skipped"]:
        lines.append("skipped: " + "; ".join(run.results["skipped"]))
    return "\n".join(lines)


def tiles_section(run: Run) -> dict[str, Any]:
    """tiles.json's "cuda" section with the tuned winners in place."""
    from longflash_jax.problem import table

    cuda = json.loads(json.dumps(table()["cuda"]))
    for d, kinds in run.best.items():
        for kind, (bq, bk, w, st) in kinds.items():
            cuda[str(d)][kind] = {"block_q": bq, "block_k": bk, "num_warps": w, "num_stages": st}
    return cuda


def plot(run: Run, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run.rows if "ms" in r]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(shapes) * 1.3), 8))
    width = 0.8 / max(1, len(impls))
    for ax, direction in zip(axes, ("fwd", "bwd")):
        for j, impl in enumerate(impls):
            vals = [
                next(
                    (
                        r["tflops"]
                        for r in rows
                        if r["shape"] == s and r["impl"] == impl and r["dir"] == direction
                    ),
                    0.0,
                )
                for s in shapes
            ]
            ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{direction} TFLOP/s")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=3)
    env = run.results.get("environment", {})
    fig.suptitle(
        f"LongFlash pallas vs JAX attention, bf16 — {env.get('device', '')}, "
        f"jax {env.get('jax', '')}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny shapes in the Pallas interpreter on the CPU (checks the script)",
    )
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT", "benchmarks/results"),
        help="directory for pallas_tune.json, tiles_tuned.json and the PNG",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="stop starting new work after this many seconds",
    )
    ap.add_argument("--reps", type=int, default=5, help="timed batches per measurement")
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    args = ap.parse_args()
    if args.cpu_smoke:
        os.environ["LONGFLASH_PALLAS_INTERPRET"] = "1"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    run = Run(args)
    run.results["environment"] = environment()
    run.log(f"environment: {run.results['environment']}")
    if not args.cpu_smoke and run.results["environment"]["platform"] != "gpu":
        print("no GPU: use --cpu-smoke on a CPU", file=sys.stderr)
        return 2
    sections = [s for s in args.sections.split(",") if s]
    run.results["ceilings"] = run.ceilings()
    run.log(f"ceilings: {run.results['ceilings']}")
    # (section, head dims, deadline as a fraction of the budget): hd128 first, it carries
    # the targets; a phase that runs late squeezes the ones after it, which then say so.
    phases = [
        ("correctness", (), 0.22),
        ("tune", (128,), 0.40),
        ("report", (128,), 0.72),
        ("tune", (64, 256), 0.80),
        ("report", (64, 256), 0.94),
        ("long", (128,), 1.0),
    ]
    if args.cpu_smoke:
        phases = [
            ("correctness", (), 1.0),
            ("tune", (32,), 1.0),
            ("report", (32,), 1.0),
            ("long", (32,), 1.0),
        ]
    for name, dims, until in phases:
        if name not in sections:
            continue
        try:
            if name == "correctness":
                run.correctness()
            elif name == "tune":
                run.tune(dims, until)
            else:
                run.report(name, dims, until)
        except Exception:
            run.results["errors"].append(f"section {name} {dims}: {traceback.format_exc()}")
            run.log(f"section {name} {dims} failed:\n{traceback.format_exc()}")
    run.results["rows"] = run.rows
    run.results["tiles_cuda"] = tiles_section(run)
    run.results["elapsed_s"] = run.budget.elapsed()

    os.makedirs(args.out, exist_ok=True)
    tag = "cpu-smoke" if args.cpu_smoke else "h200"
    with open(os.path.join(args.out, f"pallas_tune-{tag}.json"), "w") as fh:
        json.dump(run.results, fh, indent=1, default=str)
    with open(os.path.join(args.out, f"tiles_tuned-{tag}.json"), "w") as fh:
        json.dump(run.results["tiles_cuda"], fh, indent=1)
    try:
        plot(run, os.path.join(args.out, f"pallas_tune-{tag}.png"))
    except Exception as exc:
        run.log(f"no plot: {exc!r}")
    print()
    print(table(run))
    failed = [
        c for c in run.results["sections"].get("correctness", {}).get("checks", []) if not c["ok"]
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
