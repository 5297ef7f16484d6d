"""Input validation shared by every front-end.

Each check names the argument and the expected form, and runs before any kernel. The
front-ends describe their arrays as (shape, dtype name, device) so that this module never
imports a framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from longflash.call import AttentionCall, Varlen, Window, normalize_window

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: str
    device: str


def _check_float(name: str, info: ArrayInfo) -> None:
    if info.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {info.dtype}; expected a floating dtype "
            f"(float16, bfloat16, or float32/float64 where the backend allows)"
        )


def _check_scalar(name: str, value: Any, positive: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_window(window: Any) -> Window | None:
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be a pair (left, right) of ints or None, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            out.append(None)
            continue
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window {side} must be an int >= 0 or None, got {w!r}")
        if w < 0:
            raise ValueError(f"window {side} must be >= 0 (None means unbounded), got {w}")
        out.append(w)
    return (out[0], out[1])


def _common(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, seq_axes: int) -> None:
    for name, info in (("q", q), ("k", k), ("v", v)):
        _check_float(name, info)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}"
        )
    hq, dqk = q.shape[seq_axes], q.shape[seq_axes + 1]
    hk, dk = k.shape[seq_axes], k.shape[seq_axes + 1]
    hv = v.shape[seq_axes]
    if dk != dqk:
        raise ValueError(f"k head_dim {dk} must equal q head_dim {dqk}")
    if hv != hk:
        raise ValueError(f"v has {hv} heads but k has {hk}; k and v must have the same heads")
    if k.shape[seq_axes - 1] != v.shape[seq_axes - 1]:
        raise ValueError(
            f"k and v must have the same sequence length, got k {k.shape} and v {v.shape}"
        )
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hk}) for MQA/GQA")
    if dqk == 0 or v.shape[seq_axes + 1] == 0:
        raise ValueError("head_dim must be > 0")


def make_call(
    framework: str,
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    *,
    causal: bool,
    scale: Any,
    window: Any,
    softcap: Any,
) -> AttentionCall:
    """Validate a batched call (q: (B, Nq, Hq, Dqk)) and build its AttentionCall."""
    for name, info in (("q", q), ("k", k), ("v", v)):
        if len(info.shape) != 4:
            raise ValueError(
                f"{name} must have rank 4, (batch, seqlen, heads, head_dim); got shape "
                f"{info.shape}. Packed sequences go to attention_varlen."
            )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"q, k and v must have the same batch size, got {q.shape[0]}, {k.shape[0]}, "
            f"{v.shape[0]}"
        )
    _common(q, k, v, seq_axes=2)
    return _build(
        framework,
        q,
        k,
        v,
        q.shape[0],
        q.shape[1],
        k.shape[1],
        2,
        causal,
        scale,
        window,
        softcap,
        None,
    )


def make_varlen_call(
    framework: str,
    q: ArrayInfo,
    k: ArrayInfo,
    v: ArrayInfo,
    cu_q: ArrayInfo,
    cu_k: ArrayInfo,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    max_seqlen_q: Any,
    max_seqlen_k: Any,
    causal: bool,
    scale: Any,
    window: Any,
    softcap: Any,
) -> AttentionCall:
    """Validate a packed call (q: (Tq, Hq, Dqk), cu_seqlens int32 (B+1,))."""
    for name, info in (("q", q), ("k", k), ("v", v)):
        if len(info.shape) != 3:
            raise ValueError(
                f"{name} must have rank 3, (total_tokens, heads, head_dim), in "
                f"attention_varlen; got shape {info.shape}"
            )
    _common(q, k, v, seq_axes=1)
    for name, info in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if info.dtype != "int32":
            raise TypeError(f"{name} must be int32, got {info.dtype}")
        if len(info.shape) != 1 or info.shape[0] < 2:
            raise ValueError(
                f"{name} must be a 1-D array of length batch+1 >= 2, got shape {info.shape}"
            )
    if cu_q.shape != cu_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch+1), got "
            f"{cu_q.shape[0]} and {cu_k.shape[0]}"
        )
    batch = cu_q.shape[0] - 1
    msq = _check_maxlen("max_seqlen_q", max_seqlen_q, q.shape[0])
    msk = _check_maxlen("max_seqlen_k", max_seqlen_k, k.shape[0])
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    return _build(framework, q, k, v, batch, msq, msk, 1, causal, scale, window, softcap, varlen)


def _check_maxlen(name: str, value: Any, total: int) -> int:
    if value is None:
        return total
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_cu_seqlens(name: str, values: Any, total: int) -> None:
    """Value checks on concrete cu_seqlens (a sequence of ints): start at 0, never
    decrease, end at the packed length. Front-ends call this where values are known."""
    vals = [int(x) for x in values]
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    for i in range(1, len(vals)):
        if vals[i] < vals[i - 1]:
            raise ValueError(
                f"{name} must be non-decreasing (prefix sums of lengths), but "
                f"{name}[{i}] = {vals[i]} < {name}[{i - 1}] = {vals[i - 1]}"
            )
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] = {vals[-1]} must equal the packed length {total}")


def _build(
    framework, q, k, v, batch, nq, nk, seq_axes, causal, scale, window, softcap, varlen
) -> AttentionCall:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    dqk = q.shape[seq_axes + 1]
    scale_f = _check_scalar("scale", scale, positive=False)
    if scale_f is None:
        scale_f = 1.0 / math.sqrt(dqk)
    softcap_f = _check_scalar("softcap", softcap, positive=True)
    return AttentionCall(
        framework=framework,
        device=q.device,
        dtype=q.dtype,
        B=batch,
        Nq=nq,
        Nk=nk,
        Hq=q.shape[seq_axes],
        Hk=k.shape[seq_axes],
        Dqk=dqk,
        Dv=v.shape[seq_axes + 1],
        causal=causal,
        scale=scale_f,
        window=normalize_window(causal, _check_window(window)),
        softcap=softcap_f,
        varlen=varlen,
    )
