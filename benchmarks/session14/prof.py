"""Session 14: where the torch front-end's CPU time per call goes on the GPU machine (fwd causal
hd256 1K, the bench's shortest call): the API against the backend's raw op, each step alone, and a
cProfile of 300 API calls. Run as heat.py."""

import cProfile
import ctypes
import io
import pstats
import time

import longflash
import torch
from longflash.frontends import torch as lft
from longflash.registry import REGISTRY
from longflash_cuda import _lib, _torch, make_params

b, n, h, d = 16, 1024, 8, 256
q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
call = lft.make_call(q, k, v, causal=True)
lib, _ = _lib.load()
params = make_params(call)


def timeit(name, fn, reps=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    dt = (time.perf_counter() - t) / reps * 1e6
    torch.cuda.synchronize()
    print(f"{name:40s} {dt:8.1f} us", flush=True)


def device_context():
    with torch.cuda.device(q.device):
        pass


def workspace_query():
    size = ctypes.c_size_t(0)
    lib.lf_attention_forward_workspace_size(ctypes.byref(params), ctypes.byref(size))


with torch.no_grad():
    timeit("api", lambda: longflash.attention(q, k, v, causal=True, backend="cuda"), 500)
    timeit("raw _torch.forward", lambda: _torch.forward(call, q, k, v), 500)
    timeit("make_call", lambda: lft.make_call(q, k, v, causal=True))
    timeit("torch.empty cuda", lambda: torch.empty((b, n, h, d), dtype=q.dtype, device=q.device))
    timeit("with torch.cuda.device", device_context)
    timeit("current_stream", lambda: torch.cuda.current_stream(q.device).cuda_stream)
    timeit("make_params", lambda: make_params(call))
    timeit("_usable x3", lambda: (_torch._usable(q), _torch._usable(k), _torch._usable(v)))
    timeit("workspace query", workspace_query)
    timeit("lf_check_params", lambda: lib.lf_check_params(ctypes.byref(params)))
    timeit("REGISTRY.select", lambda: REGISTRY.select(call, "cuda"))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(300):
        longflash.attention(q, k, v, causal=True, backend="cuda")
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue()[:6000])
