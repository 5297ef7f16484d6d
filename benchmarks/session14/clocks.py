"""Session 14: the same forward call timed by CUPTI (torch.profiler) and by CUDA events, after a
second of idle, during 200 back-to-back calls and right after, with the SM clock sampled: is the
gap between cuda_breakdown.py's kernel rates and the bench's event rates the clock?
Run as heat.py."""

import json
import os
import time

import longflash
import torch
from _probe import ClockSampler
from torch.profiler import ProfilerActivity, profile

clock = ClockSampler(period_s=0.05)
b, n, h, d = 1, 16384, 16, 128
q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
flops = 4 * b * h * n * n * d
out = {}
with torch.no_grad():
    for phase, reps in (("cold3", 3), ("sustained200", 200), ("after3", 3)):
        if phase == "cold3":
            torch.cuda.synchronize()
            time.sleep(1.0)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        t0 = time.time()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for s, e in zip(starts, ends):
                s.record()
                longflash.attention(q, k, v, backend="cuda")
                e.record()
            torch.cuda.synchronize()
        ev = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
        kernel = [
            x.device_time_total / x.count / 1e3
            for x in prof.key_averages()
            if "fwd_kernel" in x.key
        ]
        out[phase] = {
            "event_ms_median": ev[len(ev) // 2],
            "event_ms_min": ev[0],
            "cupti_ms_mean": kernel[0] if kernel else None,
            "event_tflops": flops / ev[len(ev) // 2] / 1e9,
            "t0": t0,
            "t1": time.time(),
        }
        print(phase, out[phase], flush=True)
out["clock_samples"] = clock.samples
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "clocks.json"), "w"), indent=1)
