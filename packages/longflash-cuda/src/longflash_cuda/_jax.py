"""JAX binding: XLA FFI handlers exported by the same library, called with jax.ffi.ffi_call.

The handlers are registered once from the library's function pointers. The workspace is an
extra uint8 result whose size the C API computes from the (static) call, so XLA owns it.
Under vmap the call is mapped sequentially (the kernels take one batch axis of their own).
"""

from __future__ import annotations

import ctypes
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from longflash.call import AttentionCall

from longflash_cuda import _lib, make_params

FWD_TARGET = "longflash_fwd"
BWD_TARGET = "longflash_bwd"
_DETERMINISTIC = os.environ.get("LONGFLASH_DETERMINISTIC", "0") == "1"
_registered = False
_lock = threading.Lock()


def _lib_or_raise():
    lib, why = _lib.load()
    if lib is None:
        raise RuntimeError(why)
    if not _lib.has_xla_ffi(lib):
        raise RuntimeError("longflash_cuda library was built without XLA FFI handlers")
    return lib


def _register() -> None:
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        lib = _lib_or_raise()
        for name, sym in ((FWD_TARGET, "longflash_xla_fwd"), (BWD_TARGET, "longflash_xla_bwd")):
            fn = ctypes.cast(getattr(lib, sym), ctypes.c_void_p).value
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="CUDA")
        _registered = True


# Stands in for the cu_seqlens device arrays when the parameters are built at trace time (they do
# not exist yet). lf_check_params and the workspace size queries read only whether the pointers
# are set (varlen) and their 4-byte alignment, never what they point to; the FFI handler passes
# the real arrays to the kernels.
_TRACE_CU_SEQLENS = 1 << 40


def size_params(call: AttentionCall, deterministic: bool = False):
    """The C API's parameters for checking a call and sizing its workspace at trace time: the
    handler's, except the cu_seqlens pointers. A varlen call must be sized as varlen: v7's dQ
    accumulator takes floor(total_q / tile) + B tiles there, more than the dense shape's
    B * ceil(max_seqlen_q / tile) when sequences fill whole tiles."""
    cu = None if call.varlen is None else _TRACE_CU_SEQLENS
    return make_params(call, cu_q=cu, cu_k=cu, deterministic=deterministic)


def _workspace_bytes(query, params) -> int:
    lib = _lib_or_raise()
    n = ctypes.c_size_t(0)
    _lib.check(lib, query(ctypes.byref(params), ctypes.byref(n)))
    return int(n.value)


def _attrs(call: AttentionCall) -> dict:
    left = -1 if call.window_left is None else int(call.window_left)
    right = -1 if call.window_right is None else int(call.window_right)
    return dict(
        varlen=np.int64(call.varlen is not None),
        batch=np.int64(call.B),
        max_seqlen_q=np.int64(call.Nq),
        max_seqlen_k=np.int64(call.Nk),
        scale=np.float32(call.scale),
        softcap=np.float32(call.softcap or 0.0),
        window_left=np.int64(left),
        window_right=np.int64(right),
    )


def _cu(call: AttentionCall):
    if call.varlen is None:
        dummy = jnp.zeros((1,), jnp.int32)
        return dummy, dummy
    return (call.varlen.cu_seqlens_q.astype(jnp.int32), call.varlen.cu_seqlens_k.astype(jnp.int32))


def forward(call: AttentionCall, q, k, v):
    _register()
    lib = _lib_or_raise()
    params = size_params(call)
    _lib.check(lib, lib.lf_check_params(ctypes.byref(params)))
    ws = _workspace_bytes(lib.lf_attention_forward_workspace_size, params)
    if call.varlen is None:
        lse_shape = (call.B, call.Hq, call.Nq)
    else:
        lse_shape = (call.Hq, call.varlen.total_q)
    out_types = (
        jax.ShapeDtypeStruct((*q.shape[:-1], v.shape[-1]), q.dtype),
        jax.ShapeDtypeStruct(lse_shape, jnp.float32),
        jax.ShapeDtypeStruct((max(ws, 1),), jnp.uint8),
    )
    cu_q, cu_k = _cu(call)
    out, lse, _ = jax.ffi.ffi_call(FWD_TARGET, out_types, vmap_method="sequential")(
        q, k, v, cu_q, cu_k, **_attrs(call)
    )
    return out, lse


def backward(call: AttentionCall, dout, q, k, v, out, lse):
    _register()
    lib = _lib_or_raise()
    params = size_params(call, deterministic=_DETERMINISTIC)
    _lib.check(lib, lib.lf_check_params(ctypes.byref(params)))
    ws = _workspace_bytes(lib.lf_attention_backward_workspace_size, params)
    out_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        jax.ShapeDtypeStruct((max(ws, 1),), jnp.uint8),
    )
    cu_q, cu_k = _cu(call)
    dq, dk, dv, _ = jax.ffi.ffi_call(BWD_TARGET, out_types, vmap_method="sequential")(
        q, k, v, out, dout, lse, cu_q, cu_k, deterministic=np.int64(_DETERMINISTIC), **_attrs(call)
    )
    return dq, dk, dv
