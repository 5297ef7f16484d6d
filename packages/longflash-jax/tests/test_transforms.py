"""The pallas backend under jax transformations: jit, grad, vmap, shard_map."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata

import jax
import jax.numpy as jnp
import longflash
import numpy as np
import pytest
from conftest import TOL, reference, rel_err


def _qkv(seed, shape=(1, 40, 2, 32), dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3)]


def _loss(q, k, v):
    out = longflash.attention(q, k, v, causal=True, backend="pallas")
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.shape[-1])))


def test_jit_matches_eager():
    q, k, v = _qkv(0)
    f = lambda q, k, v: longflash.attention(q, k, v, causal=True, backend="pallas")
    eager = f(q, k, v)
    jitted = jax.jit(f)(q, k, v)
    assert np.array_equal(np.asarray(eager, np.float32), np.asarray(jitted, np.float32))


def test_jit_grad():
    q, k, v = _qkv(1)
    grads = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)))(q, k, v)
    do = jnp.broadcast_to(jnp.cos(jnp.arange(32)), q.shape)
    _, _, ref = reference(q, k, v, do, scale=32**-0.5, window=(None, 0))
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= TOL["bfloat16"]


def test_vmap_over_leading_axis():
    # (V, B, N, H, D): vmap maps attention over V; every slice must equal its own call.
    q, k, v = _qkv(2, shape=(3, 1, 33, 2, 32))
    f = lambda q, k, v: longflash.attention(q, k, v, causal=True, backend="pallas")
    batched = jax.vmap(f)(q, k, v)
    for i in range(q.shape[0]):
        out, _, _ = reference(q[i], k[i], v[i], scale=32**-0.5, window=(None, 0))
        assert rel_err(batched[i], out) <= TOL["bfloat16"]


def test_vmap_grad():
    q, k, v = _qkv(3, shape=(2, 1, 24, 2, 32))
    grads = jax.vmap(jax.grad(_loss, argnums=(0, 1, 2)))(q, k, v)
    do = jnp.broadcast_to(jnp.cos(jnp.arange(32)), q.shape[1:])
    for i in range(q.shape[0]):
        _, _, ref = reference(q[i], k[i], v[i], do, scale=32**-0.5, window=(None, 0))
        for g, r in zip(grads, ref):
            assert rel_err(g[i], r) <= TOL["bfloat16"]


# The subprocess runs on the CPU; it can cross-lower for cuda only with an old enough jaxlib
# (see conftest._cross_lowering).
CROSS_LOWERING_ON_CPU = tuple(
    int(x) for x in metadata.version("jaxlib").split(".")[:3] if x.isdigit()
) <= (0, 10, 2)

SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import inspect, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["LONGFLASH_PALLAS_INTERPRET"] = "1"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import longflash

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    params = inspect.signature(shard_map).parameters
    check_flag = "check_vma" if "check_vma" in params else "check_rep"
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("b",))
    spec = P("b")
    rng = np.random.default_rng(0)

    def attn(q, k, v):
        return longflash.attention(q, k, v, causal=True, backend="pallas")

    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2)

    def sharded(f, n_out, **kw):
        out_specs = spec if n_out == 1 else (spec,) * n_out
        return jax.jit(shard_map(f, mesh=mesh, in_specs=(spec,) * 3, out_specs=out_specs,
                                 **kw))

    mode = sys.argv[1]
    if mode.endswith("-x64"):
        jax.config.update("jax_enable_x64", True)
        assert jnp.arange(1).dtype == jnp.int64
        mode = mode[: -len("-x64")]
    if mode == "run":
        # The Pallas interpreter itself trips over the varying-axes check (a pad inside
        # its emulation of masked loads), so on the CPU the check is off, as JAX's
        # message advises; the GPU path is checked with it on below.
        kw = {check_flag: False}
        q = jnp.asarray(rng.standard_normal((4, 24, 4, 32)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((4, 30, 2, 32)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((4, 30, 2, 32)), jnp.bfloat16)
        out = sharded(attn, 1, **kw)(q, k, v)
        assert len(out.sharding.device_set) == 4
        np.testing.assert_array_equal(np.asarray(out, np.float32),
                                      np.asarray(attn(q, k, v), np.float32))
        g_s = sharded(jax.grad(loss, argnums=(0, 1, 2)), 3, **kw)(q, k, v)
        g_r = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g_s, g_r):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    else:
        # GPU lowering with shard_map's default checks: arrays are declared on "cuda" so
        # that the backend takes its Triton path, then cross-lowered for cuda.
        from longflash.frontends import jax as frontend
        frontend._platform = lambda x: "cuda"
        sd = jax.ShapeDtypeStruct((4, 256, 4, 64), jnp.bfloat16)
        f = sharded(jax.grad(loss, argnums=(0, 1, 2)), 3)
        exp = jax.export.export(f, platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(sd, sd, sd)
        assert exp.nr_devices == 4
        assert exp.mlir_module().count("custom_call @__gpu$xla.gpu.triton(") == 3
    print("OK")
    """
)


# "-x64": the same under jax_enable_x64 (int64 static indices next to the kernels' int32).
@pytest.mark.parametrize("mode", ["run", "lower-cuda", "run-x64", "lower-cuda-x64"])
def test_shard_map_over_batch(mode):
    if mode.startswith("lower-cuda") and not CROSS_LOWERING_ON_CPU:
        pytest.skip("cross-lowering for cuda on 4 host devices needs jaxlib <= 0.10.2")
    # XLA_FLAGS must be set before jax initialises its backends: use a fresh interpreter,
    # on the CPU (4 host devices) even where a GPU is present.
    env = dict(os.environ, LONGFLASH_PALLAS_INTERPRET="1", JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-c", SHARD_MAP_SCRIPT, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
