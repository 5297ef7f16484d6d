"""The suite's tolerances, stated once, and the comparison against the oracle.

Errors are relative Frobenius norms, ``‖x − ref‖ / ‖ref‖`` over a whole tensor, against
the oracle evaluated on the very same (already rounded) inputs, so they measure only what
the backend's arithmetic loses. They are per dtype and never per backend. Two reference
values near zero get a floor, both explained in :func:`errors`: lse (a logarithm) counts
as at least 1 per row, and dq/dk that cancel exactly are measured against their terms.
"""

from __future__ import annotations

import math

import numpy as np

from longflash.testing.oracle import OracleResult

#: dtype -> quantity -> largest relative Frobenius error allowed ("grad": dq, dk, dv).
#:
#: Chosen from measurements (tests/test_tolerances.py re-checks them on every run) of an
#: emulated FlashAttention-2 kernel (tests/_fa_emulation.py): scores and accumulators in
#: float32, P and dS rounded to the input dtype before the matrix products that consume
#: them, outputs rounded once. Worst errors over the suite's small cases and 150 random
#: shapes:
#:
#:   dtype     out      lse      grad     (grad without the two large-logits cases)
#:   float32   1.3e-5   1.8e-7   2.3e-5   (2.5e-6)
#:   float16   3.0e-4   1.8e-7   1.5e-3   (1.1e-3)
#:   bfloat16  2.3e-3   1.6e-7   1.6e-2   (7.0e-3)
#:
#: The bounds leave a factor of 2.5 to 10 over those for other summation orders, fast
#: exp2/log2 and split reductions. The lse bounds are set by a second legitimate design,
#: pre-multiplying q by the scale in the input dtype (one more rounding of every score):
#: it measures lse 1.8e-4 (float16) / 1.6e-3 (bfloat16), out and grads as above. Defects
#: fail: float32 products in TF32 (10-bit mantissa) measure 5e-4 on out for ordinary
#: cases and 1e-2 on large logits, so a TF32 kernel must decline float32.
#: The large-logits cases (scores near 130 with a spread of ±8) dominate: float32 loses
#: |s|·2^-24 per score there, and a 16-bit dS loses its exact row-sum cancellation
#: against the shifted k.
#:
#: float64: only for backends that accept it (the reference); the lse the protocol
#: carries is float32, hence its bound.
TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"out": 1e-10, "lse": 1e-6, "grad": 1e-9},
    "float32": {"out": 1e-4, "lse": 1e-5, "grad": 2e-4},
    "float16": {"out": 5e-3, "lse": 1e-3, "grad": 1e-2},
    "bfloat16": {"out": 2e-2, "lse": 8e-3, "grad": 4e-2},
}


def rel_error(x: np.ndarray, ref: np.ndarray) -> float:
    """‖x − ref‖_F / ‖ref‖_F; 0 when both are zero, inf when only ref is."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = float(np.linalg.norm(ref.ravel()))
    num = float(np.linalg.norm((x - ref).ravel()))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def _worst(x: np.ndarray, ref: np.ndarray) -> str:
    if x.size == 0:
        return ""
    diff = np.abs(x - ref)
    diff = np.where(np.isnan(diff), np.inf, diff)
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return f" (worst at {tuple(int(i) for i in idx)}: got {x[idx]:.6g}, expected {ref[idx]:.6g})"


def compare(got: dict[str, np.ndarray], ref: OracleResult, dtype: str) -> list[str]:
    """Every way ``got`` (out, lse and, when present, dq, dk, dv as float64 arrays in the
    API's shapes) departs from the oracle beyond the dtype's tolerances; [] = pass.

    Checks: shapes; no NaN anywhere and no ±inf except lse = -inf; lse is -inf exactly
    where the oracle's is and finite elsewhere; rows that see no key have out exactly 0
    and dq exactly 0; keys no query sees have dk and dv exactly 0; relative errors.
    """
    tol = TOLERANCES[dtype]
    problems: list[str] = []
    expected = {"out": ref.out, "lse": ref.lse, "dq": ref.dq, "dk": ref.dk, "dv": ref.dv}
    for name, x in got.items():
        want = expected[name]
        if x.shape != want.shape:
            problems.append(f"{name}: shape {x.shape}, expected {want.shape}")
    if problems:
        return problems

    for name, x in got.items():
        n_nan = int(np.isnan(x).sum())
        if n_nan:
            first = tuple(int(i) for i in np.argwhere(np.isnan(x))[0])
            problems.append(
                f"{name}: {n_nan} NaN of {x.size} (first at {first}; NaN marks an element "
                "never written, or an invalid operation)"
            )
        bad_inf = np.isposinf(x) if name == "lse" else np.isinf(x)
        if bad_inf.any():
            problems.append(f"{name}: {int(bad_inf.sum())} infinite values")

    dead = np.isneginf(ref.lse)
    lse = got["lse"]
    if (~np.isneginf(lse[dead])).any():
        problems.append(
            f"lse: {int((~np.isneginf(lse[dead])).sum())} rows that see no key have lse "
            "other than -inf"
        )
    if np.isneginf(lse[~dead]).any():
        problems.append(
            f"lse: {int(np.isneginf(lse[~dead]).sum())} rows that see keys have lse -inf"
        )
    # lse is (B, Hq, Nq) or (Hq, Tq); per-token arrays are (B, Nq, Hq, D) or (Tq, Hq, D)
    dead_rows = np.swapaxes(dead, -1, -2)
    for name in ("out", "dq"):
        if name in got and np.any(got[name][dead_rows] != 0):
            problems.append(f"{name}: rows that see no key are not exactly 0")
    if ref.key_seen is not None:
        for name in ("dk", "dv"):
            if name in got and np.any(got[name][~ref.key_seen] != 0):
                problems.append(f"{name}: keys that no query sees have nonzero gradient")

    for name, err in errors(got, ref).items():
        bound = tol["grad"] if name in ("dq", "dk", "dv") else tol[name]
        if not err <= bound:
            x, want = got[name], expected[name]
            if name == "lse":
                live = np.isfinite(want) & np.isfinite(x)
                x, want = np.where(live, x, 0.0), np.where(live, want, 0.0)
            problems.append(f"{name}: relative error {err:.3g} > {bound:.3g}" + _worst(x, want))
    return problems


def errors(got: dict[str, np.ndarray], ref: OracleResult) -> dict[str, float]:
    """The relative Frobenius error of each array in ``got`` against the oracle.

    lse counts only rows where both are finite (the -inf pattern is checked apart).
    dq and dk are sums whose terms cancel exactly when every row sees a single key
    (dq = dk = 0 in exact arithmetic); relative to that zero any kernel's rounding noise
    is infinite, so there, and only there (the reference a million times smaller than
    its terms), the error is measured against the size of the cancelling terms.
    """
    out: dict[str, float] = {}
    for name, x in got.items():
        want = getattr(ref, name)
        if name == "lse":
            # lse is a logarithm: an error d in it is a relative error d of the softmax
            # normaliser. Relative to small lse values (a row with one or two keys has
            # lse near its score, which can be near 0) that is meaningless, so the
            # reference's magnitude counts as at least 1 per row.
            live = np.isfinite(want) & np.isfinite(x)
            diff = float(np.linalg.norm((x[live] - want[live]).ravel()))
            size = max(float(np.linalg.norm(want[live].ravel())), math.sqrt(live.sum()))
            out[name] = diff / size if size else 0.0
            continue
        err = rel_error(x, want)
        terms = {"dq": ref.dq_terms, "dk": ref.dk_terms}.get(name)
        if terms is not None:
            size = float(np.linalg.norm(terms.ravel()))
            if size > 0 and float(np.linalg.norm(want.ravel())) <= 1e-6 * size:
                err = float(np.linalg.norm((x - want).ravel())) / size
        out[name] = err
    return out
