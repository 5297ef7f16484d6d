"""Session 14: bench ratios when every contender is timed after the bench's 50 ms warm-up and after
~1 s of the same call (the GPU at its steady clock), with the SM clock sampled at the end of each
timing. Run on the GPU machine with the cuda backend registered:

    LONGFLASH_BACKENDS=cuda=longflash_cuda:backend python benchmarks/session14/heat.py
"""

import json
import os
import statistics
import time

import torch
from _probe import ClockSampler, api, grid_inputs, sdpa
from longflash.bench.timing import TimingPolicy
from longflash.bench.torch_harness import TorchHarness
from torch.nn.attention import SDPBackend

clock = ClockSampler()
harness = TorchHarness("cuda", l2_flush=True)
policies = {"bench": harness.policy, "warm1s": TimingPolicy(1000.0, 250.0, 5, 1000, None, 3)}
rows = []
for d, n, causal in ((128, 4096, False), (64, 4096, True), (128, 16384, False)):
    (q, k, v), (qt, kt, vt), b, h = grid_inputs(d, n)
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    fns = {
        "cuda": api(q, k, v, causal),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION, qt, kt, vt, causal),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, causal),
    }
    names, res = list(fns), {}
    with torch.no_grad():
        for rnd in range(3):
            for pname, pol in policies.items():
                for name in names[rnd % 3 :] + names[: rnd % 3]:
                    harness.policy = pol
                    time.sleep(0.3)  # the bench's gap between contenders (check, allocation)
                    t = harness._time(fns[name]).median_ms
                    end = time.time()
                    res.setdefault((pname, name), []).append(
                        (flops / t / 1e9, clock.median_clock(end - 0.3, end))
                    )
    row = {"D": d, "N": n, "causal": causal}
    for (pname, name), v in res.items():
        row[f"{pname}:{name}"] = {
            "tflops": round(statistics.median(x[0] for x in v), 1),
            "all": [round(x[0]) for x in v],
            "clock_end": [x[1] for x in v],
        }
    for pname in policies:
        for peer in ("flash", "cudnn"):
            ours, theirs = row[f"{pname}:cuda"]["tflops"], row[f"{pname}:{peer}"]["tflops"]
            row[f"{pname}:cuda/{peer}"] = round(ours / theirs, 3)
    print(json.dumps(row), flush=True)
    rows.append(row)
out = os.path.join(os.environ.get("OUT", "."), "heat.json")
json.dump({"rows": rows, "clock_samples": clock.samples}, open(out, "w"))
