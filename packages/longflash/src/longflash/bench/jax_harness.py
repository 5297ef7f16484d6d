"""The JAX harness: LongFlash backends and jax.nn.dot_product_attention (cuDNN, XLA),
Pallas's own attention, and plain jax.numpy attention.

Every contender is jitted. Times are wall-clock around one call plus
``block_until_ready`` (JAX has no device events; dispatch adds a few µs). The backward is
timed alone: the VJP closure from one forward is jitted and called repeatedly. Peak memory
is XLA's compile-time figure for the jitted call: temporaries plus outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from longflash.bench import core
from longflash.bench.cases import Case
from longflash.bench.core import Contender, Measurement, Skip
from longflash.bench.timing import (
    CPU_POLICY,
    GPU_POLICY,
    Timing,
    TimingPolicy,
    time_wallclock,
)

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}

GPU_PEERS = ("jax-cudnn", "jax-xla", "pallas-mha", "naive")
CPU_PEERS = ("jax-xla", "naive")

PEER_DESCRIPTIONS = {
    "jax-cudnn": 'jax.nn.dot_product_attention(implementation="cudnn")',
    "jax-xla": 'jax.nn.dot_product_attention(implementation="xla")',
    "pallas-mha": "jax.experimental.pallas.ops.gpu.attention.mha (Pallas's own kernel)",
    "naive": "plain jax.numpy: softmax(q k^T * scale) v in the input dtype",
}


class JaxHarness:
    framework = "jax"

    def __init__(
        self, device: str, *, reps: int | None = None, check: bool = True, seed: int = 0
    ) -> None:
        platform = "gpu" if device == "cuda" else "cpu"
        try:
            self.dev = jax.devices(platform)[0]
        except RuntimeError as exc:
            raise RuntimeError(f"--device {device}: jax has no {platform} device ({exc})") from None
        self.device = device
        self.check = check
        self.seed = seed
        base = GPU_POLICY if device == "cuda" else CPU_POLICY
        self.policy = TimingPolicy(
            base.warmup_ms, base.rep_ms, base.min_reps, base.max_reps, reps, base.estimate_runs
        )
        self.timing_method = "perf_counter around block_until_ready, median"
        self.memory_method = "xla-memory-analysis (temporaries + outputs of the jitted call)"
        self._inputs_key: tuple | None = None
        self._inputs: dict[str, Any] = {}
        self._refs: dict[tuple, Any] = {}

    # -- contenders ---------------------------------------------------------------------
    def contenders(self, backends: list[str] | None, peers: list[str] | None) -> list[Contender]:
        out = core.longflash_contenders("jax", self.device, backends)
        for name in (GPU_PEERS if self.device == "cuda" else CPU_PEERS) if peers is None else peers:
            out.append(self._peer(name))
        return out

    def _peer(self, name: str) -> Contender:
        makers = {
            "jax-cudnn": lambda case: _make_dpa(case, "cudnn"),
            "jax-xla": lambda case: _make_dpa(case, "xla"),
            "pallas-mha": self._make_pallas,
            "naive": _make_naive,
        }
        if name not in makers:
            raise ValueError(f"unknown jax peer {name!r}; known: {', '.join(GPU_PEERS)}")
        return Contender(
            name, "peer", PEER_DESCRIPTIONS[name], makers[name], dense=name in ("naive", "jax-xla")
        )

    def _make_pallas(self, case: Case) -> Callable:
        if self.device != "cuda":
            raise Skip("Pallas ops.gpu.attention runs on a GPU only")
        if case.gqa:
            raise Skip("Pallas ops.gpu.attention has no grouped-query attention")
        if case.Nq != case.Nk:
            raise Skip("Pallas ops.gpu.attention needs Nq == Nk")
        try:
            from jax.experimental.pallas.ops.gpu import attention as pallas_attention
        except ImportError as exc:
            raise Skip(f"jax.experimental.pallas.ops.gpu.attention: {exc}") from None
        scale, causal = case.scale, case.causal
        return lambda q, k, v: pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=causal)

    # -- inputs -------------------------------------------------------------------------
    def _base_inputs(self, case: Case) -> dict[str, Any]:
        key = (case.dtype, case.B, case.Nq, case.Nk, case.Hq, case.Hk, case.Dqk, case.Dv)
        if key != self._inputs_key:
            self._inputs, self._refs = {}, {}
            dt = DTYPES[case.dtype]
            shapes = {
                "q": (case.B, case.Nq, case.Hq, case.Dqk),
                "k": (case.B, case.Nk, case.Hk, case.Dqk),
                "v": (case.B, case.Nk, case.Hk, case.Dv),
                "dout": (case.B, case.Nq, case.Hq, case.Dv),
            }
            keys = jax.random.split(jax.random.key(self.seed), len(shapes))
            with jax.default_device(self.dev):
                self._inputs = {
                    n: jax.random.normal(kk, s, dt) for kk, (n, s) in zip(keys, shapes.items())
                }
            self._inputs_key = key
        return self._inputs

    # -- measuring ----------------------------------------------------------------------
    def measure(self, case: Case, c: Contender) -> Measurement:
        too_big = core.dense_skip_reason(case, c, self.device)
        if too_big:
            return core.skipped(case, c, too_big)
        try:
            return self._measure(case, c)
        except Exception as exc:
            return core.skipped(case, c, core.describe_error(exc))

    def _measure(self, case: Case, c: Contender) -> Measurement:
        fn = c.make(case)
        base = self._base_inputs(case)
        q, k, v, dout = base["q"], base["k"], base["v"], base["dout"]
        fwd = jax.jit(fn)
        with c.context():
            out = jax.block_until_ready(fwd(q, k, v))
        err = self._check(case, base, out) if self.check else None
        tol = core.CHECK_TOLERANCE.get(case.dtype, math.inf)

        if case.direction == "fwd":

            def run():
                with c.context():
                    return fwd(q, k, v)

            def whole(q, k, v, dout):
                return fn(q, k, v)
        else:
            with c.context():
                _, vjp_fn = jax.vjp(fwd, q, k, v)
            bwd = jax.jit(lambda f, d: f(d))
            with c.context():  # compile outside the timer, as for the forward
                jax.block_until_ready(bwd(vjp_fn, dout))

            def run():
                with c.context():
                    return bwd(vjp_fn, dout)

            def whole(q, k, v, dout):
                return jax.vjp(fn, q, k, v)[1](dout)

        del out
        timing = self._time(run)
        with c.context():
            mem = _compiled_bytes(jax.jit(whole), q, k, v, dout)
        status, reason = "ok", ""
        if err is not None and not err <= tol:
            status, reason = "incorrect", f"output rel. error {err:.2e} > {tol:.0e} on sampled rows"
        return Measurement(case, c.name, c.kind, status, reason, timing, mem, err)

    def _time(self, run: Callable[[], Any]) -> Timing:
        return time_wallclock(run, self.policy, sync=jax.block_until_ready)

    def _check(self, case: Case, base: dict, out: Any) -> float:
        rows = core.sample_rows(case.Nq)
        key = (case.causal, tuple(rows))
        if key not in self._refs:
            self._refs[key] = _reference_rows(case, base["q"], base["k"], base["v"], rows)
        ref = self._refs[key]
        got = jnp.asarray(out)[:, jnp.asarray(rows)].astype(jnp.float32)
        return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))

    # -- ceilings and device ------------------------------------------------------------
    def ceilings(self, quick: bool) -> dict:
        if self.device == "cuda":
            n, dt, copy_bytes = (2048 if quick else 8192), jnp.bfloat16, 2**30
        else:
            n, dt, copy_bytes = (512 if quick else 2048), jnp.float32, 2**26
        ka, kb = jax.random.split(jax.random.key(self.seed))
        with jax.default_device(self.dev):
            a, b = jax.random.normal(ka, (n, n), dt), jax.random.normal(kb, (n, n), dt)
            x = jnp.zeros(copy_bytes // 4, jnp.float32)
        mm = jax.jit(jnp.matmul)
        t = self._time(lambda: mm(a, b))
        matmul = {
            "dtype": jnp.dtype(dt).name,
            "m": n,
            "n": n,
            "k": n,
            "flops": 2.0 * n**3,
            "ms": t.median_ms,
            "tflops": 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12,
        }
        # An elementwise op reads and writes every byte once, like a copy; a jitted
        # identity would return its input without moving anything.
        inc = jax.jit(lambda x: x + 1)
        t = self._time(lambda: inc(x))
        copy = {
            "bytes": copy_bytes,
            "ms": t.median_ms,
            "note": "x + 1 over float32: bytes read + written per second",
            "tb_per_s": 2.0 * copy_bytes / (t.median_ms * 1e-3) / 1e12,
        }
        return {"matmul": matmul, "copy": copy}

    def device_info(self) -> dict:
        info: dict[str, Any] = {"jax_device": f"{self.dev.platform}:{self.dev.id}"}
        if self.device == "cuda":
            stats = {}
            try:
                stats = self.dev.memory_stats() or {}
            except Exception:
                pass
            info["gpu"] = {
                "name": self.dev.device_kind,
                "capability": str(getattr(self.dev, "compute_capability", "")),
                "memory_bytes": stats.get("bytes_limit"),
                "count": len(jax.devices("gpu")),
            }
        return info


# -- peers ---------------------------------------------------------------------------------
def _make_dpa(case: Case, implementation: str) -> Callable:
    if case.causal and case.Nq != case.Nk:
        raise Skip("is_causal aligns the mask top-left; LongFlash's is bottom-right")
    scale, causal = case.scale, case.causal
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, implementation=implementation
    )


def _make_naive(case: Case) -> Callable:
    group, scale, off = case.Hq // case.Hk, case.scale, case.Nk - case.Nq
    mask = (
        jnp.arange(case.Nk)[None, :] <= jnp.arange(case.Nq)[:, None] + off if case.causal else None
    )

    def naive(q, k, v):
        if group > 1:
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * jnp.asarray(scale, q.dtype)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    return naive


# -- helpers -------------------------------------------------------------------------------
def _reference_rows(case: Case, q, k, v, rows: list[int]):
    """Exact attention of the sampled rows in float32 at full matmul precision."""
    idx = jnp.asarray(rows)
    hi = jax.lax.Precision.HIGHEST
    qs = q[:, idx].astype(jnp.float32)
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    group = case.Hq // case.Hk
    if group > 1:
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("brhd,bnhd->bhrn", qs, k, precision=hi) * case.scale
    if case.causal:
        keys = jnp.arange(case.Nk)
        s = jnp.where(keys[None, :] <= idx[:, None] + (case.Nk - case.Nq), s, -jnp.inf)
    return jnp.einsum("bhrn,bnhd->brhd", jax.nn.softmax(s, axis=-1), v, precision=hi)


def _compiled_bytes(jitted: Any, *args: Any) -> int | None:
    try:
        stats = jitted.lower(*args).compile().memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
