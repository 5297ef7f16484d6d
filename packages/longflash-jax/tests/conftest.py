"""Shared test setup: interpret mode on the CPU, and a float64 NumPy oracle.

The oracle is the plain definition (DESIGN §2) evaluated in float64 on the same
(bf16/fp16-rounded) inputs the kernel sees, with closed-form gradients.
"""

from __future__ import annotations

import os

# Must be set before longflash selects a backend: the CPU runs Pallas only when asked.
os.environ.setdefault("LONGFLASH_PALLAS_INTERPRET", "1")
# Several xdist workers share one GPU: JAX allocates on demand instead of taking 75% of the
# memory in each process (see packages/longflash-cuda/tests/conftest.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402


def _cross_lowering() -> tuple[bool, str]:
    """Whether this jaxlib can lower Pallas Triton kernels for "cuda" without a GPU: up to
    0.10.2 it emits Triton IR for XLA to compile later; newer jaxlibs compile the kernel at
    lowering time, which needs the GPU."""
    from importlib import metadata

    version = tuple(int(x) for x in metadata.version("jaxlib").split(".")[:3] if x.isdigit())
    if version <= (0, 10, 2):
        return True, ""
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        return True, ""
    return False, (
        f"jaxlib {'.'.join(map(str, version))} compiles Pallas Triton kernels while "
        "lowering, which needs a GPU"
    )


CROSS_LOWERING, NO_CROSS_LOWERING_REASON = _cross_lowering()

# Relative Frobenius error allowed against the float64 oracle, per dtype. Inputs are
# rounded to the dtype first, so this measures only the kernel's own rounding (P and dS
# cast to the input dtype before their matmuls, fp32 accumulation).
TOL = {"bfloat16": 2e-2, "float16": 4e-3}


def visible_mask(nq: int, nk: int, window: tuple[int | None, int | None] | None) -> np.ndarray:
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    off = nk - nq
    mask = np.ones((nq, nk), bool)
    if window is not None:
        left, right = window
        if left is not None:
            mask &= j >= i + off - left
        if right is not None:
            mask &= j <= i + off + right
    return mask


def _one(q, k, v, do, scale, window, softcap):
    """One sequence, one head: q (Nq, D), k (Nk, D), v (Nk, Dv), do (Nq, Dv)."""
    s = scale * (q @ k.T)
    th = None
    if softcap is not None:
        th = np.tanh(s / softcap)
        s = softcap * th
    mask = visible_mask(q.shape[0], k.shape[0], window)
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=1, initial=-np.inf, keepdims=True)
    seen = np.isfinite(m)
    e = np.where(mask, np.exp(s - np.where(seen, m, 0.0)), 0.0)
    denom = e.sum(axis=1, keepdims=True)
    safe = np.where(denom > 0, denom, 1.0)
    p = e / safe
    lse = np.where(seen[:, 0], (np.where(seen, m, 0.0) + np.log(safe))[:, 0], -np.inf)
    out = p @ v
    if do is None:
        return out, lse, None
    dv = p.T @ do
    dp = do @ v.T
    dz = p * (dp - (do * out).sum(axis=1, keepdims=True))
    if th is not None:
        dz = dz * (1.0 - th * th)
    ds = dz * scale
    return out, lse, (ds @ k, ds.T @ q, dv)


def reference(q, k, v, do=None, *, scale, window=None, softcap=None, cu_q=None, cu_k=None):
    """float64 attention. Batched: (B, N, H, D) arrays; varlen: packed (T, H, D) with cu.
    Returns out, lse ((B, Hq, Nq) or (Hq, Tq)) and, when do is given, (dq, dk, dv)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    do = None if do is None else np.asarray(do, np.float64)
    if cu_q is None:
        seqs = [(q[b], k[b], v[b], None if do is None else do[b]) for b in range(q.shape[0])]
    else:
        cu_q, cu_k = np.asarray(cu_q), np.asarray(cu_k)
        seqs = [
            (
                q[cu_q[b] : cu_q[b + 1]],
                k[cu_k[b] : cu_k[b + 1]],
                v[cu_k[b] : cu_k[b + 1]],
                None if do is None else do[cu_q[b] : cu_q[b + 1]],
            )
            for b in range(len(cu_q) - 1)
        ]
    hq, hk = q.shape[-2], k.shape[-2]
    g = hq // hk
    outs, lses, grads = [], [], []
    for qs, ks, vs, dos in seqs:
        o = np.zeros(qs.shape[:-1] + (vs.shape[-1],))
        lse = np.zeros((hq, qs.shape[0]))
        dq, dk, dv = np.zeros_like(qs), np.zeros_like(ks), np.zeros_like(vs)
        for h in range(hq):
            r = _one(
                qs[:, h],
                ks[:, h // g],
                vs[:, h // g],
                None if dos is None else dos[:, h],
                scale,
                window,
                softcap,
            )
            o[:, h], lse[h] = r[0], r[1]
            if r[2] is not None:
                dq[:, h] = r[2][0]
                dk[:, h // g] += r[2][1]
                dv[:, h // g] += r[2][2]
        outs.append(o)
        lses.append(lse)
        grads.append((dq, dk, dv))
    if cu_q is None:
        out, lse = np.stack(outs), np.stack(lses)
        gr = tuple(np.stack([g_[i] for g_ in grads]) for i in range(3))
    else:
        out, lse = np.concatenate(outs), np.concatenate(lses, axis=1)
        gr = tuple(np.concatenate([g_[i] for g_ in grads]) for i in range(3))
    return out, lse, (gr if do is not None else None)


def rel_err(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert np.all(np.isfinite(x)), "non-finite values (unwritten or NaN)"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / max(denom, 1e-30))


def lse_matches(lse, ref, tol: float) -> None:
    """lse: -inf exactly where the oracle has -inf, close elsewhere (absolute, in nats)."""
    lse = np.asarray(lse, np.float64)
    assert lse.shape == ref.shape, (lse.shape, ref.shape)
    empty = np.isneginf(ref)
    assert np.array_equal(np.isneginf(lse), empty), "lse -inf rows differ"
    assert not np.any(np.isnan(lse)), "lse has NaN"
    if (~empty).any():
        err = np.abs(lse[~empty] - ref[~empty]).max()
        assert err <= tol, f"lse max abs error {err} > {tol}"


def outputs_match(out, lse, grads, ref, tol: float) -> None:
    """out and dq/dk/dv within ``tol`` (relative Frobenius), lse within 10·tol (nats)."""
    ro, rl, rg = ref
    assert rel_err(out, ro) <= tol, ("out", rel_err(out, ro))
    lse_matches(lse, rl, 10 * tol)
    for name, x, r in zip(("dq", "dk", "dv"), grads, rg):
        assert rel_err(x, r) <= tol, (name, rel_err(x, r))
