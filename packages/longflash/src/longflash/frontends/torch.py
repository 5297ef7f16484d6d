"""PyTorch front-end: validation, the custom ops and their autograd.

The forward and backward are `torch.library` custom ops, so torch.compile traces them as
single nodes (fullgraph=True works) and CUDA graphs capture whatever the backend launches.
Backend selection happens inside the op, at run time, from the name given at trace time.
An eager call that needs no autograd graph (inference, and the backward itself) calls the
op's implementation directly: the same function, without the dispatcher's cost (_plain_eager).
"""

from __future__ import annotations

from typing import Any

import torch

from longflash import validate
from longflash.call import AttentionCall, Varlen
from longflash.registry import REGISTRY, get_backend

_DTYPES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
}


def _info(name: str, x: Any) -> validate.ArrayInfo:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return validate.ArrayInfo(
        tuple(x.shape), _DTYPES.get(x.dtype, str(x.dtype).removeprefix("torch.")), x.device.type
    )


def make_call(
    q,
    k,
    v,
    *,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    causal=False,
    scale=None,
    window=None,
    softcap=None,
) -> AttentionCall:
    """Validate shapes/dtypes/arguments and build the AttentionCall (no value reads)."""
    qi, ki, vi = _info("q", q), _info("k", k), _info("v", v)
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return validate.make_call(
            "torch", qi, ki, vi, causal=causal, scale=scale, window=window, softcap=softcap
        )
    cqi, cki = _info("cu_seqlens_q", cu_seqlens_q), _info("cu_seqlens_k", cu_seqlens_k)
    for name, info in (("cu_seqlens_q", cqi), ("cu_seqlens_k", cki)):
        if info.device != qi.device:
            raise ValueError(f"{name} must be on q's device {qi.device}, got {info.device}")
    return validate.make_varlen_call(
        "torch",
        qi,
        ki,
        vi,
        cqi,
        cki,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
    )


@torch.compiler.assume_constant_result
def _current_backend() -> str:
    # Read at trace time under torch.compile: the choice in force when the graph is
    # compiled is baked into it (as for any Python-side configuration).
    return get_backend()


# -- the ops' arguments: AttentionCall flattened into schema-friendly scalars ----------
def _flat(call: AttentionCall) -> tuple[bool, float, int, int, float]:
    left = -1 if call.window_left is None else call.window_left
    right = -1 if call.window_right is None else call.window_right
    return call.causal, call.scale, left, right, call.softcap or 0.0


def _rebuild(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right, softcap):
    """The AttentionCall inside the op, from tensors and the flattened scalars."""
    window = None
    if not (left == -1 and right == -1 and not causal):
        window = (None if left == -1 else left, None if right == -1 else right)
    if cu_q is None:
        b, nq, hq, dqk = q.shape
        nk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
        varlen = None
    else:
        hq, dqk = q.shape[1], q.shape[2]
        hk, dv = k.shape[1], v.shape[2]
        b = cu_q.shape[0] - 1
        if max_q < 0 or max_k < 0:
            lens_q = (cu_q[1:] - cu_q[:-1]).max().item() if b else 0
            lens_k = (cu_k[1:] - cu_k[:-1]).max().item() if b else 0
            max_q = int(lens_q) if max_q < 0 else max_q
            max_k = int(lens_k) if max_k < 0 else max_k
        nq, nk = max_q, max_k
        varlen = Varlen(cu_q, cu_k, q.shape[0], k.shape[0])
    return AttentionCall(
        framework="torch",
        device=q.device.type,
        dtype=_DTYPES[q.dtype],
        B=b,
        Nq=nq,
        Nk=nk,
        Hq=hq,
        Hk=hk,
        Dqk=dqk,
        Dv=dv,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap if softcap > 0 else None,
        varlen=varlen,
    )


def _check_values(cu_q, cu_k, q, k) -> None:
    # Value checks need a device-to-host read; skipped while a CUDA graph is captured.
    if cu_q is None or (cu_q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    validate.check_cu_seqlens("cu_seqlens_q", cu_q.tolist(), q.shape[0])
    validate.check_cu_seqlens("cu_seqlens_k", cu_k.tolist(), k.shape[0])


def _out_shapes(q, v, cu_q):
    if cu_q is None:
        b, nq, hq, _ = q.shape
        return (b, nq, hq, v.shape[-1]), (b, hq, nq)
    t, hq, _ = q.shape
    return (t, hq, v.shape[-1]), (hq, t)


def _attention_fwd_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_values(cu_seqlens_q, cu_seqlens_k, q, k)
    call = _rebuild(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        window_left,
        window_right,
        softcap,
    )
    impl = REGISTRY.select(call, backend)
    out, lse = impl.forward(call, q, k, v)
    return out, lse


attention_fwd = torch.library.custom_op("longflash::attention_fwd", mutates_args=())(
    _attention_fwd_impl
)


@attention_fwd.register_fake
def _(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    window_left,
    window_right,
    softcap,
    backend,
):
    out_shape, lse_shape = _out_shapes(q, v, cu_seqlens_q)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=torch.float32)


def _attention_bwd_impl(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    call = _rebuild(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        window_left,
        window_right,
        softcap,
    )
    impl = REGISTRY.select(call, backend)
    dq, dk, dv = impl.backward(call, dout, q, k, v, out, lse)
    return dq, dk, dv


attention_bwd = torch.library.custom_op("longflash::attention_bwd", mutates_args=())(
    _attention_bwd_impl
)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = params
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dout = _lastdim_contiguous(dout.to(out.dtype))
    bwd = _attention_bwd_impl if _plain_eager(dout, q, k, v, out, lse) else attention_bwd
    dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.params)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.params))


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _plain_eager(*tensors: torch.Tensor | None) -> bool:
    """True where calling an op's implementation directly is the op minus its dispatch, which
    was half the front-end's time per call (benchmarks/NOTES-cuda.md, session 14): eager mode,
    no autograd graph to record, plain tensors, no dispatch or function mode, no functorch
    transform. torch.compile, FakeTensor tracing, vmap, grad and tensor subclasses take the op."""
    if torch.compiler.is_compiling():  # first: under dynamo nothing below is traced
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return not (
        torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Backends may assume unit stride along head_dim; other strides are theirs to use.
    return x if x.stride(-1) == 1 else x.contiguous()


def _run(call: AttentionCall, q, k, v, cu_q, cu_k, max_q, max_k, return_lse, backend):
    name = backend if backend is not None else _current_backend()
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    causal, scale, left, right, softcap = _flat(call)
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    fwd = _attention_fwd_impl if _plain_eager(q, k, v, cu_q, cu_k) else attention_fwd
    out, lse = fwd(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        causal,
        scale,
        left,
        right,
        softcap,
        name,
    )
    return (out, lse) if return_lse else out


def attention(q, k, v, *, causal, scale, window, softcap, return_lse, backend):
    call = make_call(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap)
    return _run(call, q, k, v, None, None, -1, -1, return_lse, backend)


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    *,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    window,
    softcap,
    return_lse,
    backend,
):
    call = make_call(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        causal=causal,
        scale=scale,
        window=window,
        softcap=softcap,
    )
    max_q = -1 if max_seqlen_q is None else max_seqlen_q
    max_k = -1 if max_seqlen_k is None else max_seqlen_k
    return _run(call, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, return_lse, backend)
