"""Ulysses and plain attention inside shard_map, through a backend whose results carry no
varying mesh axes (a host callback; XLA FFI calls such as the cuda backend's behave alike).
Before the frontend re-typed them, the gradient of such a backend failed custom_vjp's type
check under shard_map ("must produce an output with the same type as the args")."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import longflash
import longflash.distributed as lfd
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Spec
from longflash.registry import REGISTRY


class CallbackBackend:
    """The reference backend's JAX results, computed on the host through pure_callback."""

    name = "callback"
    frameworks = frozenset({"jax"})
    devices = frozenset({"cpu"})
    priority = -300

    def available(self):
        return True, ""

    def check(self, call):
        return []

    def _host(self, fn, *xs):
        shapes = jax.eval_shape(fn, *xs)

        def run(*arrays):
            return jax.tree.map(np.asarray, fn(*map(jnp.asarray, arrays)))

        return jax.pure_callback(run, shapes, *xs)

    def forward(self, call, q, k, v):
        ref = REGISTRY.get("reference")
        return self._host(lambda q, k, v: ref.forward(call, q, k, v), q, k, v)

    def backward(self, call, dout, q, k, v, out, lse):
        ref = REGISTRY.get("reference")
        return self._host(lambda *xs: ref.backward(call, *xs), dout, q, k, v, out, lse)


def main() -> None:
    REGISTRY.register(CallbackBackend())
    mesh = jax.make_mesh((2,), ("sp",))
    seq = Spec(None, "sp")
    q, k, v = (
        jax.device_put(
            jax.random.normal(jax.random.PRNGKey(i), (1, 64, 2, 16), jnp.float32),
            NamedSharding(mesh, seq),
        )
        for i in range(3)
    )

    def grads(body, backend):
        f = jax.shard_map(
            lambda q, k, v: body(q, k, v, backend), mesh=mesh, in_specs=(seq,) * 3, out_specs=seq
        )
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), (0, 1, 2)))(q, k, v)

    bodies = {
        "ulysses": lambda q, k, v, b: lfd.ulysses_attention(
            q, k, v, axis_name="sp", causal=True, backend=b
        ),
        # each device attends over its own shard only: plain attention under shard_map
        "local": lambda q, k, v, b: longflash.attention(q, k, v, causal=True, backend=b),
    }
    for name, body in bodies.items():
        got, want = grads(body, "callback"), grads(body, "reference")
        err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want))
        print(f"{name} {err:.3g}")

    # The ring's gradient passes no array constants (index tables, scatter indices) into its
    # manual computations: with them, XLA's GPU compiler (jax 0.11) crashed in Shardy's
    # unused-inputs canonicalisation on 2 H200s (benchmarks/results/ring-jax-*.log).
    ring = jax.shard_map(
        lambda q, k, v: lfd.ring_attention(
            q, k, v, axis_name="sp", causal=True, backend="reference"
        ),
        mesh=mesh,
        in_specs=(seq,) * 3,
        out_specs=seq,
    )
    text = (
        jax.jit(jax.grad(lambda q, k, v: jnp.sum(ring(q, k, v)), (0, 1, 2)))
        .lower(q, k, v)
        .as_text()
    )
    calls = [line for line in text.splitlines() if "sdy.manual_computation(" in line]
    constants = sum(line.split("in_shardings")[0].count("%c") for line in calls)
    print(f"manual_computations {len(calls)}")
    print(f"constant_inputs {constants}")


if __name__ == "__main__":
    sys.exit(main())
