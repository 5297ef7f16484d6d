"""The PyTorch harness: LongFlash backends and the peers a PyTorch user would pick.

GPU timing follows triton.testing.do_bench: CUDA events around each run, the L2 cache
flushed between runs, the median taken. CPU timing uses perf_counter. The backward is
timed alone: one forward builds the graph, then torch.autograd.grad(..., retain_graph=True)
runs repeatedly on it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from longflash.bench import core
from longflash.bench.cases import Case
from longflash.bench.core import Contender, Measurement, Skip
from longflash.bench.timing import (
    CPU_POLICY,
    GPU_POLICY,
    HostPeakMemory,
    Timing,
    TimingPolicy,
    summarize,
    time_wallclock,
)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

GPU_PEERS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex", "naive")
CPU_PEERS = ("sdpa-math", "sdpa-flash", "naive")

# A buffer larger than any GPU's L2 (H100/H200: 50 MB; B200: 126 MB), zeroed before each
# timed run so that no run finds its inputs in cache from the previous one.
L2_FLUSH_BYTES = 256 * 1024 * 1024


def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }


PEER_DESCRIPTIONS = {
    "sdpa-flash": "torch SDPA, FLASH_ATTENTION backend (FlashAttention-2 on CUDA)",
    "sdpa-cudnn": "torch SDPA, CUDNN_ATTENTION backend",
    "sdpa-efficient": "torch SDPA, EFFICIENT_ATTENTION backend (xformers-style)",
    "sdpa-math": "torch SDPA, MATH backend (materialises the scores)",
    "flex": "torch.compile(flex_attention), causal BlockMask built once per shape",
    "naive": "plain PyTorch: softmax(q @ k^T * scale) @ v in the input dtype",
}


class TorchHarness:
    framework = "torch"

    def __init__(
        self,
        device: str,
        *,
        reps: int | None = None,
        l2_flush: bool = True,
        check: bool = True,
        seed: int = 0,
    ) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
        self.device = device
        self.check = check
        self.seed = seed
        base = GPU_POLICY if device == "cuda" else CPU_POLICY
        self.policy = TimingPolicy(
            base.warmup_ms, base.rep_ms, base.min_reps, base.max_reps, reps, base.estimate_runs
        )
        self._host = HostPeakMemory() if device == "cpu" else None
        if device == "cuda":
            self.timing_method = "cuda-events, median" + (
                ", L2 flushed between runs" if l2_flush else ""
            )
            self.memory_method = "cuda-max-allocated"
            self._flush = (
                torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if l2_flush else None
            )
        else:
            self.timing_method = "perf_counter, median"
            self.memory_method = self._host.method
            self._flush = None
        self._inputs_key: tuple | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._refs: dict[tuple, torch.Tensor] = {}

    # -- contenders ---------------------------------------------------------------------
    def contenders(self, backends: list[str] | None, peers: list[str] | None) -> list[Contender]:
        out = core.longflash_contenders("torch", self.device, backends)
        default_peers = GPU_PEERS if self.device == "cuda" else CPU_PEERS
        for name in default_peers if peers is None else peers:
            out.append(self._peer(name))
        return out

    def _peer(self, name: str) -> Contender:
        sdpa = _sdpa_backends()
        if name in sdpa:
            return Contender(
                name,
                "peer",
                PEER_DESCRIPTIONS[name],
                _make_sdpa,
                "bhnd",
                context=lambda b=sdpa[name]: _sdpa_kernel(b),
                dense=name == "sdpa-math",
            )
        if name == "flex":
            return Contender(name, "peer", PEER_DESCRIPTIONS[name], self._make_flex, "bhnd")
        if name == "naive":
            return Contender(
                name, "peer", PEER_DESCRIPTIONS[name], self._make_naive, "bhnd", dense=True
            )
        raise ValueError(f"unknown torch peer {name!r}; known: {', '.join(GPU_PEERS)}")

    def _make_naive(self, case: Case) -> Callable:
        group, scale, dev = case.Hq // case.Hk, case.scale, self.device
        # Built once per shape, as a user would keep a causal mask buffer around.
        mask = (
            torch.ones(case.Nq, case.Nk, dtype=torch.bool, device=dev).triu(case.Nk - case.Nq + 1)
            if case.causal
            else None
        )

        def naive(q, k, v):
            if group > 1:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            s = (q @ k.transpose(-2, -1)) * scale
            if mask is not None:
                s = s.masked_fill(mask, float("-inf"))
            return torch.softmax(s, dim=-1) @ v

        return naive

    def _make_flex(self, case: Case) -> Callable:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:
            raise Skip(f"FlexAttention not in this torch ({torch.__version__}): {exc}") from None
        _raise_recompile_limit()
        block_mask = None
        if case.causal:
            off = case.Nk - case.Nq

            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx + off >= kv_idx

            block_mask = create_block_mask(
                causal_mask, B=None, H=None, Q_LEN=case.Nq, KV_LEN=case.Nk, device=self.device
            )
        compiled = _compiled_flex(flex_attention)
        gqa = case.gqa
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    # -- inputs -------------------------------------------------------------------------
    def _base_inputs(self, case: Case) -> dict[str, torch.Tensor]:
        """Random normal q, k, v, dout in (B, N, H, D), shared by every contender of a
        shape so that all see the same numbers."""
        key = (case.dtype, case.B, case.Nq, case.Nk, case.Hq, case.Hk, case.Dqk, case.Dv)
        if key != self._inputs_key:
            self._inputs = {}
            self._refs = {}
            self._release()
            g = torch.Generator(device=self.device).manual_seed(self.seed)
            dt = DTYPES[case.dtype]
            shapes = {
                "q": (case.B, case.Nq, case.Hq, case.Dqk),
                "k": (case.B, case.Nk, case.Hk, case.Dqk),
                "v": (case.B, case.Nk, case.Hk, case.Dv),
                "dout": (case.B, case.Nq, case.Hq, case.Dv),
            }
            self._inputs = {
                n: torch.randn(s, generator=g, device=self.device, dtype=dt)
                for n, s in shapes.items()
            }
            self._inputs_key = key
        return self._inputs

    @staticmethod
    def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
        return x.transpose(1, 2).contiguous() if layout == "bhnd" else x

    # -- measuring ----------------------------------------------------------------------
    def measure(self, case: Case, c: Contender) -> Measurement:
        too_big = core.dense_skip_reason(case, c, self.device)
        if too_big:
            return core.skipped(case, c, too_big)
        try:
            return self._measure(case, c)
        except Exception as exc:  # one contender failing never ends the run
            reason = core.describe_error(exc)
        # Outside the except block: the traceback, and the tensors its frames hold, are
        # gone only once it ends.
        self._release()
        return core.skipped(case, c, reason)

    def _measure(self, case: Case, c: Contender) -> Measurement:
        fn = c.make(case)
        base = self._base_inputs(case)
        bwd = case.direction == "bwd"
        q, k, v = (self._layout(base[n], c.layout) for n in ("q", "k", "v"))
        if bwd:
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        dout = self._layout(base["dout"], c.layout) if bwd else None

        # The first call compiles and tunes where a contender does so; it also says
        # whether the contender runs this case at all (SDPA explains only in warnings).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with c.context(), _grad_mode(bwd):
                    out = fn(q, k, v)
                self._sync()
            except Exception as exc:
                why = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
                raise Skip(core.describe_error(exc) + (f" ({why[:600]})" if why else "")) from exc
        err = self._check(case, base, out, c.layout) if self.check else None
        tol = core.CHECK_TOLERANCE.get(case.dtype, math.inf)

        if bwd:
            graph_out = out

            def run():
                with c.context():
                    return torch.autograd.grad(graph_out, (q, k, v), dout, retain_graph=True)
        else:

            def run():
                with c.context(), torch.no_grad():
                    return fn(q, k, v)

        del out
        timing = self._time(run)
        del run
        if bwd:
            del graph_out

        def memory_run():
            with c.context(), _grad_mode(bwd):
                o = fn(q, k, v)
                result = torch.autograd.grad(o, (q, k, v), dout) if bwd else o
            self._sync()
            return result

        mem = self._memory(memory_run)
        status, reason = "ok", ""
        if err is not None and not err <= tol:
            status, reason = "incorrect", f"output rel. error {err:.2e} > {tol:.0e} on sampled rows"
        return Measurement(case, c.name, c.kind, status, reason, timing, mem, err)

    def _time(self, run: Callable[[], Any]) -> Timing:
        if self.device != "cuda":
            return time_wallclock(run, self.policy)
        p = self.policy
        flush = self._flush
        # Untimed: the first backward may compile or autotune (FlexAttention, Triton),
        # which would make the estimate, and so the run counts, far too small.
        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(p.estimate_runs):
            if flush is not None:
                flush.zero_()
            run()
        end.record()
        torch.cuda.synchronize()
        warmup, reps = p.counts(start.elapsed_time(end) / p.estimate_runs)
        for _ in range(warmup):
            run()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            if flush is not None:
                flush.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], warmup)

    def _memory(self, run: Callable[[], Any]) -> int:
        if self.device != "cuda":
            return self._host.measure(run)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = run()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return peak

    def _check(self, case: Case, base: dict, out: torch.Tensor, layout: str) -> float:
        rows = core.sample_rows(case.Nq)
        ref = self._reference_rows(case, base, rows)
        got = out.transpose(1, 2) if layout == "bhnd" else out
        got = got.detach()[:, rows].to(ref.dtype)
        return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))

    def _reference_rows(self, case: Case, base: dict, rows: list[int]) -> torch.Tensor:
        """Exact attention for the sampled query rows, float64 on the CPU and float32 on
        the GPU, from the same (rounded) inputs the contenders get."""
        key = (case.causal, tuple(rows))
        if key in self._refs:
            return self._refs[key]
        acc = torch.float64 if self.device == "cpu" else torch.float32
        idx = torch.tensor(rows, device=self.device)
        q = base["q"][:, idx].to(acc)
        k, v = base["k"].to(acc), base["v"].to(acc)
        group = case.Hq // case.Hk
        if group > 1:
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        s = torch.einsum("brhd,bnhd->bhrn", q, k) * case.scale
        if case.causal:
            keys = torch.arange(case.Nk, device=self.device)
            s = s.masked_fill(keys[None, :] > idx[:, None] + (case.Nk - case.Nq), -math.inf)
        ref = torch.einsum("bhrn,bnhd->brhd", torch.softmax(s, dim=-1), v)
        self._refs[key] = ref
        return ref

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _release(self) -> None:
        # On a GPU, give cached blocks back so that the next contender's peak memory and
        # OOM are its own; gc.collect (a quarter second with torch loaded) only there.
        if self.device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    # -- ceilings and device ------------------------------------------------------------
    def ceilings(self, quick: bool) -> dict:
        """The rates this device reaches on plain work, measured in the same run."""
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        if self.device == "cuda":
            n, dt, copy_bytes = (2048 if quick else 8192), torch.bfloat16, 2**30
        else:
            n, dt, copy_bytes = (512 if quick else 2048), torch.float32, 2**26
        a = torch.randn(n, n, generator=g, device=self.device, dtype=dt)
        b = torch.randn(n, n, generator=g, device=self.device, dtype=dt)
        t = self._time(functools.partial(torch.matmul, a, b))
        matmul = {
            "dtype": str(dt).removeprefix("torch."),
            "m": n,
            "n": n,
            "k": n,
            "flops": 2.0 * n**3,
            "ms": t.median_ms,
            "tflops": 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12,
        }
        del a, b
        src = torch.randn(copy_bytes // 4, generator=g, device=self.device)
        dst = torch.empty_like(src)
        t = self._time(functools.partial(dst.copy_, src))
        copy = {
            "bytes": copy_bytes,
            "ms": t.median_ms,
            "note": "bytes read + written per second",
            "tb_per_s": 2.0 * copy_bytes / (t.median_ms * 1e-3) / 1e12,
        }
        del src, dst
        self._release()
        return {"matmul": matmul, "copy": copy}

    def device_info(self) -> dict:
        info: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
        if self.device == "cuda":
            i = torch.cuda.current_device()
            p = torch.cuda.get_device_properties(i)
            info["gpu"] = {
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_bytes": p.total_memory,
                "multiprocessors": p.multi_processor_count,
                "count": torch.cuda.device_count(),
            }
        return info


# -- helpers ----------------------------------------------------------------------------
def _grad_mode(enabled: bool) -> contextlib.AbstractContextManager:
    return torch.enable_grad() if enabled else torch.no_grad()


def _sdpa_kernel(backend: Any) -> contextlib.AbstractContextManager:
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend])


def _make_sdpa(case: Case) -> Callable:
    import torch.nn.functional as F

    if case.causal and case.Nq != case.Nk:
        raise Skip("SDPA's is_causal aligns the mask top-left; LongFlash's is bottom-right")
    causal, gqa = case.causal, case.gqa

    def sdpa(q, k, v):
        if gqa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return sdpa


_FLEX: dict[int, Callable] = {}


def _compiled_flex(flex_attention: Callable) -> Callable:
    # One compiled wrapper for the whole run; dynamic=False so that each shape gets its
    # own static kernel, as a user with fixed shapes would get.
    if id(flex_attention) not in _FLEX:
        _FLEX[id(flex_attention)] = torch.compile(flex_attention, dynamic=False)
    return _FLEX[id(flex_attention)]


def _raise_recompile_limit() -> None:
    # Every shape and mask recompiles flex_attention; dynamo's default limit (8) would
    # silently fall back to the eager, score-materialising path after eight of them.
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < 512:
            setattr(cfg, name, 512)
