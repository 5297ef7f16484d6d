"""ctypes view of the C API in cuda/include/longflash/longflash.h.

The shared library is framework-free, so one build serves every torch/jax/Python version.
It is looked up in $LONGFLASH_CUDA_LIB first, then next to this file (where the wheel
installs it). Loading never raises: failures become a reason string.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

LIB_NAME = "liblongflash_cuda.so"
API_VERSION = 3

LF_SUCCESS = 0
STATUS_NAMES = {
    0: "LF_SUCCESS",
    1: "LF_ERROR_INVALID_ARGUMENT",
    2: "LF_ERROR_UNSUPPORTED",
    3: "LF_ERROR_WORKSPACE",
    4: "LF_ERROR_NO_DEVICE",
    5: "LF_ERROR_ARCH",
    6: "LF_ERROR_CUDA",
}
LF_FLOAT16 = 0
LF_BFLOAT16 = 1


class Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("batch_stride", ctypes.c_int64),
        ("seq_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
    ]


class Params(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("dtype", ctypes.c_int),
        ("batch", ctypes.c_int32),
        ("seqlen_q", ctypes.c_int32),
        ("seqlen_k", ctypes.c_int32),
        ("heads_q", ctypes.c_int32),
        ("heads_k", ctypes.c_int32),
        ("head_dim_qk", ctypes.c_int32),
        ("head_dim_v", ctypes.c_int32),
        ("cu_seqlens_q", ctypes.c_void_p),
        ("cu_seqlens_k", ctypes.c_void_p),
        ("total_q", ctypes.c_int32),
        ("total_k", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("window_left", ctypes.c_int32),
        ("window_right", ctypes.c_int32),
        ("deterministic", ctypes.c_int32),
    ]

    def __init__(self, **kw):
        super().__init__(struct_size=ctypes.sizeof(Params), **kw)


class CudaLibError(RuntimeError):
    """A failing C API call: `status` is the LF_* name, the message says why."""

    def __init__(self, status: int, message: str):
        self.status = STATUS_NAMES.get(status, f"LF_ERROR_{status}")
        super().__init__(f"{self.status}: {message}")


def _declare(lib: ctypes.CDLL) -> None:
    T, P = Tensor, ctypes.POINTER(Params)
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    sigs = {
        "lf_status_name": (ctypes.c_char_p, [ctypes.c_int]),
        "lf_last_error": (ctypes.c_char_p, []),
        "lf_api_version": (ctypes.c_int, []),
        "lf_build_config": (ctypes.c_char_p, []),
        "lf_has_kernel": (ctypes.c_int, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
        "lf_check_device": (ctypes.c_int, [ctypes.c_int]),
        "lf_check_params": (ctypes.c_int, [P]),
        "lf_forward_plan": (ctypes.c_char_p, [P]),
        "lf_backward_head_group": (ctypes.c_int, [P]),
        "lf_attention_forward_workspace_size": (ctypes.c_int, [P, ctypes.POINTER(sz)]),
        "lf_attention_backward_workspace_size": (ctypes.c_int, [P, ctypes.POINTER(sz)]),
        "lf_attention_forward": (ctypes.c_int, [P, T, T, T, T, vp, vp, sz, vp]),
        "lf_attention_backward": (
            ctypes.c_int,
            [P, T, T, T, T, T, vp, T, T, T, vp, sz, vp],
        ),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def candidates() -> list[Path]:
    env = os.environ.get("LONGFLASH_CUDA_LIB")
    paths = [Path(env)] if env else []
    paths.append(Path(__file__).resolve().parent / LIB_NAME)
    return paths


_lock = threading.Lock()
_state: tuple[ctypes.CDLL | None, str] | None = None


def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why it could not be loaded). Cached."""
    global _state
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        tried = []
        result: tuple[ctypes.CDLL | None, str] | None = None
        for path in candidates():
            if not path.is_file():
                tried.append(f"{path} (missing)")
                continue
            try:
                lib = ctypes.CDLL(str(path))
                lib.lf_api_version.restype = ctypes.c_int
                version = lib.lf_api_version()
                if version != API_VERSION:
                    tried.append(
                        f"{path} (C API version {version}, this package needs {API_VERSION})"
                    )
                    continue
                _declare(lib)
            except (OSError, AttributeError) as exc:
                tried.append(f"{path} ({exc})")
                continue
            result = (lib, "")
            break
        if result is None:
            result = (
                None,
                "the CUDA library was not built or not found (tried "
                + "; ".join(tried)
                + "); reinstall longflash-cuda with nvcc on PATH or set LONGFLASH_CUDA_LIB",
            )
        _state = result
        return result


def error(lib: ctypes.CDLL, status: int) -> CudaLibError:
    return CudaLibError(status, lib.lf_last_error().decode(errors="replace"))


def check(lib: ctypes.CDLL, status: int) -> None:
    if status != LF_SUCCESS:
        raise error(lib, status)


def compiled_head_dims(lib: ctypes.CDLL) -> dict[str, frozenset[tuple[int, int]]]:
    """Compiled (Dqk, Dv) pairs per dtype name, read once from the library."""
    pairs = [(64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)]
    out = {}
    for name, code in (("float16", LF_FLOAT16), ("bfloat16", LF_BFLOAT16)):
        out[name] = frozenset(p for p in pairs if lib.lf_has_kernel(p[0], p[1], code))
    return out


def has_xla_ffi(lib: ctypes.CDLL) -> bool:
    return hasattr(lib, "longflash_xla_fwd") and hasattr(lib, "longflash_xla_bwd")
