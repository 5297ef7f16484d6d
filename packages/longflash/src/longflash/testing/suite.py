"""The conformance suite every backend runs (DESIGN §4).

A backend package adds one line to its tests::

    TestTritonConformance = longflash.testing.conformance_suite("triton", framework="torch")

and pytest collects the returned class. Each case of each group is tried in each dtype of
the suite. The backend's own ``check()`` decides what the case tests:

- the backend accepts the call: forward, lse and dq/dk/dv, all computed under NaN
  poisoning (torch), are compared with the oracle within the dtype's tolerance;
- the backend declines it: calling ``longflash.attention(..., backend=name)`` must raise
  ``longflash.UnsupportedError`` naming every reason check() gave.

So a backend's declared capabilities are exactly what is tested: nothing is skipped, and
a feature it claims but gets wrong fails.

On a CPU, set ``OPENBLAS_NUM_THREADS=1`` for the test session (the core tests' conftest
does): the oracle's NumPy products otherwise leave spinning BLAS threads that compete
with the backend's own thread pool.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from longflash.errors import UnsupportedError
from longflash.registry import REGISTRY
from longflash.testing import cases as C
from longflash.testing import frameworks
from longflash.testing.oracle import attention_oracle
from longflash.testing.tolerances import compare

#: The dtypes the suite sweeps; a backend that declines one gets must-raise cases.
DEFAULT_DTYPES = ("float16", "bfloat16", "float32")

#: Beyond this many scores (B·Hq·Nq·Nk) the oracle is the blockwise float32 one on the
#: device instead of float64 NumPy on the host.
HOST_ORACLE_MAX_SCORES = 1 << 25

_GROUPS_SMALL = (
    "head_dims",
    "lengths",
    "masks",
    "softcap_scale",
    "gqa",
    "dv",
    "varlen",
    "no_key_rows",
)


def check_case(
    backend: str,
    case: C.Case,
    dtype: str,
    *,
    framework: str = "torch",
    device: str = "cpu",
    runner: Any = None,
) -> str:
    """Run one case against ``backend``; raise AssertionError on any departure.

    Returns "passed" (compared with the oracle) or "declined" (the backend's check()
    declined and the call raised UnsupportedError as it must).
    """
    r = runner if runner is not None else frameworks.runner(framework, device)
    x = r.inputs(case, dtype)
    impl = REGISTRY.get(backend)
    reasons = REGISTRY.reasons(impl, r.make_call(case, x))
    where = f"backend {backend!r}, {r.framework} on {device}, {dtype}, {case.describe()}"
    if reasons:
        _expect_unsupported(r, case, x, backend, reasons, where)
        return "declined"

    got = r.run(case, x, backend)
    problems = []
    for name, want in (
        ("out", dtype),
        ("lse", "float32"),
        ("dq", dtype),
        ("dk", dtype),
        ("dv", dtype),
    ):
        if got.dtypes[name] != want:
            problems.append(f"{name}: dtype {got.dtypes[name]}, expected {want}")
    if case.scores <= HOST_ORACLE_MAX_SCORES:
        ref = attention_oracle(
            x.q, x.k, x.v, x.dout, **case.kwargs(), cu_seqlens_q=x.cu_q, cu_seqlens_k=x.cu_k
        )
    else:
        ref = r.blockwise_oracle(case, x)
    problems += compare(got.arrays, ref, dtype)
    if problems:
        raise AssertionError(f"{where}\n  " + "\n  ".join(problems))
    return "passed"


def _expect_unsupported(r, case, x, backend, reasons, where) -> None:
    try:
        r.call(case, x, backend)
    except UnsupportedError as exc:
        missing = [why for why in reasons if why not in str(exc)]
        if missing:
            raise AssertionError(
                f"{where}\n  UnsupportedError does not name every reason check() gave; "
                f"missing {missing!r} in: {exc}"
            ) from exc
        return
    except Exception as exc:
        raise AssertionError(
            f"{where}\n  check() declines ({'; '.join(reasons)}), so the call must raise "
            f"longflash.UnsupportedError, but it raised {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(
        f"{where}\n  check() declines ({'; '.join(reasons)}), so the call must raise "
        "longflash.UnsupportedError, but it ran"
    )


def conformance_suite(
    backend: str,
    framework: str = "torch",
    *,
    device: str | None = None,
    size: str | None = None,
    dtypes: tuple[str, ...] | list[str] | None = None,
    max_examples: int | None = None,
) -> type:
    """A pytest test class running the conformance suite against ``backend``.

    Args:
        backend: the registered backend name.
        framework: "torch" or "jax"; the suite calls ``longflash.attention`` with that
            framework's arrays.
        device: "cpu", "cuda", ...; default: "cuda" when torch sees one (torch), the
            default JAX backend's platform (jax).
        size: "small" (the default on a CPU) runs short sequences; "large" (the default
            on an accelerator) adds sequences up to 128K tokens, checked against the
            blockwise oracle on the device. ``LONGFLASH_TEST_SIZE`` overrides the default.
        dtypes: the dtypes to sweep (default float16, bfloat16, float32). Whatever the
            backend's check() declines in them becomes a must-raise case.
        max_examples: random shapes hypothesis draws (default 20, or
            ``LONGFLASH_HYPOTHESIS_EXAMPLES``); the draws are derandomized.

    Bind the result to a module-level name starting with ``Test``.
    """
    import pytest

    if framework not in ("torch", "jax"):
        raise ValueError(f"framework must be 'torch' or 'jax', got {framework!r}")
    device = device or frameworks.default_device(framework)
    accelerator = device != "cpu"
    size = size or os.environ.get("LONGFLASH_TEST_SIZE") or ("large" if accelerator else "small")
    if size not in ("small", "large"):
        raise ValueError(f"size must be 'small' or 'large', got {size!r}")
    dtypes = tuple(dtypes or DEFAULT_DTYPES)
    if max_examples is None:
        max_examples = int(os.environ.get("LONGFLASH_HYPOTHESIS_EXAMPLES", "20"))

    groups = list(_GROUPS_SMALL)
    if framework == "torch":
        groups.append("layouts")
    if size == "large":
        groups.append("long")

    ns: dict[str, Any] = {
        "__doc__": f"LongFlash conformance suite: backend {backend!r}, {framework} on "
        f"{device}, size {size}, dtypes {', '.join(dtypes)}.",
        "backend": backend,
        "framework": framework,
        "device": device,
        "dtypes": dtypes,
        "_runner_cache": {},
    }

    @pytest.fixture(autouse=True)
    def _require_available(self):
        impl = REGISTRY.get(self.backend)  # an unknown name fails loudly here
        if self.framework not in getattr(impl, "frameworks", ()):
            pytest.fail(
                f"backend {self.backend!r} does not serve {self.framework} "
                f"(frameworks: {sorted(impl.frameworks)}); fix the suite's call"
            )
        ok, why = REGISTRY.available(self.backend)
        if not ok:
            pytest.skip(f"backend {self.backend!r} is unavailable here: {why}")

    def runner(self):
        cache = type(self)._runner_cache
        if "r" not in cache:
            cache["r"] = frameworks.runner(self.framework, self.device)
        return cache["r"]

    def run(self, case, dtype):
        return check_case(
            self.backend,
            case,
            dtype,
            framework=self.framework,
            device=self.device,
            runner=self.runner(),
        )

    ns.update(_require_available=_require_available, runner=runner, run=run)
    for group in groups:
        ns[f"test_{group}"] = _group_test(pytest, group, C.GROUPS[group](accelerator), dtypes)
    ns["test_random_shapes"] = _hypothesis_test(framework, accelerator, dtypes, max_examples)
    if framework == "jax":
        ns.update(_jax_transform_tests(pytest, dtypes))
    name = f"Conformance_{backend}_{framework}"
    cls = type(name, (), ns)
    cls.__qualname__ = name
    return cls


def _group_test(pytest, group: str, case_list: list[C.Case], dtypes: tuple[str, ...]):
    params = [
        pytest.param(case, dtype, id=f"{dtype}-{case.name}")
        for case in case_list
        for dtype in dtypes
    ]

    @pytest.mark.parametrize(("case", "dtype"), params)
    def test(self, case, dtype):
        self.run(case, dtype)

    test.__name__ = f"test_{group}"
    test.__doc__ = f"Conformance cases of group {group!r}: forward, lse, dq, dk, dv."
    return test


# -- random shapes ------------------------------------------------------------------
def _hypothesis_test(framework: str, accelerator: bool, dtypes: tuple[str, ...], max_examples: int):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    dims = [8, 16, 24, 32, 40, 64, 80, 96, 128] + ([160, 192, 256] if accelerator else [])
    if framework == "torch":
        batched_layouts = list(C.LAYOUTS)
        packed_layouts = [lay for lay in C.LAYOUTS if lay != "expanded_batch"]
    else:
        batched_layouts = packed_layouts = ["contiguous"]
    side = st.one_of(st.none(), st.integers(0, 40))

    @st.composite
    def random_case(draw) -> C.Case:
        hk = draw(st.integers(1, 3))
        hq = hk * draw(st.integers(1, 3))
        dqk = draw(st.sampled_from(dims))
        dv = draw(st.one_of(st.just(dqk), st.sampled_from(dims)))
        common = dict(
            Hq=hq,
            Hk=hk,
            Dqk=dqk,
            Dv=dv,
            causal=draw(st.booleans()),
            window=draw(st.one_of(st.none(), st.tuples(side, side))),
            softcap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))),
            scale=draw(st.one_of(st.none(), st.floats(0.02, 1.0))),
        )
        if draw(st.booleans()):
            seqlens = draw(
                st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70)), min_size=1, max_size=4)
            )
            return C.Case(
                "random",
                seqlens=tuple(seqlens),
                layout=draw(st.sampled_from(packed_layouts)),
                **common,
            )
        return C.Case(
            "random",
            B=draw(st.integers(1, 3)),
            Nq=draw(st.integers(1, 90)),
            Nk=draw(st.integers(1, 90)),
            layout=draw(st.sampled_from(batched_layouts)),
            **common,
        )

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=random_case(), dtype=st.sampled_from(dtypes))
    def test_random_shapes(self, case, dtype):
        """Random small shapes and options (derandomized: the same draws every run)."""
        self.run(case, dtype)

    return test_random_shapes


# -- JAX transformations --------------------------------------------------------------
def _jax_transform_tests(pytest, dtypes: tuple[str, ...]) -> dict[str, Any]:
    # features every backend is expected to have; one a backend declines in every dtype
    # turns each of these tests into must-raise checks, as everywhere in the suite
    case = C.Case("transforms", B=2, Nq=77, Nk=90, Hq=4, Hk=2, Dqk=64, causal=True)

    def _accepted_dtype(self):
        """(dtype, inputs) for the first suite dtype the backend accepts ``case`` in;
        None after checking that every dtype raises UnsupportedError, if it accepts none."""
        r = self.runner()
        for dtype in self.dtypes:
            x = r.inputs(case, dtype)
            if not REGISTRY.reasons(REGISTRY.get(self.backend), r.make_call(case, x)):
                return dtype, x
        for dtype in self.dtypes:
            assert self.run(case, dtype) == "declined"
        return None

    def _check(dtype, got, ref, names):
        problems = compare({n: got[n] for n in names}, ref, dtype)
        if problems:
            raise AssertionError(f"{case.describe()}, {dtype}:\n  " + "\n  ".join(problems))

    def test_jax_eager(self):
        """Forward and backward dispatched eagerly (the group tests run under jit)."""
        import jax

        if (accepted := self._accepted_dtype()) is None:
            return
        dtype, x = accepted
        f = self.runner().fn(case, x, self.backend)
        out, vjp, lse = jax.vjp(f, x.q, x.k, x.v, has_aux=True)
        dq, dk, dv = vjp(x.dout)
        ref = attention_oracle(x.q, x.k, x.v, x.dout, **case.kwargs())
        got = frameworks.to_host({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv})
        _check(dtype, got, ref, ("out", "lse", "dq", "dk", "dv"))

    def test_jax_jit(self):
        import jax

        import longflash

        if (accepted := self._accepted_dtype()) is None:
            return
        dtype, x = accepted
        f = jax.jit(
            lambda q, k, v: longflash.attention(
                q, k, v, **case.kwargs(), return_lse=True, backend=self.backend
            )
        )
        out, lse = f(x.q, x.k, x.v)
        ref = attention_oracle(x.q, x.k, x.v, **case.kwargs())
        got = frameworks.to_host({"out": out, "lse": lse})
        _check(dtype, got, ref, ("out", "lse"))

    def test_jax_grad(self):
        import jax
        import jax.numpy as jnp

        import longflash

        if (accepted := self._accepted_dtype()) is None:
            return
        dtype, x = accepted

        def loss(q, k, v):
            out = longflash.attention(q, k, v, **case.kwargs(), backend=self.backend)
            return jnp.sum(out.astype(jnp.float32) * x.dout.astype(jnp.float32))

        out, lse = longflash.attention(
            x.q, x.k, x.v, **case.kwargs(), return_lse=True, backend=self.backend
        )
        dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x.q, x.k, x.v)
        ref = attention_oracle(x.q, x.k, x.v, x.dout, **case.kwargs())
        got = frameworks.to_host({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv})
        _check(dtype, got, ref, ("out", "lse", "dq", "dk", "dv"))

    def test_jax_vmap(self):
        import jax
        import jax.numpy as jnp

        import longflash

        if (accepted := self._accepted_dtype()) is None:
            return
        dtype = accepted[0]
        r = self.runner()
        # three independent draws: the case name seeds the inputs
        xs = [r.inputs(dataclasses.replace(case, name=f"transforms-{i}"), dtype) for i in range(3)]
        stack = [jnp.stack([getattr(x, n) for x in xs]) for n in ("q", "k", "v")]
        out, lse = jax.vmap(
            lambda q, k, v: longflash.attention(
                q, k, v, **case.kwargs(), return_lse=True, backend=self.backend
            )
        )(*stack)
        for i, x in enumerate(xs):
            ref = attention_oracle(x.q, x.k, x.v, **case.kwargs())
            _check(dtype, frameworks.to_host({"out": out[i], "lse": lse[i]}), ref, ("out", "lse"))

    return {
        "_accepted_dtype": _accepted_dtype,
        "test_jax_eager": test_jax_eager,
        "test_jax_jit": test_jax_jit,
        "test_jax_grad": test_jax_grad,
        "test_jax_vmap": test_jax_vmap,
    }
