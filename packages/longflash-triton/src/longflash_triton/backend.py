"""The ``triton`` backend object: what it supports (as data) and the entry points.

Nothing here imports torch or triton at module import: ``available()`` looks for them when
asked and ``forward``/``backward`` import the kernels on first use.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from longflash.call import AttentionCall


@dataclass(frozen=True)
class Capabilities:
    """Everything check() decides on; docs and tests read the same table."""

    frameworks: frozenset[str] = frozenset({"torch"})
    devices: frozenset[str] = frozenset({"cuda"})  # ROCm tensors also report "cuda"
    # Under TRITON_INTERPRET=1 the kernels run in Python on CPU tensors (tests, CI).
    interpret_devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    # float32 only where it is cheap: in the interpreter. On a GPU its IEEE products run on
    # the FMA units and spill at every tile we tried (offline compile for sm90), so the
    # backend declines and the user picks bf16/fp16 or another backend.
    interpret_dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")
    head_dim_min: int = 1
    # 256 fits the tile budget on every GPU we tune for; larger would need split-D tiles.
    head_dim_max: int = 256
    features: frozenset[str] = field(
        default_factory=lambda: frozenset(
            {"causal", "window", "softcap", "gqa", "varlen", "lse", "dqk_ne_dv", "scale"}
        )
    )


CAPABILITIES = Capabilities()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend:
    name = "triton"
    frameworks = CAPABILITIES.frameworks
    devices = CAPABILITIES.devices
    priority = 50

    def __init__(self, caps: Capabilities = CAPABILITIES) -> None:
        self.caps = caps

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed: pip install 'triton>=3.2'"
        try:
            import triton  # noqa: F401
        except Exception as exc:  # a broken install must not break longflash
            return False, f"triton is not importable: {exc!r}"
        if _interpreting():
            return True, ""
        try:
            import torch
        except Exception as exc:
            return False, f"torch is not importable: {exc!r}"
        if not torch.cuda.is_available():
            return False, "no CUDA/ROCm device (set TRITON_INTERPRET=1 to run on the CPU)"
        return True, ""

    def check(self, call: AttentionCall) -> list[str]:
        caps = self.caps
        reasons = []
        if call.framework not in caps.frameworks:
            reasons.append(f"{call.framework} front-end not supported (torch only)")
        devices = caps.interpret_devices if _interpreting() else caps.devices
        if call.device not in devices:
            hint = "" if _interpreting() else " (CPU tensors need TRITON_INTERPRET=1)"
            reasons.append(f"device {call.device} not supported{hint}")
        dtypes = caps.interpret_dtypes if _interpreting() else caps.dtypes
        if call.dtype not in dtypes:
            hint = " (float32 only under TRITON_INTERPRET=1)" if call.dtype == "float32" else ""
            reasons.append(f"dtype {call.dtype} not supported ({', '.join(dtypes)}){hint}")
        for what, d in (("head_dim", call.Dqk), ("head_dim_v", call.Dv)):
            if d > caps.head_dim_max:
                reasons.append(f"{what} {d} > {caps.head_dim_max}")
            elif d < caps.head_dim_min:
                reasons.append(f"{what} {d} < {caps.head_dim_min}")
        wanted = {
            "causal": call.causal,
            "window": call.window is not None and not (call.causal and call.window_left is None),
            "softcap": call.softcap is not None,
            "gqa": call.Hq != call.Hk,
            "varlen": call.varlen is not None,
            "dqk_ne_dv": call.Dqk != call.Dv,
        }
        reasons += [
            f"{f} not supported" for f, on in wanted.items() if on and f not in caps.features
        ]
        return reasons

    def forward(self, call: AttentionCall, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
        from longflash_triton import launch

        return launch.forward(call, q, k, v)

    def backward(
        self, call: AttentionCall, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
    ) -> tuple[Any, Any, Any]:
        from longflash_triton import launch

        return launch.backward(call, dout, q, k, v, out, lse)
