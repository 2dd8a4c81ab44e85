"""Bare gloo baseline for the ``allreduce`` and ``collectives`` rows of ``benchmarks/run.py``.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/gloo_baseline.py \\
        --sizes 4194304 262144 --reps 20 --warmup 5 [--ops all_reduce all_gather broadcast]

float32 tensors of each size (bytes), ``torch.set_num_threads(1)``, on the default gloo group:
SUM ``all_reduce``, ``all_gather`` into one tensor per rank, ``broadcast`` from rank 0. Per op
and size: ``--warmup`` untimed calls, then ``--reps`` timed calls, each
preceded by ``dist.barrier()``. Each rank takes its median; the figure is the slowest rank's
median (the way the server's ``neural_performance_benchmark`` reports its collectives). Also
reported: the median over repetitions of the slowest rank's time per repetition. Rank 0 prints
one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.priority import autogroup_at_own_nice  # noqa: E402

OPS = ("all_reduce", "all_gather", "broadcast")


def collective(op: str, world: int):  # type: ignore[no-untyped-def]
    """One call of ``op`` on tensor ``t`` (the output buffers of all_gather made once, outside the timer)."""
    if op == "all_reduce":
        return lambda t: dist.all_reduce(t)
    if op == "broadcast":
        return lambda t: dist.broadcast(t, src=0)
    bufs: dict[int, list[torch.Tensor]] = {}

    def gather(t: torch.Tensor) -> None:
        out = bufs.setdefault(t.numel(), [torch.empty_like(t) for _ in range(world)])
        dist.all_gather(out, t)
    return gather


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4 << 20, 256 << 10], help="bytes per tensor")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ops", nargs="+", choices=OPS, default=["all_reduce"])
    args = ap.parse_args()

    autogroup_at_own_nice()  # torchrun gave this rank an autogroup of its own, at nice 0
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for op in args.ops:
        run = collective(op, world)
        for size in args.sizes:
            t = torch.ones(max(1, size // 4), dtype=torch.float32)
            for _ in range(args.warmup):
                run(t)
            times = []
            for _ in range(args.reps):
                dist.barrier()
                t0 = time.perf_counter()
                run(t)
                times.append((time.perf_counter() - t0) * 1000)
            per_rank: list = [None] * world
            dist.all_gather_object(per_rank, times)
            medians = [statistics.median(x) for x in per_rank]
            slowest_per_rep = [max(x[i] for x in per_rank) for i in range(args.reps)]
            nbytes = t.numel() * 4
            slowest = max(medians)
            results.append({
                "op": op, "bytes": nbytes, "time_ms": slowest, "rank_medians_ms": medians,
                "median_of_slowest_per_rep_ms": statistics.median(slowest_per_rep),
                "min_ms": min(min(x) for x in per_rank),
                "algbw_mbps": nbytes * 8 / (slowest / 1000) / 1e6,
            })
    if rank == 0:
        sys.stdout.write(json.dumps({"world_size": world, "reps": args.reps, "warmup": args.warmup,
                                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                                     "results": results}) + "\n")
        sys.stdout.flush()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with torch 2.13 a DDP process sometimes aborts there
    # ("terminate called without an active exception", SIGABRT) after all work is done and the
    # group is destroyed, which torchrun would report as a failed run.
    os._exit(code)
