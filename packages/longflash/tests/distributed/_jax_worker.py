"""JAX side of the distributed tests: python _jax_worker.py DIR (4 host devices).

XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax is imported,
hence a process of its own. Reads DIR/cases.pkl (global NumPy inputs and arguments), runs
each case under jit(value_and_grad(shard_map(...))) over a 4-device mesh and, for
comparison, longflash.attention on one device over the whole sequence; writes
DIR/results.pkl with both, the local-only output and the collectives in the program.
"""

from __future__ import annotations

import pickle
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import longflash  # noqa: E402
import longflash.distributed as lfd  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as Spec  # noqa: E402

AXIS = "sp"


def _grads(fn, q, k, v, dout):
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out * dout), (out, lse)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def run_case(case: dict, mesh) -> dict:
    world = mesh.shape[AXIS]
    layout = case["layout"]
    kwargs = dict(case["kwargs"])
    if case["fn"] == "ring":
        kwargs["layout"] = layout
    dtype = jnp.dtype(case["dtype"])
    q, k, v, dout = (jnp.asarray(case[n], dtype) for n in ("q", "k", "v", "dout"))
    fn = lfd.ring_attention if case["fn"] == "ring" else lfd.ulysses_attention

    def body(q, k, v):
        return fn(q, k, v, axis_name=AXIS, return_lse=True, **kwargs)

    seq = Spec(None, AXIS)
    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=(seq, seq, seq), out_specs=(seq, Spec(None, None, AXIS))
    )

    def to_shards(x):  # global order -> the shards concatenated in rank order
        x = np.concatenate([lfd.shard_sequence(x, r, world, layout) for r in range(world)], 1)
        return jax.device_put(jnp.asarray(x, dtype), NamedSharding(mesh, seq))

    def from_shards(x, dim=1):
        return lfd.unshard_sequence(np.split(np.asarray(x), world, axis=dim), layout, dim=dim)

    args = [to_shards(np.asarray(x)) for x in (q, k, v)]
    try:
        step = jax.jit(_grads(sharded, *args, to_shards(np.asarray(dout))))
        (_, (out, lse)), grads = step(*args)
    except (ValueError, TypeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    jaxpr = str(jax.make_jaxpr(_grads(sharded, *args, to_shards(np.asarray(dout))))(*args))
    hlo = jax.jit(sharded).lower(*args).as_text()

    def single(q, k, v):
        return longflash.attention(q, k, v, return_lse=True, **case["kwargs"])

    (_, (ref_out, ref_lse)), ref_grads = jax.jit(_grads(single, q, k, v, dout))(q, k, v)

    single_jit = jax.jit(single)  # one compilation for the P shards, not op by op
    local = [
        single_jit(*(lfd.shard_sequence(x, r, world, layout) for x in (q, k, v)))[0]
        for r in range(world)
    ]
    return {
        "out": from_shards(out),
        "lse": from_shards(lse, 2),
        "dq": from_shards(grads[0]),
        "dk": from_shards(grads[1]),
        "dv": from_shards(grads[2]),
        "ref": {
            "out": np.asarray(ref_out),
            "lse": np.asarray(ref_lse),
            "dq": np.asarray(ref_grads[0]),
            "dk": np.asarray(ref_grads[1]),
            "dv": np.asarray(ref_grads[2]),
        },
        "local": lfd.unshard_sequence([np.asarray(x) for x in local], layout),
        "ppermute": jaxpr.count("ppermute["),
        "all_to_all": jaxpr.count("all_to_all["),
        "hlo_collective_permute": hlo.count("collective_permute"),
    }


def main() -> None:
    where = sys.argv[1]
    with open(f"{where}/cases.pkl", "rb") as f:
        cases = pickle.load(f)
    mesh = jax.make_mesh((len(jax.devices()),), (AXIS,))
    results = {name: run_case(case, mesh) for name, case in cases.items()}
    with open(f"{where}/results.pkl", "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main()
