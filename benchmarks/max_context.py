"""The longest training context on one GPU: plain PyTorch attention against LongFlash.

For each model configuration and attention variant, find by doubling and then bisection the
longest sequence for which one training step (forward + backward, batch 1, bf16 weights,
activation checkpointing per layer) runs without running out of GPU memory. Every trial
runs in this process: an out-of-memory error is caught, the cache emptied and the peak
counters reset before the next one.

The model is our own compact LLaMA-architecture decoder in plain torch: token embedding,
pre-norm blocks (RMSNorm, causal self-attention with rotary embeddings, RMSNorm, SwiGLU MLP
with LLaMA's intermediate size), a final RMSNorm and an untied LM head (LLaMA-2 7B does not
tie it). The loss is next-token cross-entropy computed over chunks of tokens, each chunk
checkpointed, so the vocab-sized logits of one chunk at a time exist, never of the whole
sequence. No optimizer state: what is in memory is the weights, their gradients and the
activations.

Attention variants (the only thing that differs between them):
  naive      plain PyTorch, what FlashAttention replaces: q@k^T, causal mask, softmax, @v,
             all in bf16 with the mask applied in place (the leanest plain form; an fp32
             softmax as in Hugging Face's eager LLaMA would need more memory)
  sdpa       torch.nn.functional.scaled_dot_product_attention(is_causal=True)
  longflash  longflash.attention(q, k, v, causal=True, backend=--backend)

  python benchmarks/max_context.py --configs 7b,1b
  python benchmarks/max_context.py --configs 7b,1b --backend triton \\
      --start naive=16K,longflash=192K --resolution 1K --time-budget-s 7b=330,1b=150
  python benchmarks/max_context.py --device cpu --configs tiny --start 256 --multiple 256 \\
      --max-length 1K                                               # a smoke run on the CPU

Results: benchmarks/results/max-context-<device>-<date>.json (rewritten after every trial,
so a run cut short keeps what it measured), a PNG beside it, and the same files in $OUT
when that is set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
SCHEMA = "longflash-max-context/1"
VARIANTS = ("naive", "sdpa", "longflash")
# Plain attention runs out of memory at short lengths and fails fast; the O(N) variants
# start higher so that the doubling does not spend trials far below their limit.
DEFAULT_START = {"naive": 4096, "sdpa": 32768, "longflash": 32768}
MEMORY_STATEMENT = (
    "No optimizer state: the memory is the {dtype} weights, their {dtype} gradients and the "
    "activations of one training step (batch 1, activation checkpointing per layer, loss in "
    "checkpointed chunks). AdamW would add 8 bytes per parameter for its two fp32 moments "
    "(12 with fp32 master weights)."
)


# -- the search: pure, over a probe n -> fits ----------------------------------------------
@dataclass
class Trial:
    """One training step at length n. ``status`` is "fit", "oom", "error" or, for probes
    that answer with a bare bool, "fit"/"fail"."""

    n: int
    fits: bool
    status: str = ""
    phase: str = ""  # "double", "halve" or "bisect": which part of the search asked
    elapsed_s: float = 0.0  # the whole trial, setup and cleanup included
    step_s: float | None = None  # forward + backward
    fwd_s: float | None = None
    bwd_s: float | None = None
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    loss: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "fit" if self.fits else "fail"


@dataclass
class Search:
    """The bracket found: ``max_fit`` fits, ``first_fail`` (> max_fit) does not; either may
    be None (nothing fits / no failure reached). ``stopped`` says why the search ended."""

    max_fit: int | None
    first_fail: int | None
    stopped: str  # "resolved", "budget", "max_length", "nothing_fits", "error"
    note: str
    resolution: int | None
    trials: list[Trial] = field(default_factory=list)


Probe = Callable[[int], "Trial | bool"]
Estimate = Callable[[Sequence[Trial], int], float]


class _Stop(Exception):
    def __init__(self, reason: str, note: str):
        super().__init__(note)
        self.reason, self.note = reason, note


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def round_down(n: int, multiple: int) -> int:
    return n // multiple * multiple


def parse_length(text: str | int) -> int:
    """'4096', '4K', '1M' -> tokens (K = 1024)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:], 1)
    return int(float(s[:-1] if scale > 1 else s) * scale)


def parse_resolution(text: str | float | int) -> float | int:
    """'1/16' or '0.0625' -> a fraction of the first bracket; '4K' or '2048' -> tokens."""
    if isinstance(text, (int, float)):
        return text
    s = text.strip()
    if "/" in s:
        a, b = s.split("/", 1)
        return float(a) / float(b)
    if "." in s and s.replace(".", "", 1).isdigit():
        return float(s)
    return parse_length(s)


def resolution_tokens(resolution: float | int, lo: int, hi: int, multiple: int) -> int:
    """The bisection stops once hi - lo <= this: a fraction (< 1) of the first bracket, or
    a length; never below one multiple, always a multiple."""
    if isinstance(resolution, float) and resolution < 1:
        return max(multiple, round_down(int(resolution * (hi - lo)), multiple))
    return max(multiple, round_up(int(resolution), multiple))


def quadratic_estimate(trials: Sequence[Trial], n: int) -> float:
    """Seconds a trial at n may take: the nearest completed trial at or below n, scaled by
    (n / n_i)^2. Attention is the quadratic part; the rest grows linearly, so this errs long.
    0 when nothing below n has run (no basis: the trial runs)."""
    below = [t for t in trials if t.fits and t.n <= n]
    if not below:
        return 0.0
    t = max(below, key=lambda t: t.n)
    return t.elapsed_s * (n / t.n) ** 2


def _as_trial(n: int, result: Trial | bool) -> Trial:
    if isinstance(result, Trial):
        if result.n != n:
            raise ValueError(f"the probe answered for n={result.n}, asked n={n}")
        return result
    return Trial(n=n, fits=bool(result))


def find_max_length(
    probe: Probe,
    *,
    start: int,
    multiple: int = 1024,
    resolution: float | int = 1 / 16,
    max_length: int | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    estimate: Estimate = quadratic_estimate,
    on_trial: Callable[[Trial], None] | None = None,
) -> Search:
    """The longest n (a multiple of ``multiple``) with probe(n) true, assuming that fitting
    is monotone in n.

    Doubling from ``start`` until a failure (or halving, when ``start`` already fails), then
    bisection between the last fit and the first failure until they are at most the
    resolution apart. With a ``deadline`` (on ``clock``), a trial starts only if time is
    left and ``estimate`` says it will end before the deadline; otherwise the search stops
    with the bracket found so far. A trial with status "error" (neither fit nor out of
    memory) ends the search: it says nothing about memory.
    """
    if multiple < 1 or start < 1:
        raise ValueError("start and multiple must be >= 1")
    cap = None if max_length is None else round_down(max_length, multiple)
    if cap is not None and cap < multiple:
        raise ValueError(f"max_length {max_length} is below one multiple ({multiple})")
    trials: list[Trial] = []
    lo: int | None = None
    hi: int | None = None
    res: int | None = None

    def run(n: int, phase: str) -> bool:
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                raise _Stop("budget", f"time budget spent before the trial at N={n}")
            guess = estimate(trials, n)
            if guess > left:
                raise _Stop(
                    "budget",
                    f"the trial at N={n} would take ~{guess:.0f} s and {left:.0f} s are left",
                )
        t0 = clock()
        trial = _as_trial(n, probe(n))
        if not trial.elapsed_s:
            trial.elapsed_s = clock() - t0
        trial.phase = phase
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        if trial.status == "error":
            raise _Stop("error", f"N={n}: {trial.error or 'error'}")
        return trial.fits

    try:
        n = round_up(start, multiple)
        if cap is not None:
            n = min(n, cap)
        if run(n, "double"):
            lo = n
            while True:
                if cap is not None and lo >= cap:
                    raise _Stop("max_length", f"fits at the cap N={cap}")
                n = 2 * lo if cap is None else min(2 * lo, cap)
                if not run(n, "double"):
                    hi = n
                    break
                lo = n
        else:
            hi = n
            while True:
                n = round_down(hi // 2, multiple)
                if n < multiple:
                    raise _Stop("nothing_fits", f"N={hi} fails and it is the smallest tried")
                if run(n, "halve"):
                    lo = n
                    break
                hi = n
        res = resolution_tokens(resolution, lo, hi, multiple)
        while hi - lo > res:
            mid = lo + round_down((hi - lo) // 2, multiple)
            if run(mid, "bisect"):
                lo = mid
            else:
                hi = mid
        stopped, note = "resolved", f"bracket [{lo}, {hi}) within {res} tokens"
    except _Stop as stop:
        stopped, note = stop.reason, stop.note
    return Search(lo, hi, stopped, note, res, trials)


def ratio_summary(base: Search, ours: Search) -> dict[str, float | None]:
    """Our longest fitting length over the baseline's, and the bounds the brackets allow:
    the true ratio lies in [lower, upper] (None where a bracket is open)."""
    out: dict[str, float | None] = {"ratio": None, "lower": None, "upper": None}
    if ours.max_fit is None or base.max_fit is None:
        return out
    out["ratio"] = ours.max_fit / base.max_fit
    if base.first_fail is not None:
        out["lower"] = ours.max_fit / base.first_fail
    if ours.first_fail is not None:
        out["upper"] = ours.first_fail / base.max_fit
    return out


def extrapolate_max(trials: Sequence[Trial], capacity_gib: float, degree: int) -> float | None:
    """The length at which a polynomial fit of peak memory over the fitting trials reaches
    the capacity: an estimate, not a measurement (degree 1 for O(N) attention, 2 for
    plain attention)."""
    pts = [(t.n, t.peak_allocated_gib) for t in trials if t.fits and t.peak_allocated_gib]
    if len({n for n, _ in pts}) < degree + 1:
        return None
    import numpy as np

    xs = np.array([p[0] for p in pts], dtype=float)
    ys = np.array([p[1] for p in pts], dtype=float)
    coef = np.polyfit(xs, ys, degree)
    coef[-1] -= capacity_gib
    roots = [r.real for r in np.roots(coef) if abs(r.imag) < 1e-9 and r.real > 0]
    above = [r for r in roots if r >= xs.max()]
    return float(min(above)) if above else None


# -- the model --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int
    heads: int
    layers: int
    intermediate: int
    vocab: int
    kv_heads: int | None = None  # None: multi-head attention
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv(self) -> int:
        return self.kv_heads or self.heads

    def params(self) -> int:
        d, hd = self.hidden, self.head_dim
        attn = d * self.heads * hd * 2 + d * self.n_kv * hd * 2
        mlp = 3 * d * self.intermediate
        per_layer = attn + mlp + 2 * d
        return self.layers * per_layer + 2 * self.vocab * d + d  # embedding + untied head


CONFIGS = {
    # LLaMA-2 7B.
    "7b": ModelConfig("7b", hidden=4096, heads=32, layers=32, intermediate=11008, vocab=32000),
    # TinyLlama-1.1B's widths with multi-head attention (it uses 4 KV heads).
    "1b": ModelConfig("1b", hidden=2048, heads=16, layers=22, intermediate=5632, vocab=32000),
    # For the CPU tests.
    "tiny": ModelConfig("tiny", hidden=64, heads=4, layers=2, intermediate=172, vocab=256),
}

Attend = Callable[[Any, Any, Any], Any]


def build_model(cfg: ModelConfig, device: Any, dtype: Any, seed: int = 0) -> Any:
    """The LLaMA-architecture decoder, initialised N(0, 0.02) on ``device``."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.checkpoint import checkpoint

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
            self.eps = cfg.norm_eps

        def forward(self, x):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def linear(i: int, o: int) -> nn.Linear:
        return nn.Linear(i, o, bias=False, dtype=dtype)

    def rotate(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d, hd = cfg.hidden, cfg.head_dim
            self.attn_norm = RMSNorm(d)
            self.q = linear(d, cfg.heads * hd)
            self.k = linear(d, cfg.n_kv * hd)
            self.v = linear(d, cfg.n_kv * hd)
            self.o = linear(cfg.heads * hd, d)
            self.mlp_norm = RMSNorm(d)
            self.gate = linear(d, cfg.intermediate)
            self.up = linear(d, cfg.intermediate)
            self.down = linear(cfg.intermediate, d)

        def forward(self, x, cos, sin, attend: Attend):
            b, n, _ = x.shape
            h = self.attn_norm(x)
            # (B, N, H, D) is LongFlash's layout: the projections need no transpose for it.
            q = rotate(self.q(h).view(b, n, cfg.heads, cfg.head_dim), cos, sin)
            k = rotate(self.k(h).view(b, n, cfg.n_kv, cfg.head_dim), cos, sin)
            v = self.v(h).view(b, n, cfg.n_kv, cfg.head_dim)
            x = x + self.o(attend(q, k, v).reshape(b, n, -1))
            h = self.mlp_norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    def ce_sum(h, weight, labels):
        logits = F.linear(h, weight).float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")

    class Llama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cfg = cfg
            self.embed = nn.Embedding(cfg.vocab, cfg.hidden, dtype=dtype)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.norm = RMSNorm(cfg.hidden)
            self.head = linear(cfg.hidden, cfg.vocab)

        def rotary(self, n: int, device):
            hd = cfg.head_dim
            inv = 1.0 / cfg.rope_theta ** (
                torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd
            )
            ang = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
            ang = torch.cat((ang, ang), dim=-1)[None, :, None, :]
            return ang.cos().to(dtype), ang.sin().to(dtype)

        def forward(
            self,
            tokens,
            labels,
            attend: Attend,
            *,
            loss_chunk: int = 4096,
            checkpoint_layers: bool = True,
        ):
            """Mean next-token cross-entropy (float32) of one batch."""
            x = self.embed(tokens)
            cos, sin = self.rotary(tokens.shape[1], tokens.device)
            for blk in self.blocks:
                if checkpoint_layers:
                    x = checkpoint(blk, x, cos, sin, attend, use_reentrant=False)
                else:
                    x = blk(x, cos, sin, attend)
            x = self.norm(x)
            total = x.new_zeros((), dtype=torch.float32)
            for s in range(0, x.shape[1], loss_chunk):
                total = total + checkpoint(
                    ce_sum,
                    x[:, s : s + loss_chunk],
                    self.head.weight,
                    labels[:, s : s + loss_chunk],
                    use_reentrant=False,
                )
            return total / labels.numel()

    torch.manual_seed(seed)
    with torch.device(device):
        model = Llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    return model


class NaiveAttention:
    """softmax(q k^T * scale + causal mask) v in the input dtype, as a user writes it: the
    N x N scores are materialised. The scale goes on q (N*D work, not N*N) and the mask is
    applied in place; the mask is built once per length."""

    def __init__(self) -> None:
        self._masks: dict[tuple[int, str], Any] = {}

    def reset(self) -> None:
        self._masks.clear()

    def __call__(self, q, k, v):
        import torch

        n, d = q.shape[1], q.shape[-1]
        group = q.shape[2] // k.shape[2]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        key = (n, str(q.device))
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
            self._masks[key] = mask
        q, k, v = (q * d**-0.5).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        s = q @ k.transpose(-2, -1)
        s.masked_fill_(mask, float("-inf"))
        return (torch.softmax(s, dim=-1) @ v).transpose(1, 2)


def sdpa_attention(q, k, v):
    from torch.nn import functional as F

    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def make_attention(variant: str, backend: str = "auto") -> Attend:
    if variant == "naive":
        return NaiveAttention()
    if variant == "sdpa":
        return sdpa_attention
    if variant == "longflash":
        import longflash

        def longflash_attention(q, k, v):
            return longflash.attention(q, k, v, causal=True, backend=backend)

        return longflash_attention
    raise ValueError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")


def resolve_backend(cfg: ModelConfig, device: Any, dtype: Any, backend: str) -> str:
    """The backend LongFlash runs for this model's attention calls (shapes only)."""
    import torch
    from longflash.frontends.torch import make_call
    from longflash.registry import REGISTRY

    q = torch.empty(1, 1024, cfg.heads, cfg.head_dim, dtype=dtype, device=device)
    k = torch.empty(1, 1024, cfg.n_kv, cfg.head_dim, dtype=dtype, device=device)
    return REGISTRY.select(make_call(q, k, k, causal=True), backend).name


# -- one trial on the device ----------------------------------------------------------------
def _is_oom(message: str) -> bool:
    m = message.lower()
    # cuBLAS and cuDNN report a failed workspace allocation in their own words.
    return "out of memory" in m or "alloc_failed" in m or "cudaerrormemoryallocation" in m


class Prober:
    """probe(n): one training step of ``model`` at length n with ``attend``, measured."""

    def __init__(
        self, model: Any, attend: Attend, device: Any, *, loss_chunk: int, seed: int = 0
    ) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.attend = attend
        self.device = device
        self.loss_chunk = loss_chunk
        self.cuda = device.type == "cuda"
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def clean(self, collect: bool = True) -> None:
        self.model.zero_grad(set_to_none=True)
        reset = getattr(self.attend, "reset", None)
        if reset is not None:
            reset()
        if collect:  # a failed step's tensors may sit in reference cycles (traceback, frames)
            gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def step(self, n: int) -> tuple[float, float, float]:
        """(loss, forward s, backward s) of one step at length n."""
        tokens = self.torch.randint(
            self.model.cfg.vocab, (1, n + 1), device=self.device, generator=self.gen
        )
        self._sync()
        t0 = time.perf_counter()
        loss = self.model(tokens[:, :-1], tokens[:, 1:], self.attend, loss_chunk=self.loss_chunk)
        self._sync()
        t1 = time.perf_counter()
        loss.backward()
        self._sync()
        t2 = time.perf_counter()
        return float(loss.detach()), t1 - t0, t2 - t1

    def __call__(self, n: int) -> Trial:
        torch = self.torch
        self.clean(collect=False)  # the previous trial ended with a full clean
        t0 = time.perf_counter()
        status, error, timing = "fit", None, None
        try:
            timing = self.step(n)
        except torch.cuda.OutOfMemoryError as exc:
            status, error = "oom", str(exc).splitlines()[0][:300]
        except RuntimeError as exc:
            text = str(exc)
            status = "oom" if _is_oom(text) else "error"
            error = text.splitlines()[0][:300] if text else type(exc).__name__
        # The exception (and the step's tensors its traceback held) is gone here.
        peaks = (None, None)
        if self.cuda:
            peaks = (
                torch.cuda.max_memory_allocated(self.device) / GIB,
                torch.cuda.max_memory_reserved(self.device) / GIB,
            )
        self.clean()
        trial = Trial(
            n=n,
            fits=status == "fit",
            status=status,
            elapsed_s=time.perf_counter() - t0,
            peak_allocated_gib=peaks[0],
            peak_reserved_gib=peaks[1],
            error=error,
        )
        if timing is not None:
            trial.loss, trial.fwd_s, trial.bwd_s = timing
            trial.step_s = trial.fwd_s + trial.bwd_s
            if not math.isfinite(trial.loss):
                trial.error = "the loss is not finite"
        return trial


# -- the run ----------------------------------------------------------------------------------
def _variant_spec(text: str | None, default: dict[str, Any], parse: Callable) -> dict[str, Any]:
    """'4K' (every variant) or 'naive=4K,longflash=128K' (the rest keep their default)."""
    out = dict(default)
    if not text:
        return out
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            return {v: parse(item) for v in out}
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r} in {text!r}")
        out[name] = parse(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--configs", default="7b,1b", help=f"from {', '.join(CONFIGS)}")
    ap.add_argument("--variants", default="naive,longflash", help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--backend", default="auto", help="LongFlash backend (default: auto)")
    ap.add_argument(
        "--start",
        default=None,
        help="first length, for all variants or per variant: 'naive=4K,longflash=32K'; "
        "a config prefix narrows an item to one config: '1b:longflash=320K' "
        f"(default {', '.join(f'{k}={v // 1024}K' for k, v in DEFAULT_START.items())})",
    )
    ap.add_argument(
        "--resolution",
        default="1/16",
        help="stop the bisection at this bracket width: a fraction of the first bracket "
        "('1/16') or a length ('4K')",
    )
    ap.add_argument("--multiple", type=parse_length, default=1024, help="lengths are multiples")
    ap.add_argument("--max-length", type=parse_length, default=None, help="never try longer")
    ap.add_argument(
        "--time-budget-s",
        default=None,
        help="seconds for the whole run ('480'), or per config ('7b=330,1b=150'); each "
        "search gets an equal share of what is left (of the run, or of its config) when it "
        "starts, and stops cleanly with its bracket so far when a trial would not fit",
    )
    ap.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="redo the summary, table and plot of an earlier run's JSON; runs nothing",
    )
    ap.add_argument("--loss-chunk", type=parse_length, default=4096, help="tokens per loss chunk")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-expandable-segments",
        dest="expandable",
        action="store_false",
        help="keep PyTorch's default allocator (expandable segments fragment less at the "
        "limit; both variants get the same allocator)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-plot", dest="plot", action="store_false")
    args = ap.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    args.variants = [v for v in args.variants.split(",") if v]
    for c in args.configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r} (choose from {', '.join(CONFIGS)})")
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    args.start = _start_spec(args.start, args.configs)
    args.resolution = parse_resolution(args.resolution)
    args.time_budget_s = _budget_spec(args.time_budget_s, args.configs)
    return args


def _start_spec(text: str | None, configs: list[str]) -> dict[str, int]:
    """ "config:variant" -> first length. Items without a config prefix apply to every
    config; 'cfg:variant=len' items override them for one config."""
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    general = ",".join(i for i in items if ":" not in i.partition("=")[0])
    base = _variant_spec(general, DEFAULT_START, parse_length)
    out = {f"{c}:{v}": n for c in configs for v, n in base.items()}
    for item in items:
        name, _, value = item.partition("=")
        cname, sep, variant = name.partition(":")
        if not sep:
            continue
        if cname not in configs or variant not in VARIANTS:
            raise SystemExit(f"--start item {item!r}: unknown config or variant")
        out[name] = parse_length(value)
    return out


def _budget_spec(text: str | None, configs: list[str]) -> float | dict[str, float] | None:
    if not text:
        return None
    if "=" not in text:
        return float(text)
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name not in configs:
            raise SystemExit(f"--time-budget-s names {name!r}, which is not in --configs")
        out[name] = float(value)
    return out


class Budget:
    """Deadlines on time.monotonic(): each search gets an equal share of what is left of
    the run's budget, or of its config's, when it starts; None where there is no budget."""

    def __init__(self, spec: float | dict[str, float] | None, jobs: list[tuple[str, str]]):
        self.spec, self.jobs = spec, jobs
        self.t0 = time.monotonic()
        self._config_deadline: dict[str, float] = {}

    def deadline(self, i: int) -> float | None:
        now = time.monotonic()
        if self.spec is None:
            return None
        if isinstance(self.spec, dict):
            cname = self.jobs[i][0]
            if cname not in self.spec:
                return None
            end = self._config_deadline.setdefault(cname, now + self.spec[cname])
            left = sum(1 for c, _ in self.jobs[i:] if c == cname)
        else:
            end, left = self.t0 + self.spec, len(self.jobs) - i
        return now + max(0.0, end - now) / left


def _machine(device: Any) -> dict[str, Any]:
    import torch
    from longflash.bench.report import cpu_name, device_slug, gpu_driver

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / GIB,
            "free_at_start_gib": free / GIB,
            "driver": gpu_driver(),
        }
    info["slug"] = device_slug(info)
    return info


class Recorder:
    """The results document, rewritten after every trial."""

    def __init__(self, args: argparse.Namespace, doc: dict[str, Any]) -> None:
        stamp = doc["date"][:19].replace("-", "").replace(":", "").replace("T", "-")
        name = f"max-context-{doc['machine']['slug']}-{stamp}.json"
        self.paths = [args.out / name]
        if os.environ.get("OUT"):
            extra = Path(os.environ["OUT"]) / name
            if extra.resolve() != self.paths[0].resolve():
                self.paths.append(extra)
        self.doc = doc

    def write(self) -> None:
        text = json.dumps(_finite(self.doc), indent=1, default=str) + "\n"
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _search_entry(
    cfg: ModelConfig, variant: str, backend: str | None, start: int
) -> dict[str, Any]:
    return {
        "config": cfg.name,
        "variant": variant,
        "backend": backend,
        "start": start,
        "max_fit": None,
        "first_fail": None,
        "stopped": "not started",
        "note": "",
        "resolution": None,
        "at_max": None,
        "extrapolated_max": None,
        "warmup": None,
        "trials": [],
    }


def _one_search(
    args: argparse.Namespace,
    entry: dict[str, Any],
    device: Any,
    dtype: Any,
    deadline: float | None,
    capacity: float | None,
    say: Callable[[str], None],
    on_trial: Callable[[Trial], None],
) -> None:
    """Build the model, warm up, search; fills ``entry``."""
    cfg, variant = CONFIGS[entry["config"]], entry["variant"]
    say(f"{cfg.name} {variant}: building the model")
    model = build_model(cfg, device, dtype, seed=args.seed)
    if variant == "longflash":
        entry["backend"] = resolve_backend(cfg, device, dtype, args.backend)
    prober = Prober(
        model,
        make_attention(variant, args.backend),
        device,
        loss_chunk=args.loss_chunk,
        seed=args.seed,
    )
    # Compiles kernels and creates library handles outside the searched trials.
    say(f"{cfg.name} {variant}: warm-up at N={args.multiple:,}")
    warm = prober(args.multiple)
    entry["warmup"] = asdict(warm)
    if not warm.fits:
        entry["stopped"], entry["note"] = "error", f"warm-up failed: {warm.error}"
        return

    def probe(n: int) -> Trial:
        say(f"{cfg.name} {variant}: step at N={n:,}")
        return prober(n)

    search = find_max_length(
        probe,
        start=args.start[f"{cfg.name}:{variant}"],
        multiple=args.multiple,
        resolution=args.resolution,
        max_length=args.max_length,
        deadline=deadline,
        on_trial=on_trial,
    )
    _fill_entry(entry, search, capacity, variant)


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    if args.expandable:
        # Read when the CUDA allocator starts, so before anything touches the GPU.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    from longflash.bench.report import versions
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 132))  # logs keep the table readable
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = (
        torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)
    )
    if kind == "cpu" and args.max_length is None:
        raise SystemExit("on the CPU an out-of-memory ends the process: pass --max-length")
    dtype = getattr(torch, args.dtype)
    machine = _machine(device)
    capacity = machine["gpu"]["memory_gib"] if machine["gpu"] else None
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "statement": MEMORY_STATEMENT.format(dtype=args.dtype),
        "machine": machine,
        "versions": versions(),
        "config": config,
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") if kind == "cuda" else None,
        "capacity_gib": capacity,
        "model": {
            "architecture": "LLaMA: RMSNorm, rotary, SwiGLU MLP, causal self-attention",
            "lm_head": "untied",
            "loss": f"next-token cross-entropy in checkpointed chunks of {args.loss_chunk} "
            "tokens (fp32 logits of one chunk at a time)",
            "checkpointing": "per layer, torch.utils.checkpoint(use_reentrant=False)",
            "batch": 1,
            "dtype": args.dtype,
            "configs": {
                c: {**asdict(CONFIGS[c]), "params": CONFIGS[c].params()} for c in args.configs
            },
        },
        "searches": [],
        "summary": [],
        "wall_s": None,
    }
    rec = Recorder(args, doc)
    jobs = [(c, v) for c in args.configs for v in sorted(args.variants, key=VARIANTS.index)]
    budget = Budget(args.time_budget_s, jobs)
    console.print(
        f"torch {torch.__version__}, {device} "
        f"({machine['gpu']['name'] if machine['gpu'] else machine['cpu']}), {args.dtype}, "
        f"{len(jobs)} searches, time budget {args.time_budget_s or 'none'}"
    )
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )
    with progress:
        for i, (cname, variant) in enumerate(jobs):
            entry = _search_entry(CONFIGS[cname], variant, None, args.start[f"{cname}:{variant}"])
            doc["searches"].append(entry)
            task = progress.add_task(f"{cname} {variant}", total=None)
            share = budget.deadline(i)

            def say(text: str, task=task) -> None:
                progress.update(task, description=text)

            def on_trial(t: Trial, entry=entry, cname=cname, variant=variant) -> None:
                entry["trials"].append(asdict(t))
                rec.write()
                console.print(_trial_line(cname, variant, t))

            try:
                _one_search(args, entry, device, dtype, share, capacity, say, on_trial)
            except Exception as exc:  # a broken variant must not lose the others' results
                entry["stopped"], entry["note"] = "error", f"{type(exc).__name__}: {exc}"[:500]
            if entry["stopped"] == "error":
                console.print(f"[red]{cname} {variant}: {entry['note']}")
            # The model and everything the search allocated died with _one_search's frame.
            gc.collect()
            if kind == "cuda":
                torch.cuda.empty_cache()
            say(f"{cname} {variant}: {entry['stopped']}")
            progress.stop_task(task)
            doc["wall_s"] = time.monotonic() - t_start
            rec.write()
    doc["summary"] = summarize(doc)
    doc["wall_s"] = time.monotonic() - t_start
    rec.write()
    for path in rec.paths:
        console.print(f"wrote {path}")
    if args.plot:
        try:
            pngs = [plot(doc, p.with_suffix(".png")) for p in rec.paths]
        except ImportError as exc:
            console.print(f"no plot ({exc}); pip install matplotlib")
        else:
            for p in pngs:
                console.print(f"wrote {p}")
    console.print(table(doc))
    return doc


def _trial_line(cname: str, variant: str, t: Trial) -> str:
    peak = "" if t.peak_allocated_gib is None else f" peak {t.peak_allocated_gib:6.1f} GiB"
    if t.fits:
        what = f"[green]fits[/] step {t.step_s:7.2f} s loss {t.loss:.3f}"
    else:
        what = f"[red]{t.status}[/] after {t.elapsed_s:.1f} s"
    return f"  {cname:4s} {variant:9s} {t.phase:6s} N={t.n:>9,}: {what}{peak}"


def _fill_entry(entry: dict[str, Any], s: Search, capacity: float | None, variant: str) -> None:
    entry.update(
        max_fit=s.max_fit,
        first_fail=s.first_fail,
        stopped=s.stopped,
        note=s.note,
        resolution=s.resolution,
    )
    at = next((t for t in s.trials if t.fits and t.n == s.max_fit), None)
    if at is not None:
        entry["at_max"] = {
            "n": at.n,
            "peak_allocated_gib": at.peak_allocated_gib,
            "peak_reserved_gib": at.peak_reserved_gib,
            "step_s": at.step_s,
            "tokens_per_s": at.n / at.step_s if at.step_s else None,
        }
    if capacity is not None:
        entry["extrapolated_max"] = extrapolate_max(
            s.trials, capacity, 2 if variant == "naive" else 1
        )


def _as_search(entry: dict[str, Any]) -> Search:
    return Search(entry["max_fit"], entry["first_fail"], entry["stopped"], entry["note"], None)


def summarize(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per config: LongFlash's longest context over each plain baseline's."""
    out = []
    by = {(e["config"], e["variant"]): e for e in doc["searches"]}
    for cname in doc["config"]["configs"]:
        ours = by.get((cname, "longflash"))
        for base in ("naive", "sdpa"):
            ref = by.get((cname, base))
            if ours is None or ref is None:
                continue
            r = ratio_summary(_as_search(ref), _as_search(ours))
            out.append(
                {
                    "config": cname,
                    "baseline": base,
                    "longflash_max": ours["max_fit"],
                    "longflash_first_fail": ours["first_fail"],
                    "baseline_max": ref["max_fit"],
                    "baseline_first_fail": ref["first_fail"],
                    **r,
                }
            )
    return out


def _k(n: int | None) -> str:
    if n is None:
        return "-"
    if n and n % (1 << 20) == 0:
        return f"{n >> 20:,}M"
    return f"{n // 1024:,}K" if n and n % 1024 == 0 else f"{n:,}"


def table(doc: dict[str, Any]) -> Any:
    """Every search, then LongFlash's longest context over each baseline's, per config."""
    from rich.console import Group
    from rich.table import Table

    gpu = doc["machine"]["gpu"]
    where = f"{gpu['name']}, {gpu['memory_gib']:.1f} GiB" if gpu else doc["machine"]["cpu"]
    t = Table(title=f"Longest training step, batch 1, {doc['model']['dtype']} - {where}")
    cols = ("config", "variant", "max fits", "fails at", "stopped", "peak GiB", "step s", "tok/s")
    for col in cols:
        t.add_column(col, justify="left" if col in ("config", "variant", "stopped") else "right")
    for e in doc["searches"]:
        at = e["at_max"] or {}
        t.add_row(
            e["config"],
            e["variant"] + (f" ({e['backend']})" if e["backend"] else ""),
            _k(e["max_fit"]),
            _k(e["first_fail"]),
            e["stopped"],
            f"{at['peak_allocated_gib']:.1f}" if at.get("peak_allocated_gib") else "-",
            f"{at['step_s']:.2f}" if at.get("step_s") else "-",
            f"{at['tokens_per_s']:,.0f}" if at.get("tokens_per_s") else "-",
        )
    r = Table(title="LongFlash's longest context over the baseline's", caption=doc["statement"])
    for col in ("config", "baseline", "longflash", "baseline max", "ratio", "true ratio within"):
        r.add_column(col, justify="left" if col in ("config", "baseline") else "right")
    for s in doc["summary"]:
        lo = "?" if s["lower"] is None else f"{s['lower']:.1f}x"
        hi = "open" if s["upper"] is None else f"{s['upper']:.1f}x"
        r.add_row(
            s["config"],
            s["baseline"],
            _k(s["longflash_max"]),
            _k(s["baseline_max"]),
            "-" if s["ratio"] is None else f"{s['ratio']:.1f}x",
            f"[{lo}, {hi}]",
        )
    return Group(t, r)


# -- the plot ---------------------------------------------------------------------------------
def plot(doc: dict[str, Any], path: Path) -> Path:
    """Peak memory (top) and step time (bottom) against length, one column per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    configs = doc["config"]["configs"]
    fig, axes = plt.subplots(2, len(configs), figsize=(6 * len(configs), 8), squeeze=False)
    colors = {"naive": "tab:red", "sdpa": "tab:orange", "longflash": "tab:blue"}
    cap = doc.get("capacity_gib")
    for col, cname in enumerate(configs):
        mem, tim = axes[0][col], axes[1][col]
        for e in (e for e in doc["searches"] if e["config"] == cname):
            c = colors[e["variant"]]
            label = e["variant"] + (f" ({e['backend']})" if e["backend"] else "")
            fits = sorted((t for t in e["trials"] if t["fits"]), key=lambda t: t["n"])
            fails = [t for t in e["trials"] if not t["fits"]]
            if fits:
                xs = [t["n"] for t in fits]
                mem.plot(xs, [t["peak_allocated_gib"] for t in fits], "o-", color=c, label=label)
                tim.plot(xs, [t["step_s"] for t in fits], "o-", color=c, label=label)
            if fails:
                ys = [t["peak_allocated_gib"] or cap or 0 for t in fails]
                mem.plot(
                    [t["n"] for t in fails],
                    ys,
                    "x",
                    color=c,
                    ms=9,
                    label=f"{e['variant']}: out of memory",
                )
            if e["max_fit"]:
                for ax in (mem, tim):
                    ax.axvline(e["max_fit"], color=c, ls=":", lw=1)
                mem.annotate(
                    # A search stopped before its bracket closed proves only a lower bound.
                    f"max {_k(e['max_fit'])}"
                    if e.get("first_fail")
                    else f"≥ {_k(e['max_fit'])} ({e['stopped']})",
                    (e["max_fit"], (cap or 1) * 0.05),
                    color=c,
                    rotation=90,
                    ha="right",
                    fontsize=8,
                )
        if cap:
            mem.axhline(cap, color="k", ls="--", lw=1, label=f"GPU memory {cap:.0f} GiB")
            mem.set_ylim(0, cap * 1.08)
        for ax in (mem, tim):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _k(int(x))))
            ax.set_xlabel("sequence length (tokens)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        cfg = doc["model"]["configs"][cname]
        mem.set_title(
            f"{cname}: hidden {cfg['hidden']}, {cfg['heads']} heads, {cfg['layers']} layers, "
            f"{cfg['params'] / 1e9:.2f}B params",
            fontsize=9,
        )
        mem.set_ylabel("peak allocated (GiB), whole step")
        tim.set_ylabel("forward + backward (s)")
        tim.set_yscale("log")
    gpu = doc["machine"]["gpu"]
    where = gpu["name"] if gpu else doc["machine"]["cpu"]
    fig.suptitle(
        f"One training step, batch 1, {doc['model']['dtype']}, checkpointing per layer, "
        f"no optimizer state\n{where}, {doc['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def redo(path: Path, plot_it: bool = True) -> dict[str, Any]:
    """Summary, table and plot again from a run's JSON (e.g. one cut short by a time limit,
    which has every trial but not the final summary)."""
    from rich.console import Console

    doc = json.loads(path.read_text())
    for e in doc["searches"]:
        if e["stopped"] == "not started" and e["trials"]:  # the run ended inside this search
            trials = [Trial(**t) for t in e["trials"]]
            fit = max((t.n for t in trials if t.fits), default=None)
            fail = min((t.n for t in trials if not t.fits and t.n > (fit or 0)), default=None)
            s = Search(fit, fail, "cut short", "the run ended during this search", None, trials)
            _fill_entry(e, s, doc.get("capacity_gib"), e["variant"])
    doc["summary"] = summarize(doc)
    path.write_text(json.dumps(_finite(doc), indent=1, default=str) + "\n")
    console = Console(width=132)
    if plot_it:
        console.print(f"wrote {plot(doc, path.with_suffix('.png'))}")
    console.print(table(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        redo(args.from_json, args.plot)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
