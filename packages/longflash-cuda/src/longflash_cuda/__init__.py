"""LongFlash backend "cuda": Hopper (sm_90a) kernels behind a framework-free C API.

Importing this module never fails and imports no framework: the library is loaded (with
ctypes) on the first `available()`/`check()`, and torch or jax only when a call of that
framework arrives.
"""

from __future__ import annotations

from typing import Any

from longflash.call import AttentionCall

from longflash_cuda import _lib

__version__ = "0.1.0"

# Capability data: what the kernels are written for. What this build compiled is read from the
# library (lf_has_kernel), so a reduced build (e.g. LONGFLASH_HEAD_DIMS=128) declines the rest.
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = frozenset({(64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)})
MAX_GRID_YZ = 65535  # heads and batch index CUDA grid axes y/z


class CudaBackend:
    name = "cuda"
    frameworks = frozenset({"torch", "jax"})
    devices = frozenset({"cuda"})
    priority = 100

    def __init__(self) -> None:
        self._compiled: dict[str, frozenset[tuple[int, int]]] | None = None
        self._ffi: bool | None = None
        self._device_ok: tuple[bool, str] | None = None

    # -- capability ---------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        lib, why = _lib.load()
        if lib is None:
            return False, why
        if self._device_ok is None:
            status = lib.lf_check_device(0)
            if status == _lib.LF_SUCCESS:
                self._device_ok = (True, "")
            else:
                self._device_ok = (False, lib.lf_last_error().decode(errors="replace"))
        return self._device_ok

    def _capabilities(self) -> tuple[dict[str, frozenset[tuple[int, int]]], bool] | None:
        if self._compiled is None:
            lib, _ = _lib.load()
            if lib is None:
                return None
            self._compiled = _lib.compiled_head_dims(lib)
            self._ffi = _lib.has_xla_ffi(lib)
        return self._compiled, bool(self._ffi)

    def check(self, call: AttentionCall) -> list[str]:
        caps = self._capabilities()
        if caps is None:
            return [_lib.load()[1]]
        compiled, ffi = caps
        reasons = []
        if call.device != "cuda":
            reasons.append(f"device {call.device!r} is not a CUDA GPU")
        if call.dtype not in DTYPES:
            reasons.append(f"dtype {call.dtype} not supported (float16, bfloat16)")
        dims = (call.Dqk, call.Dv)
        if dims not in HEAD_DIMS:
            reasons.append(
                f"head_dim (qk {call.Dqk}, v {call.Dv}) not supported: 64, 96, 128, 192, 256 "
                "with qk == v, or qk 192 with v 128"
            )
        elif call.dtype in DTYPES and dims not in compiled[call.dtype]:
            reasons.append(
                f"head_dim (qk {call.Dqk}, v {call.Dv}) {call.dtype} not compiled in this build "
                "(LONGFLASH_HEAD_DIMS / LONGFLASH_DTYPES)"
            )
        if not call.scale > 0:
            reasons.append(f"scale {call.scale} <= 0 not supported")
        if call.Hq > MAX_GRID_YZ or call.B > MAX_GRID_YZ:
            reasons.append(f"heads ({call.Hq}) and batch ({call.B}) must be <= {MAX_GRID_YZ}")
        if call.framework == "jax" and not ffi:
            reasons.append(
                "library built without XLA FFI handlers (jax was not importable at build "
                "time); rebuild with LONGFLASH_JAX_FFI=ON"
            )
        return reasons

    # -- kernels ------------------------------------------------------------------------
    def forward(self, call: AttentionCall, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
        if call.framework == "torch":
            from longflash_cuda import _torch

            return _torch.forward(call, q, k, v)
        from longflash_cuda import _jax

        return _jax.forward(call, q, k, v)

    def backward(
        self, call: AttentionCall, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
    ) -> tuple[Any, Any, Any]:
        if call.framework == "torch":
            from longflash_cuda import _torch

            return _torch.backward(call, dout, q, k, v, out, lse)
        from longflash_cuda import _jax

        return _jax.backward(call, dout, q, k, v, out, lse)


backend = CudaBackend()


def make_params(
    call: AttentionCall,
    cu_q: int | None = None,
    cu_k: int | None = None,
    deterministic: bool = False,
) -> _lib.Params:
    """The C API's parameter struct for a call (cu_q/cu_k: device pointers for varlen)."""
    left = -1 if call.window_left is None else int(call.window_left)
    right = -1 if call.window_right is None else int(call.window_right)
    varlen = call.varlen
    return _lib.Params(
        dtype=_lib.LF_BFLOAT16 if call.dtype == "bfloat16" else _lib.LF_FLOAT16,
        batch=call.B,
        seqlen_q=call.Nq,
        seqlen_k=call.Nk,
        heads_q=call.Hq,
        heads_k=call.Hk,
        head_dim_qk=call.Dqk,
        head_dim_v=call.Dv,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        total_q=varlen.total_q if varlen is not None else 0,
        total_k=varlen.total_k if varlen is not None else 0,
        scale=float(call.scale),
        softcap=float(call.softcap or 0.0),
        window_left=left,
        window_right=right,
        deterministic=int(deterministic),
    )


__all__ = ["CudaBackend", "backend", "make_params"]
