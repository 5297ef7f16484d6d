"""CPU-runnable tests of the C API through ctypes: argument checks, status strings, workspace
sizes, the build description. None of these touches a GPU: every check runs before the device.
They need the built library (skipped with the reason when it is missing)."""

from __future__ import annotations

import ctypes

import pytest
from longflash_cuda import _lib

lib, why = _lib.load()
pytestmark = pytest.mark.skipif(lib is None, reason=f"library not built: {why}")

# A fake, well-aligned device address: the checks below must fail before anything reads it.
FAKE = 1 << 40


def params(**kw) -> _lib.Params:
    base = dict(
        dtype=_lib.LF_BFLOAT16,
        batch=2,
        seqlen_q=100,
        seqlen_k=120,
        heads_q=8,
        heads_k=2,
        head_dim_qk=128,
        head_dim_v=128,
        scale=0.088,
        window_left=-1,
        window_right=-1,
    )
    base.update(kw)
    return _lib.Params(**base)


def dense(h: int, d: int, n: int, ptr: int = FAKE) -> _lib.Tensor:
    return _lib.Tensor(ptr, n * h * d, h * d, d)


def forward(p: _lib.Params, q=None, k=None, v=None, out=None, lse=None, ws=None, ws_bytes=0):
    q = q or dense(p.heads_q, p.head_dim_qk, p.seqlen_q)
    k = k or dense(p.heads_k, p.head_dim_qk, p.seqlen_k)
    v = v or dense(p.heads_k, p.head_dim_v, p.seqlen_k)
    out = out or dense(p.heads_q, p.head_dim_v, p.seqlen_q)
    return lib.lf_attention_forward(ctypes.byref(p), q, k, v, out, lse, ws, ws_bytes, None)


def last_error() -> str:
    return lib.lf_last_error().decode()


def status(name: str) -> int:
    return {v: k for k, v in _lib.STATUS_NAMES.items()}[name]


def compiled_any() -> tuple[int, int, int]:
    for dt in (_lib.LF_BFLOAT16, _lib.LF_FLOAT16):
        for d in ((128, 128), (64, 64), (96, 96), (192, 192), (192, 128), (256, 256)):
            if lib.lf_has_kernel(d[0], d[1], dt):
                return d[0], d[1], dt
    pytest.skip("no kernel compiled")


def test_status_names_and_version():
    assert lib.lf_api_version() == _lib.API_VERSION
    for code, name in _lib.STATUS_NAMES.items():
        assert lib.lf_status_name(code).decode() == name
    assert lib.lf_status_name(99).decode() == "LF_ERROR_UNKNOWN"


def test_build_config_lists_compiled_kernels():
    cfg = lib.lf_build_config().decode()
    assert cfg.startswith("archs=") and "head_dims=" in cfg and "dtypes=" in cfg
    dqk, dv, dt = compiled_any()
    assert f"{dqk}x{dv}" in cfg


def test_valid_params_accepted():
    dqk, dv, dt = compiled_any()
    p = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt)
    assert lib.lf_check_params(ctypes.byref(p)) == _lib.LF_SUCCESS
    assert last_error() == ""


@pytest.mark.parametrize(
    "change, code, words",
    [
        (dict(struct_size=4), "LF_ERROR_INVALID_ARGUMENT", "struct_size"),
        (dict(dtype=7), "LF_ERROR_INVALID_ARGUMENT", "dtype"),
        (dict(batch=-1), "LF_ERROR_INVALID_ARGUMENT", "batch"),
        (dict(seqlen_q=-5), "LF_ERROR_INVALID_ARGUMENT", "seqlen"),
        (dict(heads_q=0), "LF_ERROR_INVALID_ARGUMENT", "heads"),
        (dict(heads_q=6, heads_k=4), "LF_ERROR_INVALID_ARGUMENT", "multiple"),
        (dict(head_dim_qk=320, head_dim_v=320), "LF_ERROR_UNSUPPORTED", "head_dim"),
        (dict(head_dim_qk=128, head_dim_v=64), "LF_ERROR_UNSUPPORTED", "head_dim"),
        (dict(scale=float("nan")), "LF_ERROR_INVALID_ARGUMENT", "scale"),
        (dict(scale=float("inf")), "LF_ERROR_INVALID_ARGUMENT", "scale"),
        (dict(scale=-1.0), "LF_ERROR_UNSUPPORTED", "scale"),
        (dict(softcap=-2.0), "LF_ERROR_INVALID_ARGUMENT", "softcap"),
        (dict(softcap=float("inf")), "LF_ERROR_INVALID_ARGUMENT", "softcap"),
        (dict(cu_seqlens_q=FAKE), "LF_ERROR_INVALID_ARGUMENT", "cu_seqlens"),
        (dict(deterministic=3), "LF_ERROR_INVALID_ARGUMENT", "deterministic"),
        (dict(heads_q=70000, heads_k=1), "LF_ERROR_UNSUPPORTED", "65535"),
    ],
)
def test_bad_params_rejected(change, code, words):
    dqk, dv, dt = compiled_any()
    base = dict(head_dim_qk=dqk, head_dim_v=dv, dtype=dt)
    base.update(change)
    struct_size = base.pop("struct_size", None)
    p = params(**base)
    if struct_size is not None:
        p.struct_size = struct_size
    got = lib.lf_check_params(ctypes.byref(p))
    assert _lib.STATUS_NAMES[got] == code, last_error()
    assert words in last_error()
    # Every entry point runs the same checks.
    assert forward(p) == got
    n = ctypes.c_size_t(123)
    assert lib.lf_attention_backward_workspace_size(ctypes.byref(p), ctypes.byref(n)) == got


def test_null_params():
    assert lib.lf_check_params(None) == status("LF_ERROR_INVALID_ARGUMENT")
    assert "NULL" in last_error()


def test_uncompiled_head_dim_names_the_build():
    for dt in (_lib.LF_BFLOAT16, _lib.LF_FLOAT16):
        for d in ((64, 64), (96, 96), (128, 128), (192, 192), (192, 128), (256, 256)):
            if not lib.lf_has_kernel(d[0], d[1], dt):
                p = params(head_dim_qk=d[0], head_dim_v=d[1], dtype=dt)
                assert lib.lf_check_params(ctypes.byref(p)) == status("LF_ERROR_UNSUPPORTED")
                assert "no kernel" in last_error() and "this build" in last_error()
                return
    pytest.skip("every kernel is compiled")


@pytest.mark.parametrize(
    "which, tensor, code, words",
    [
        ("q", _lib.Tensor(None, 0, 0, 0), "LF_ERROR_INVALID_ARGUMENT", "q.data is NULL"),
        ("k", _lib.Tensor(FAKE + 2, 100 * 256, 256, 128), "LF_ERROR_UNSUPPORTED", "aligned"),
        ("v", _lib.Tensor(FAKE, 120 * 256, 258, 128), "LF_ERROR_UNSUPPORTED", "multiples of 8"),
        ("out", _lib.Tensor(FAKE, -1, 1024, 128), "LF_ERROR_INVALID_ARGUMENT", "negative"),
        ("q", _lib.Tensor(FAKE, 100 * 1024, 0, 128), "LF_ERROR_UNSUPPORTED", "broadcast"),
    ],
)
def test_bad_tensors_rejected_before_device(which, tensor, code, words):
    dqk, dv, dt = compiled_any()
    p = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt)
    got = forward(p, **{which: tensor})
    assert _lib.STATUS_NAMES[got] == code, last_error()
    assert words in last_error()


def test_misaligned_lse_rejected():
    dqk, dv, dt = compiled_any()
    p = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt)
    assert forward(p, lse=FAKE + 2) == status("LF_ERROR_INVALID_ARGUMENT")
    assert "lse" in last_error()


def test_empty_problem_is_a_no_op_without_device():
    dqk, dv, dt = compiled_any()
    p = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt, batch=0)
    assert forward(p) == _lib.LF_SUCCESS


def test_workspace_sizes(monkeypatch):
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", "v5")  # the row-layout accumulator (v7: below)
    monkeypatch.delenv("LONGFLASH_CUDA_FWD", raising=False)  # the dynamic schedule: below
    dqk, dv, dt = compiled_any()
    p = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt)
    n = ctypes.c_size_t(7)
    assert lib.lf_attention_forward_workspace_size(ctypes.byref(p), ctypes.byref(n)) == 0
    assert n.value == 0
    assert lib.lf_attention_backward_workspace_size(ctypes.byref(p), ctypes.byref(n)) == 0
    rows = p.batch * p.seqlen_q
    # fp32 dQ accumulator plus two fp32 per-row arrays, each rounded up to 256 bytes
    at_least = rows * p.heads_q * dqk * 4 + 2 * rows * p.heads_q * 4
    assert at_least <= n.value < at_least + 3 * 256
    det = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt, deterministic=1)
    m = ctypes.c_size_t(0)
    assert lib.lf_attention_backward_workspace_size(ctypes.byref(det), ctypes.byref(m)) == 0
    assert m.value > n.value  # the semaphores
    assert lib.lf_attention_backward_workspace_size(ctypes.byref(p), None) == status(
        "LF_ERROR_INVALID_ARGUMENT"
    )


def _a256(x: int) -> int:
    return (x + 255) // 256 * 256


def _bwd_bytes(p: _lib.Params) -> int:
    n = ctypes.c_size_t(0)
    assert lib.lf_attention_backward_workspace_size(ctypes.byref(p), ctypes.byref(n)) == 0
    return n.value


@pytest.mark.parametrize(
    "d, rows, tiled, untiled",
    [
        # v7 (the default there, and LONGFLASH_CUDA_BWD=v7) at hd128 and hd64
        # (a "+heads" / "+group<G>" suffix picks the CTA order only, never the kernel)
        (
            128,
            64,
            ("v7", "timing-v7-no-reduce", "", "v7+heads", "default+group4"),
            ("v5", "v2", "v8", "v5+group2", "v2+heads"),
        ),
        (
            64,
            128,
            ("v7", "timing-v7-no-reduce", "", "v7+group8", "+heads"),
            ("v5", "v2", "v8", "v5+heads"),
        ),
        # v8 (the default there) at hd256
        (256, 64, ("v8", "", "v8+group4", "default+heads"), ("v6", "v2", "v7", "v6+group4")),
    ],
)
def test_workspace_sizes_tile_accumulator(monkeypatch, d, rows, tiled, untiled):
    """The variants that fill the per-tile dQ accumulator (v7 at hd64/hd128, v8 at hd256) size it
    per (query tile, head): dense sequences round up to whole tiles, varlen takes
    floor(Tq / rows) + B tiles (params.h dq_first_tile); every other variant, the deterministic
    mode, and v7/v8 where they do not apply keep the row layout."""
    if not lib.lf_has_kernel(d, d, _lib.LF_BFLOAT16):
        pytest.skip(f"hd{d} is not compiled in this build (LONGFLASH_HEAD_DIMS)")
    dense_kw = dict(
        batch=2, seqlen_q=300, seqlen_k=300, heads_q=4, heads_k=2, head_dim_qk=d, head_dim_v=d
    )
    stats = 2 * _a256(600 * 4 * 4)  # lse_log2 and dpsum, fp32 per (row, head)
    row_layout = _a256(600 * 4 * d * 4) + stats
    tile_layout = _a256(2 * -(-300 // rows) * 4 * rows * d * 4) + stats
    assert tile_layout > row_layout
    for var in tiled + untiled:
        monkeypatch.setenv("LONGFLASH_CUDA_BWD", var)
        want = tile_layout if var in tiled else row_layout
        assert _bwd_bytes(params(**dense_kw)) == want, var
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", tiled[0])
    det = _bwd_bytes(params(deterministic=1, **dense_kw))
    assert row_layout < det < tile_layout  # deterministic runs v2: rows plus semaphores
    lens = [63, 65, 0, 1, 128, 129, 200]
    tq = sum(lens)
    var_kw = dict(
        batch=len(lens),
        seqlen_q=max(lens),
        seqlen_k=300,
        heads_q=4,
        heads_k=2,
        head_dim_qk=d,
        head_dim_v=d,
        cu_seqlens_q=FAKE,
        cu_seqlens_k=FAKE,
        total_q=tq,
        total_k=900,
    )
    stats = 2 * _a256(tq * 4 * 4)
    tiles = tq // rows + len(lens)
    assert _bwd_bytes(params(**var_kw)) == _a256(tiles * 4 * rows * d * 4) + stats
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", untiled[0])
    assert _bwd_bytes(params(**var_kw)) == _a256(tq * 4 * d * 4) + stats
    # The tiled variant does not apply at other head dims (the size query rejects dims this
    # build lacks).
    for other in (64, 96, 128, 192, 256):
        applies = other == d or (tiled[0] == "v7" and other in (64, 128))
        if applies or not lib.lf_has_kernel(other, other, _lib.LF_BFLOAT16):
            continue
        kw = dict(dense_kw, head_dim_qk=other, head_dim_v=other)
        monkeypatch.setenv("LONGFLASH_CUDA_BWD", tiled[0])
        tiled_size = _bwd_bytes(params(**kw))
        monkeypatch.setenv("LONGFLASH_CUDA_BWD", "v2")
        assert tiled_size == _bwd_bytes(params(**kw)), other


@pytest.mark.parametrize("variant", ["", "v5", "v7"])
def test_jax_binding_sizes_a_varlen_workspace_as_varlen(monkeypatch, variant):
    """The JAX binding sizes the workspace at trace time, before the cu_seqlens arrays exist; the
    FFI handler's call then checks it against the size of the real varlen call. Found on the H200:
    sized as the dense shape, every varlen backward under v7 (whose accumulator takes
    floor(total_q / tile) + B tiles) failed with LF_ERROR_WORKSPACE."""
    jnp = pytest.importorskip("jax.numpy")
    from longflash.frontends import jax as lfj
    from longflash_cuda import _jax, make_params

    dqk, dv, dt = compiled_any()
    if dqk != dv or dqk not in (64, 128):
        pytest.skip("v7 covers hd64/hd128; this build has neither")
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", variant)
    rows = 64 if dqk == 128 else 128
    lens = [rows, rows, 0, 1]  # whole tiles, an empty and a one-row sequence
    total = sum(lens)
    dtype = jnp.bfloat16 if dt == _lib.LF_BFLOAT16 else jnp.float16
    q = jnp.zeros((total, 4, dqk), dtype)
    k = jnp.zeros((total, 2, dqk), dtype)
    v = jnp.zeros((total, 2, dv), dtype)
    cu = jnp.asarray([0, *[sum(lens[: i + 1]) for i in range(len(lens))]], jnp.int32)
    call = lfj.make_call(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=rows, max_seqlen_k=rows
    )
    traced = _bwd_bytes(_jax.size_params(call))
    assert traced == _bwd_bytes(make_params(call, cu_q=FAKE, cu_k=FAKE))  # the handler's call
    stats = 2 * _a256(total * 4 * 4)
    if variant == "v5":
        assert traced == _a256(total * 4 * dqk * 4) + stats
    else:  # v7, the default
        tiles = total // rows + len(lens)
        assert traced == _a256(tiles * 4 * rows * dqk * 4) + stats
        assert traced > _bwd_bytes(make_params(call))  # what the dense-shaped sizing gave


def test_backward_checks_workspace_before_device():
    dqk, dv, dt = compiled_any()
    p = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt)
    q = dense(p.heads_q, dqk, p.seqlen_q)
    k = dense(p.heads_k, dqk, p.seqlen_k)
    v = dense(p.heads_k, dv, p.seqlen_k)
    o = dense(p.heads_q, dv, p.seqlen_q)
    got = lib.lf_attention_backward(ctypes.byref(p), q, k, v, o, o, FAKE, q, k, v, FAKE, 16, None)
    assert got == status("LF_ERROR_WORKSPACE")
    assert "workspace is 16 bytes" in last_error()
    got = lib.lf_attention_backward(
        ctypes.byref(p), q, k, v, o, o, None, q, k, v, FAKE, 1 << 40, None
    )
    assert got == status("LF_ERROR_INVALID_ARGUMENT")
    assert "lse" in last_error()


@pytest.mark.parametrize(
    "fwd, needed",
    [(None, 0), ("grid", 0), ("v3+persistent", 0), ("+dynamic", 16), ("v3+dynamic", 16)],
)
def test_forward_workspace_holds_the_dynamic_schedules_counter(monkeypatch, fwd, needed):
    """Only the dynamic tile schedule (LONGFLASH_CUDA_FWD=...+dynamic) needs a forward workspace:
    its tile counter. The forward checks it before touching the device."""
    if fwd is None:
        monkeypatch.delenv("LONGFLASH_CUDA_FWD", raising=False)
    else:
        monkeypatch.setenv("LONGFLASH_CUDA_FWD", fwd)
    dqk, dv, dt = compiled_any()
    for causal in (0, 1):
        p = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt, window_right=0 if causal else -1)
        n = ctypes.c_size_t(7)
        assert lib.lf_attention_forward_workspace_size(ctypes.byref(p), ctypes.byref(n)) == 0
        assert n.value == needed
        if needed:
            assert forward(p) == status("LF_ERROR_WORKSPACE")
            assert "the call needs 16" in last_error()
            assert forward(p, ws=FAKE, ws_bytes=8) == status("LF_ERROR_WORKSPACE")
            assert forward(p, ws=FAKE + 4, ws_bytes=16) == status("LF_ERROR_WORKSPACE")
            assert "16-byte aligned" in last_error()
        # With what the query asked for, the call gets past every check: an empty batch then
        # returns before the device (the workspace is checked first), so this holds on a GPU
        # machine too, where a call with the fake pointers would launch.
        ws = FAKE if needed else None
        empty = params(
            head_dim_qk=dqk, head_dim_v=dv, dtype=dt, batch=0, window_right=p.window_right
        )
        assert forward(empty, ws=ws, ws_bytes=needed) == 0
        if needed:
            assert forward(empty) == status("LF_ERROR_WORKSPACE")


def test_error_message_is_per_thread_and_cleared_on_success():
    import threading

    dqk, dv, dt = compiled_any()
    bad = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt, heads_q=3)
    assert lib.lf_check_params(ctypes.byref(bad)) != 0
    seen = []
    t = threading.Thread(target=lambda: seen.append(last_error()))
    t.start()
    t.join()
    assert seen == [""]
    assert "multiple" in last_error()
    good = params(head_dim_qk=dqk, head_dim_v=dv, dtype=dt)
    assert lib.lf_check_params(ctypes.byref(good)) == 0
    assert last_error() == ""


def test_varlen_checks():
    dqk, dv, dt = compiled_any()
    p = params(
        head_dim_qk=dqk,
        head_dim_v=dv,
        dtype=dt,
        cu_seqlens_q=FAKE,
        cu_seqlens_k=FAKE,
        total_q=-1,
        total_k=10,
    )
    assert lib.lf_check_params(ctypes.byref(p)) == status("LF_ERROR_INVALID_ARGUMENT")
    assert "total_q" in last_error()
    p = params(
        head_dim_qk=dqk,
        head_dim_v=dv,
        dtype=dt,
        cu_seqlens_q=FAKE + 2,
        cu_seqlens_k=FAKE,
        total_q=10,
        total_k=10,
    )
    assert lib.lf_check_params(ctypes.byref(p)) == status("LF_ERROR_INVALID_ARGUMENT")
    assert "aligned" in last_error()
    # Varlen ignores batch_stride: with a junk one the tensor checks pass and the call gets as
    # far as the device check (only run where there is no usable device, the pointers are fake).
    if lib.lf_check_device(0) == _lib.LF_SUCCESS:
        return
    p = params(
        head_dim_qk=dqk,
        head_dim_v=dv,
        dtype=dt,
        cu_seqlens_q=FAKE,
        cu_seqlens_k=FAKE,
        total_q=10,
        total_k=12,
    )
    junk = _lib.Tensor(FAKE, -12345, p.heads_q * dqk, dqk)
    assert forward(p, q=junk) in (status("LF_ERROR_NO_DEVICE"), status("LF_ERROR_ARCH"))


def test_check_device_rejects_missing_device():
    got = lib.lf_check_device(10_000)
    assert got in (status("LF_ERROR_NO_DEVICE"), status("LF_ERROR_ARCH"))
    assert last_error()


def plan(p: _lib.Params) -> str | None:
    got = lib.lf_forward_plan(ctypes.byref(p))
    return None if got is None else got.decode()


@pytest.mark.parametrize(
    "d, n, window, varlen, want",
    [
        # hd64 from 4K queries: 192-query CTAs with three consumer warpgroups
        (64, 4096, (-1, -1), False, "v3-no-pingpong+persistent"),
        (64, 16384, (-1, -1), False, "v3-no-pingpong+persistent"),
        # causal: each warpgroup also skips the key blocks above its own rows
        (64, 4096, (-1, 0), False, "v3-ownkeys+persistent"),  # 32 blocks: static
        (64, 16384, (-1, 0), False, "v3-ownkeys+grid"),  # 128 blocks: per tile
        # below 4K, with a band or varlen: the 128-query CTA
        (64, 4095, (-1, -1), False, "v2+persistent"),
        (64, 1024, (-1, 0), False, "v2+persistent"),
        (64, 8192, (100, 0), False, "v2+grid"),
        (64, 8192, (-1, 50), False, "v2+grid"),
        (64, 8192, (-1, -1), True, "v2+grid"),
        # other head dims: always the 128-query CTA
        (128, 16384, (-1, -1), False, "v2+persistent"),
        (256, 16384, (-1, 0), False, "v2+grid"),
    ],
)
def test_forward_plan_by_shape(monkeypatch, d, n, window, varlen, want):
    """lf_forward_plan names the kernel and grid the forward would run, as the LONGFLASH_CUDA_FWD
    value that forces them; it answers for head dims this build left out too (CI builds hd128)."""
    monkeypatch.delenv("LONGFLASH_CUDA_FWD", raising=False)
    kw = dict(head_dim_qk=d, head_dim_v=d, seqlen_q=n, seqlen_k=n, batch=1)
    kw.update(window_left=window[0], window_right=window[1])
    if varlen:
        kw.update(cu_seqlens_q=FAKE, cu_seqlens_k=FAKE, total_q=2 * n, total_k=2 * n, batch=2)
    assert plan(params(**kw)) == want


@pytest.mark.parametrize(
    "env, d, want",
    [
        ("v2", 64, "v2+persistent"),
        ("v3", 64, "v3+persistent"),
        ("v3-no-pingpong+grid", 64, "v3-no-pingpong+grid"),
        # the dynamic schedule's longest-first groups: heads whose K/V fit in 8 MiB (4 query
        # heads share each K/V head here)
        ("+dynamic", 128, "v2+dynamic+g8"),
        ("+dynamic", 64, "v3-no-pingpong+dynamic+g16"),
        ("+dynamic", 256, "v2+dynamic+g4"),
        ("v3-no-pingpong+dynamic+g3", 64, "v3-no-pingpong+dynamic+g3"),
        ("+dynamic+g1", 128, "v2+dynamic+g1"),  # the head-major order
        ("v3+dynamic", 64, "v3+persistent"),  # ping-pong v3 has no dynamic schedule
        ("v3-emu", 128, "v2+persistent"),  # the v3 kernels exist at hd64 only
        ("v3-ownkeys+dynamic", 64, "v3-ownkeys+persistent"),  # no dynamic form either
        ("v3-ownkeys", 128, "v2+persistent"),
        ("default", 64, "v3-no-pingpong+persistent"),
        # the static schedule with its last tiles shared by key blocks
        ("+streamk", 128, "v2+streamk"),
        ("+streamk", 64, "v3-no-pingpong+streamk"),
        ("v2+streamk", 64, "v2+streamk"),
        ("v3+streamk", 64, "v3+persistent"),  # ping-pong v3 has no stream-K form
    ],
)
def test_forward_plan_follows_the_variable(monkeypatch, env, d, want):
    monkeypatch.setenv("LONGFLASH_CUDA_FWD", env)
    assert plan(params(head_dim_qk=d, head_dim_v=d, seqlen_q=8192, seqlen_k=8192)) == want


@pytest.mark.parametrize(
    "d, n, hq, want",
    [(64, 4096, 32, 8), (128, 4096, 16, 4), (256, 4096, 8, 2), (64, 16384, 32, 2),
     (128, 16384, 16, 1), (256, 16384, 8, 1), (64, 1024, 32, 32), (64, 256, 64, 64)],
)  # fmt: skip
def test_dynamic_schedule_groups_heads_whose_kv_fits_8mib(monkeypatch, d, n, hq, want):
    """At the bench grid's shapes (no GQA) a group holds 8 MiB of K/V, at least 1 head, at most
    64."""
    monkeypatch.setenv("LONGFLASH_CUDA_FWD", "+dynamic")
    p = params(head_dim_qk=d, head_dim_v=d, seqlen_q=n, seqlen_k=n, heads_q=hq, heads_k=hq)
    assert plan(p).endswith(f"+dynamic+g{want}")


@pytest.mark.parametrize("n", [4096, 16384])
def test_causal_hd64_on_the_dynamic_schedule_keeps_the_plain_kernel(monkeypatch, n):
    """v3-ownkeys, the hd64 causal default, has no dynamic form: "+dynamic" runs v3-no-pingpong
    on it rather than quietly dropping to the static schedule."""
    monkeypatch.setenv("LONGFLASH_CUDA_FWD", "+dynamic")
    p = params(head_dim_qk=64, head_dim_v=64, seqlen_q=n, seqlen_k=n, window_right=0)
    assert plan(p).startswith("v3-no-pingpong+dynamic+g")


@pytest.mark.parametrize(
    "window, varlen", [((-1, 0), False), ((100, 0), False), ((-1, 5), False), ((-1, -1), True)]
)
def test_stream_k_only_where_every_tile_costs_the_same(monkeypatch, window, varlen):
    """A band or varlen makes tiles unequal: "+streamk" then runs the static schedule it extends,
    and the forward asks for no workspace."""
    monkeypatch.setenv("LONGFLASH_CUDA_FWD", "+streamk")
    kw = dict(head_dim_qk=128, head_dim_v=128, seqlen_q=4096, seqlen_k=4096)
    kw.update(window_left=window[0], window_right=window[1])
    if varlen:
        kw.update(cu_seqlens_q=FAKE, cu_seqlens_k=FAKE, total_q=8192, total_k=8192, batch=2)
    p = params(**kw)
    assert plan(p) == "v2+persistent"
    n = ctypes.c_size_t(1)
    assert lib.lf_attention_forward_workspace_size(ctypes.byref(p), ctypes.byref(n)) == 0
    assert n.value == 0


@pytest.mark.parametrize("d, wgs", [(128, 2), (64, 3), (256, 2), (96, 2)])
def test_stream_k_workspace_holds_a_partial_per_cta_and_warpgroup(monkeypatch, d, wgs):
    """stream_k.h's size: a flag per (CTA, consumer warpgroup), 256-byte padded, then 128 threads'
    O accumulators (d / 2 floats) and two rows' max and sum, per (CTA, warpgroup), for as many
    CTAs as the device has SMs (1024 where no device answers)."""
    if (d, d) not in _lib.compiled_head_dims(lib)["bfloat16"]:
        pytest.skip(f"hd{d} is not in this build (CI builds hd128)")
    monkeypatch.setenv("LONGFLASH_CUDA_FWD", "+streamk")
    p = params(head_dim_qk=d, head_dim_v=d, seqlen_q=8192, seqlen_k=8192)
    n = ctypes.c_size_t(0)
    assert lib.lf_attention_forward_workspace_size(ctypes.byref(p), ctypes.byref(n)) == 0
    try:
        import torch

        sms = torch.cuda.get_device_properties(0).multi_processor_count
    except (ImportError, RuntimeError, AssertionError):
        sms = 1024
    flags = (sms * wgs * 4 + 255) // 256 * 256
    assert n.value == flags + sms * wgs * 128 * (d // 2 + 4) * 4


def test_forward_plan_of_bad_params_is_null():
    assert plan(params(heads_q=3, heads_k=2)) is None
    assert "multiple" in last_error()


def head_group(**kw) -> int:
    return lib.lf_backward_head_group(ctypes.byref(params(**kw)))


@pytest.mark.parametrize(
    "d, n, b, hq, hk, window, want",
    [
        # the bench grid (B·N = 16K, H·D = 2048) under a causal mask: groups of 4 pairs while
        # 4 pairs' Q, dO and fp32 dQ accumulator fit 64 MiB
        (64, 4096, 4, 32, 32, (-1, 0), 4),
        (128, 4096, 4, 16, 16, (-1, 0), 4),
        (128, 16384, 1, 16, 16, (-1, 0), 4),  # 16 MiB a pair: exactly 64 MiB
        (256, 4096, 4, 8, 8, (-1, 0), 4),
        (256, 16384, 1, 8, 8, (-1, 0), 0),  # 32 MiB a pair: head-major
        (128, 16384, 1, 16, 2, (-1, 0), 0),  # GQA: a pair holds 8 query heads
        (128, 4096, 4, 16, 16, (100, 50), 4),  # any band
        # no band: every key block costs the same, head-major
        (128, 4096, 4, 16, 16, (-1, -1), 0),
        (256, 1024, 16, 8, 8, (-1, -1), 0),
        # never more groups than pairs
        (128, 4096, 1, 3, 3, (-1, 0), 3),
        (128, 4096, 1, 1, 1, (-1, 0), 1),
    ],
)
def test_backward_head_group_by_shape(monkeypatch, d, n, b, hq, hk, window, want):
    """lf_backward_head_group: the backward's CTA order (api.cpp bwd_head_group), as the
    launcher uses it; it answers for head dims this build left out too."""
    monkeypatch.delenv("LONGFLASH_CUDA_BWD", raising=False)
    kw = dict(head_dim_qk=d, head_dim_v=d, seqlen_q=n, seqlen_k=n, batch=b)
    kw.update(heads_q=hq, heads_k=hk, window_left=window[0], window_right=window[1])
    assert head_group(**kw) == want


@pytest.mark.parametrize(
    "env, want",
    [
        ("default+heads", 0),
        ("v7+group8", 8),
        ("+group2", 2),
        ("v2+group0", 0),
        ("+group1000", 32),  # at most 32 (key blocks x G within gridDim.x)
        ("+group-3", 0),
        ("v7", 0),  # no suffix: by shape (no band here)
    ],
)
def test_backward_head_group_follows_the_variable(monkeypatch, env, want):
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", env)
    assert head_group(batch=16, heads_q=8, heads_k=8, seqlen_q=4096, seqlen_k=4096) == want


def test_backward_head_group_keeps_grid_y_in_range(monkeypatch):
    """More than 65535 groups would overflow gridDim.y: head-major instead."""
    monkeypatch.setenv("LONGFLASH_CUDA_BWD", "+group4")
    many = dict(heads_q=8, heads_k=8, seqlen_q=64, seqlen_k=64)
    assert head_group(batch=32767, **many) == 4  # 65534 groups of 4 pairs
    assert head_group(batch=32768, **many) == 0  # 65536
    assert head_group(heads_q=3, heads_k=2) == -1  # invalid params
