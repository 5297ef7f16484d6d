"""Scores in base 2: scale, softcap and log2(e) applied the cheapest way.

Softmax runs on exp2. Without softcap and with scale > 0, the scale is folded into the
exponent: the running max is taken on raw q.k scores and p = exp2(s*c - m*c) with
c = scale*log2(e), one FMA per score. With softcap the score becomes
t = softcap*log2(e) * tanh(scale*s/softcap) and c = 1; the backward needs the tanh
again for d(capped)/d(s) = scale * (1 - tanh^2).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from longflash_jax.problem import Problem

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def folded(p: Problem) -> bool:
    return p.softcap is None and p.scale > 0


def exp_scale(p: Problem) -> float:
    """c: the factor between what logits() returns and base-2 log-probabilities."""
    return p.scale * LOG2E if folded(p) else 1.0


def logits(p: Problem, s: Any) -> tuple[Any, Any]:
    """(t, tanh or None) from raw fp32 scores s = q.k; exp2(t*c - m*c) is the weight."""
    if p.softcap is not None:
        th = jnp.tanh(s * (p.scale / p.softcap))
        return th * (p.softcap * LOG2E), th
    if folded(p):
        return s, None
    return s * (p.scale * LOG2E), None


def times_c(p: Problem, x: Any) -> Any:
    c = exp_scale(p)
    return x if c == 1.0 else x * c
