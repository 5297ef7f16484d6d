"""The "pallas" Backend object: what it supports (as data), and the dispatch to the kernels.

Everything here is cheap: ``check()`` runs on every attention call, and nothing in this
module imports jax. The kernels (``longflash_jax.kernels``) load on the first forward.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from longflash.call import AttentionCall

from longflash_jax import mosaic_route
from longflash_jax.problem import problem_of

# The CPU runs the kernels only through the Pallas interpreter, which is orders of magnitude
# slower than the reference backend. It is opt-in so that "auto" on a CPU keeps picking
# the reference; CI sets it to run the conformance suite on the kernels themselves.
INTERPRET_ENV = "LONGFLASH_PALLAS_INTERPRET"

# The oldest jax these kernels are tested with. Pallas changes often; older releases spell
# the Triton API differently (pl.load(ref, idx), TritonCompilerParams), so they are refused
# here with a reason instead of failing inside a trace.
MIN_JAX = (0, 10, 0)


@dataclass(frozen=True)
class Capabilities:
    """What the backend runs. check() is derived from this and nothing else."""

    dtypes: frozenset[str] = frozenset({"float16", "bfloat16"})
    # Head dims are padded to a power of two >= 16 inside the kernel (Triton tiles are
    # powers of two); 256 is the largest whose tiles fit in shared memory.
    max_head_dim: int = 256
    devices: frozenset[str] = frozenset({"cuda"})
    # Devices that run the kernels in the Pallas interpreter when INTERPRET_ENV=1.
    interpret_devices: frozenset[str] = frozenset({"cpu"})
    features: tuple[str, ...] = field(
        default=(
            "causal (bottom-right aligned, Nq != Nk)",
            "sliding window (left, right)",
            "softcap",
            "GQA/MQA",
            "Dqk != Dv",
            "varlen (packed sequences)",
            "lse",
        )
    )


CAPABILITIES = Capabilities()


def _interpret_enabled() -> bool:
    return os.environ.get(INTERPRET_ENV, "") not in ("", "0", "false", "False")


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        m = re.match(r"\d+", piece)
        parts.append(int(m.group()) if m else 0)
    return tuple(parts)


class PallasBackend:
    """Attention kernels in JAX Pallas: Triton lowering on NVIDIA GPUs, the Pallas
    interpreter on the CPU (opt-in, for tests)."""

    name = "pallas"
    frameworks = frozenset({"jax"})
    devices = CAPABILITIES.devices | CAPABILITIES.interpret_devices
    priority = 50
    capabilities = CAPABILITIES

    def available(self) -> tuple[bool, str]:
        try:
            version = metadata.version("jax")
        except metadata.PackageNotFoundError:
            return False, "jax is not installed: pip install 'longflash[jax]'"
        if _version_tuple(version) < MIN_JAX:
            need = ".".join(map(str, MIN_JAX))
            return False, f"jax {version} is too old: the pallas backend needs jax >= {need}"
        try:
            metadata.version("jaxlib")
        except metadata.PackageNotFoundError:
            return False, "jaxlib is not installed: pip install 'longflash[jax]'"
        return True, ""

    def check(self, call: AttentionCall) -> list[str]:
        caps = self.capabilities
        reasons = []
        if bad_env := mosaic_route.env_reason():
            reasons.append(bad_env)
        if call.dtype not in caps.dtypes:
            reasons.append(f"dtype {call.dtype} not supported ({', '.join(sorted(caps.dtypes))})")
        if call.Dqk > caps.max_head_dim:
            reasons.append(f"head_dim {call.Dqk} > {caps.max_head_dim}")
        if call.Dv > caps.max_head_dim:
            reasons.append(f"head_dim of v {call.Dv} > {caps.max_head_dim}")
        if call.device not in caps.devices:
            if call.device in caps.interpret_devices:
                if not _interpret_enabled():
                    reasons.append(
                        f"device {call.device}: runs only in the Pallas interpreter, which is "
                        f"opt-in (set {INTERPRET_ENV}=1; slow, meant for tests)"
                    )
            else:
                reasons.append(
                    f"device {call.device} not supported (supports: "
                    f"{', '.join(sorted(caps.devices))}; "
                    f"{', '.join(sorted(caps.interpret_devices))} in interpret mode)"
                )
        return reasons

    def describe(self, call: AttentionCall) -> str:
        """Which lowering runs this call's forward and backward, and why (shown by
        longflash.explain)."""
        if call.device not in self.capabilities.devices:
            return "Pallas interpreter (forward and backward)"
        p = problem_of(call)
        names = {"mosaic": "Mosaic GPU", "triton": "Triton"}
        fwd, fwd_why = mosaic_route.choose(p)
        bwd, bwd_why = mosaic_route.choose_backward(p)
        return (
            f"forward: {names[fwd]} lowering ({fwd_why}); "
            f"backward: {names[bwd]} lowering ({bwd_why})"
        )

    def forward(self, call: AttentionCall, q: Any, k: Any, v: Any) -> tuple[Any, Any]:
        from longflash_jax import kernels

        return kernels.forward(call, q, k, v)

    def backward(
        self, call: AttentionCall, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
    ) -> tuple[Any, Any, Any]:
        from longflash_jax import kernels

        return kernels.backward(call, dout, q, k, v, out, lse)
