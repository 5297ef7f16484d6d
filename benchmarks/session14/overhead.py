"""Session 14: does `longflash bench` time the cuda forward below cuda_fwd_ab.py because of the
API? Times the API call, the backend's raw op and SDPA flash with and without the bench's L2 flush,
lists the kernels one API call launches, and the CPU time per call. Run as heat.py."""

import json
import os
import time
from functools import partial

import torch
from _probe import api, grid_inputs, sdpa
from longflash.bench.torch_harness import TorchHarness
from longflash.frontends import torch as lft
from longflash_cuda import _torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

harnesses = {
    "flush": TorchHarness("cuda", l2_flush=True),
    "noflush": TorchHarness("cuda", l2_flush=False),
}
rows = []
for d, n, causal in ((128, 4096, False), (64, 4096, True), (128, 16384, False)):
    (q, k, v), (qt, kt, vt), b, h = grid_inputs(d, n)
    call = lft.make_call(q, k, v, causal=causal)
    fns = {
        "api": api(q, k, v, causal),
        "raw": partial(_torch.forward, call, q, k, v),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt, causal),
    }
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    row = {"D": d, "N": n, "causal": causal}
    with torch.no_grad():
        for _ in range(2):
            for name, fn in fns.items():
                for tag, harness in harnesses.items():
                    t = harness._time(fn).median_ms
                    row.setdefault(f"{name}_{tag}", []).append(round(flops / t / 1e9, 1))
        for name, fn in fns.items():  # CPU cost per call with the GPU kept busy
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            row[f"{name}_cpu_us"] = round((t1 - t0) / 50 * 1e6, 1)
            row[f"{name}_wall_us"] = round((time.perf_counter() - t0) / 50 * 1e6, 1)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fns["api"]()
            torch.cuda.synchronize()
        row["api_kernels"] = [
            (e.key[:90], e.count, round(e.device_time_total / e.count, 1))
            for e in prof.key_averages()
            if e.device_time_total > 0
        ]
    print(json.dumps(row), flush=True)
    rows.append(row)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "overhead.json"), "w"), indent=1)
