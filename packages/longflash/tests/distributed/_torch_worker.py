"""One rank of a gloo world for the distributed tests: python _torch_worker.py RANK WORLD DIR.

Reads DIR/cases.pt (global inputs and arguments, written by the test), runs each case on
this rank's shard with autograd, and writes DIR/rank{RANK}.pt: the shard's out, lse and
gradients, the number of collectives each pass issued, or the error a case raised.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import longflash.distributed as lfd
import torch
import torch.distributed as dist


class Counter:
    """Counts the collectives this process issues, by wrapping torch.distributed."""

    def __init__(self) -> None:
        self.p2p_batches: list[int] = []  # ops per batch_isend_irecv call
        self.all_to_all = 0
        orig_batch, orig_a2a = dist.batch_isend_irecv, dist.all_to_all_single

        def batch(ops):
            self.p2p_batches.append(len(ops))
            return orig_batch(ops)

        def a2a(*args, **kwargs):
            self.all_to_all += 1
            return orig_a2a(*args, **kwargs)

        dist.batch_isend_irecv = batch
        dist.all_to_all_single = a2a

    def take(self) -> dict:
        out = {"p2p_batches": list(self.p2p_batches), "all_to_all": self.all_to_all}
        self.p2p_batches.clear()
        self.all_to_all = 0
        return out


def run_case(case: dict, rank: int, world: int, counter: Counter) -> dict:
    layout = case["layout"]
    fn = lfd.ring_attention if case["fn"] == "ring" else lfd.ulysses_attention
    kwargs = dict(case["kwargs"])
    if case["fn"] == "ring":
        kwargs["layout"] = layout
    q, k, v = (
        lfd.shard_sequence(case[n], rank, world, layout).requires_grad_() for n in ("q", "k", "v")
    )
    dout = lfd.shard_sequence(case["dout"], rank, world, layout)
    counter.take()
    try:
        out, lse = fn(q, k, v, return_lse=True, **kwargs)
    except (ValueError, TypeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    fwd = counter.take()
    (out * dout).sum().backward()
    bwd = counter.take()
    return {
        "out": out.detach(),
        "lse": lse,
        "dq": q.grad,
        "dk": k.grad,
        "dv": v.grad,
        "out_requires_grad": out.requires_grad,
        "fwd": fwd,
        "bwd": bwd,
    }


def main() -> None:
    rank, world, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group(
        "gloo",
        init_method=f"file://{where}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    torch.set_num_threads(1)  # P processes share the machine's few cores
    counter = Counter()
    cases = torch.load(f"{where}/cases.pt")
    results = {name: run_case(case, rank, world, counter) for name, case in cases.items()}
    torch.save(results, f"{where}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
