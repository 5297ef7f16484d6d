"""Which GPU lowering runs a forward and a backward: Pallas' Triton lowering or Mosaic GPU.

Pure Python and cheap (``check()`` and ``describe()`` call it); importing it imports neither
jax nor the Mosaic kernels. The Mosaic kernels (``longflash_jax.mosaic`` forward,
``longflash_jax.mosaic_bwd`` backward) cover the dense training shape only; every other call
runs on the Triton-lowered kernels with identical semantics (same masks, same lse, same
gradients), so routing never changes a result beyond rounding. Forward and backward are routed
independently: either backward consumes either forward's (out, lse).

``LONGFLASH_PALLAS_LOWERING``:
  auto    (default) per shape class and direction, whichever lowering measured faster on the
          GPU, as recorded in tiles.json's "lowering" table (keys "hd128-causal" for the
          forward, "bwd-hd128-causal" for the backward); Triton where nothing was measured.
  mosaic  Mosaic GPU for every forward and backward it supports; the rest stays on Triton
          (explain() says which and why).
  triton  Triton everywhere.
"""

from __future__ import annotations

import functools
import os
import re
from importlib import metadata, util

from longflash_jax.problem import GRID_YZ_MAX, Problem, table

LOWERING_ENV = "LONGFLASH_PALLAS_LOWERING"
LOWERINGS = ("auto", "mosaic", "triton")
# plgpu.kernel with warpgroup semantics, layout inference and the API spelled as used here;
# jax 0.10's Mosaic GPU also needs absl, which the jax extra does not install.
MOSAIC_MIN_JAX = (0, 11, 0)
# TMA tiles (8, 64) of rows x columns in global memory: row counts must be whole 8-row tiles.
ROW_TILE = 8


def requested() -> str:
    return os.environ.get(LOWERING_ENV, "auto").strip().lower() or "auto"


def env_reason() -> str:
    """A reason to decline every call when the variable holds an unknown value, else ""."""
    value = requested()
    if value in LOWERINGS:
        return ""
    return f"{LOWERING_ENV}={value!r} is not one of {', '.join(LOWERINGS)}"


def shape_class(p: Problem, direction: str = "fwd") -> str:
    """The key of tiles.json's "lowering" table: direction, head dim and mask kind."""
    cls = f"hd{p.Dqk}-{'causal' if p.right is not None else 'full'}"
    return cls if direction == "fwd" else f"{direction}-{cls}"


def mosaic_tile(p: Problem) -> dict[str, int] | None:
    return table().get("mosaic", {}).get(str(p.Dqk))


def mosaic_bwd_tiles(p: Problem) -> dict[str, dict[str, int]] | None:
    """{"dkdv": {...}, "dq": {...}} from tiles.json's "mosaic_bwd" section, or None."""
    return table().get("mosaic_bwd", {}).get(str(p.Dqk))


def _common_reasons(p: Problem) -> list[str]:
    """What neither Mosaic kernel takes: the static limits they share."""
    reasons = []
    if p.interpret:
        reasons.append("Mosaic GPU runs on NVIDIA GPUs only (the CPU uses the interpreter)")
    if p.varlen:
        reasons.append("varlen")
    if p.left is not None or p.right not in (None, 0):
        reasons.append("sliding window (only causal or none)")
    if p.softcap is not None:
        reasons.append("softcap")
    if not p.scale > 0:
        reasons.append(f"scale {p.scale} <= 0 (the scale is folded into exp2)")
    if p.Nq % ROW_TILE or p.Nk % ROW_TILE:
        reasons.append(f"sequence lengths {p.Nq}/{p.Nk} not multiples of {ROW_TILE} (TMA tiles)")
    return reasons


def mosaic_reasons(p: Problem) -> list[str]:
    """Why the Mosaic GPU forward cannot run this problem (static; [] = it can)."""
    reasons = _common_reasons(p)
    tile = mosaic_tile(p)
    if p.Dqk != p.Dv or tile is None:
        dims = sorted(int(k) for k in table().get("mosaic", {}) if k.isdigit())
        reasons.append(
            f"head dims {p.Dqk}/{p.Dv} (Mosaic: Dqk = Dv in {', '.join(map(str, dims))})"
        )
    if tile is not None:
        if p.Nq < tile["block_q"] or p.Nk < tile["block_k"]:
            reasons.append(
                f"sequences {p.Nq}/{p.Nk} shorter than one tile "
                f"({tile['block_q']}/{tile['block_k']})"
            )
        rows_per_cta = 2 * tile["block_q"]
        if -(-p.Nq // rows_per_cta) > GRID_YZ_MAX or p.B > GRID_YZ_MAX:
            reasons.append(f"grid beyond {GRID_YZ_MAX} query tiles or batches")
    return reasons


def mosaic_bwd_reasons(p: Problem) -> list[str]:
    """Why the Mosaic GPU backward cannot run this problem (static; [] = it can)."""
    reasons = _common_reasons(p)
    tiles = mosaic_bwd_tiles(p)
    if p.Dqk != p.Dv or tiles is None:
        dims = sorted(int(k) for k in table().get("mosaic_bwd", {}) if k.isdigit())
        reasons.append(
            f"head dims {p.Dqk}/{p.Dv} (Mosaic backward: Dqk = Dv in {', '.join(map(str, dims))})"
        )
    if tiles is not None:
        dkdv, dq = tiles["dkdv"], tiles["dq"]
        # A TMA box may not exceed the tensor it reads: every sequence spans whole tiles.
        need_q, need_k = max(dkdv["block_q"], dq["block_q"]), max(dkdv["block_k"], dq["block_k"])
        if p.Nq < need_q or p.Nk < need_k:
            reasons.append(f"sequences {p.Nq}/{p.Nk} shorter than one tile ({need_q}/{need_k})")
        if max(p.Hq, p.B) > GRID_YZ_MAX:
            reasons.append(f"grid beyond {GRID_YZ_MAX} heads or batches")
    return reasons


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(m.group()) if (m := re.match(r"\d+", x)) else 0 for x in text.split(".")[:3])


@functools.cache
def runtime_reason() -> str:
    """Why this process cannot run Mosaic GPU kernels at all ("" = it can). Cached: the jax
    version and the GPU do not change within a process."""
    try:
        version = metadata.version("jax")
    except metadata.PackageNotFoundError:
        return "jax is not installed"
    if _version_tuple(version) < MOSAIC_MIN_JAX:
        need = ".".join(map(str, MOSAIC_MIN_JAX))
        return f"jax {version} < {need} (Mosaic GPU kernel written for jax >= {need})"
    if util.find_spec("jax.experimental.pallas.mosaic_gpu") is None:
        return "jax.experimental.pallas.mosaic_gpu is missing"
    import jax

    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return "no GPU visible to jax"
    cc = getattr(gpus[0], "compute_capability", "")
    # wgmma and setmaxnreg exist on sm_90a only (Blackwell has tcgen05 instead).
    if cc != "9.0":
        return f"GPU compute capability {cc or 'unknown'}: the Mosaic kernel needs sm_90 (Hopper)"
    return ""


def measured_winner(p: Problem, direction: str = "fwd") -> str | None:
    choice = table().get("lowering", {}).get(shape_class(p, direction))
    return choice if choice in ("mosaic", "triton") else None


def _choose(p: Problem, direction: str, reasons: list[str]) -> tuple[str, str]:
    req = requested()
    if req == "triton":
        return "triton", f"{LOWERING_ENV}=triton"
    if reasons:
        return "triton", "Mosaic GPU does not take it: " + "; ".join(reasons)
    cls = shape_class(p, direction)
    if req == "auto":
        winner = measured_winner(p, direction)
        if winner is None:
            return "triton", f"auto: no Mosaic measurement for {cls}"
        if winner == "triton":
            return "triton", f"auto: tiles.json keeps {cls} on Triton (measured no slower)"
    why = runtime_reason()
    if why:
        return "triton", "Mosaic GPU unavailable: " + why
    if req == "mosaic":
        return "mosaic", f"{LOWERING_ENV}=mosaic"
    return "mosaic", f"auto: Mosaic GPU measured faster for {cls} (tiles.json)"


def choose(p: Problem) -> tuple[str, str]:
    """(lowering, why) for this problem's forward: "mosaic" or "triton"."""
    return _choose(p, "fwd", mosaic_reasons(p))


def choose_backward(p: Problem) -> tuple[str, str]:
    """(lowering, why) for this problem's backward: "mosaic" or "triton". Under "auto" a
    class without a backward measurement in tiles.json stays on Triton, whatever its forward
    measured: an unmeasured kernel is never picked by default."""
    return _choose(p, "bwd", mosaic_bwd_reasons(p))
