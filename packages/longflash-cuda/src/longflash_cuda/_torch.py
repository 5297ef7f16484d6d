"""PyTorch binding: allocate outputs with torch, call the C API on the current stream.

No torch C++ extension: tensors go through data_ptr() and strides, the stream through
torch.cuda.current_stream().cuda_stream. The core front-end wraps these calls in
torch.library custom ops, so torch.compile and autograd never see inside; CUDA graphs
capture the launches (no host synchronisation, workspace from the caching allocator).
"""

from __future__ import annotations

import os

import torch
from longflash.call import AttentionCall

from longflash_cuda import _lib, make_params

_DETERMINISTIC = os.environ.get("LONGFLASH_DETERMINISTIC", "0") == "1"


def _usable(x: torch.Tensor) -> torch.Tensor:
    """x itself when the kernels can read it through TMA (unit stride along head_dim,
    16-byte aligned, other strides multiples of 8 elements), else a contiguous copy."""
    ok = x.stride(-1) == 1 and x.data_ptr() % 16 == 0
    if ok:
        for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
            if size > 1 and (stride % 8 != 0 or stride == 0):
                ok = False
                break
    return x if ok else x.contiguous()


def _tensor(x: torch.Tensor, varlen: bool) -> _lib.Tensor:
    if varlen:  # (T, H, D)
        return _lib.Tensor(x.data_ptr(), 0, x.stride(0), x.stride(1))
    return _lib.Tensor(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2))


def _cu(call: AttentionCall) -> tuple[int | None, int | None, list[torch.Tensor]]:
    if call.varlen is None:
        return None, None, []
    cu_q = call.varlen.cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = call.varlen.cu_seqlens_k.to(torch.int32).contiguous()
    return cu_q.data_ptr(), cu_k.data_ptr(), [cu_q, cu_k]


def _workspace(lib, query, params, device) -> tuple[torch.Tensor | None, int]:
    import ctypes

    n = ctypes.c_size_t(0)
    _lib.check(lib, query(ctypes.byref(params), ctypes.byref(n)))
    if n.value == 0:
        return None, 0
    return torch.empty(n.value, dtype=torch.uint8, device=device), n.value


def forward(call: AttentionCall, q, k, v):
    lib, why = _lib.load()
    if lib is None:
        raise RuntimeError(why)
    import ctypes

    varlen = call.varlen is not None
    q, k, v = _usable(q), _usable(k), _usable(v)
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    if varlen:
        lse = torch.empty((call.Hq, call.varlen.total_q), dtype=torch.float32, device=q.device)
    else:
        lse = torch.empty((call.B, call.Hq, call.Nq), dtype=torch.float32, device=q.device)
    cu_q, cu_k, keep = _cu(call)
    params = make_params(call, cu_q, cu_k)
    ws, ws_bytes = _workspace(lib, lib.lf_attention_forward_workspace_size, params, q.device)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        status = lib.lf_attention_forward(
            ctypes.byref(params),
            _tensor(q, varlen),
            _tensor(k, varlen),
            _tensor(v, varlen),
            _tensor(out, varlen),
            lse.data_ptr() if lse.numel() else None,
            ws.data_ptr() if ws is not None else None,
            ws_bytes,
            stream,
        )
    del keep
    _lib.check(lib, status)
    return out, lse


def backward(call: AttentionCall, dout, q, k, v, out, lse, deterministic: bool | None = None):
    lib, why = _lib.load()
    if lib is None:
        raise RuntimeError(why)
    import ctypes

    varlen = call.varlen is not None
    q, k, v, out, dout = (_usable(x) for x in (q, k, v, out, dout))
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    cu_q, cu_k, keep = _cu(call)
    det = _DETERMINISTIC if deterministic is None else deterministic
    params = make_params(call, cu_q, cu_k, deterministic=det)
    ws, ws_bytes = _workspace(lib, lib.lf_attention_backward_workspace_size, params, q.device)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        status = lib.lf_attention_backward(
            ctypes.byref(params),
            _tensor(q, varlen),
            _tensor(k, varlen),
            _tensor(v, varlen),
            _tensor(out, varlen),
            _tensor(dout, varlen),
            lse.data_ptr() if lse.numel() else None,
            _tensor(dq, varlen),
            _tensor(dk, varlen),
            _tensor(dv, varlen),
            ws.data_ptr() if ws is not None else None,
            ws_bytes,
            stream,
        )
    del keep
    _lib.check(lib, status)
    return dq, dk, dv
