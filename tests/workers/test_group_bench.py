"""The nodes' collective benchmark (``workers.group.bench_collectives``) in a real two-process gloo
group: every asked op, topology and size comes back timed, and the tensors really travelled (a
broadcast leaves rank 0's values on rank 1, an all-gather holds both ranks' rows)."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError

from workers.protocol import CollectiveBenchRequest, GroupInfo

WORLD = 2
SIZES = [4 << 10, 64 << 10]
RUN_TIMEOUT_S = 120.0


def _worker(rank: int, port: int, outdir: str) -> None:
    from workers.comm import TopologyReducer
    from workers.group import _collective_call, bench_collectives

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    req = CollectiveBenchRequest(generation=1, topologies=["mesh", "ring"], sizes_bytes=SIZES, reps=3, warmup=1,
                                 ops=["all_reduce", "all_gather", "broadcast"])
    me = GroupInfo(generation=1, rank=rank, world_size=WORLD, backend="gloo")
    timings = [t.model_dump() for t in bench_collectives(me, req)]
    reducer = TopologyReducer("mesh")
    sent = torch.full((4,), float(rank + 1))
    _collective_call(reducer, "broadcast")(sent)
    table = _collective_call(reducer, "all_gather")(torch.full((4,), float(rank + 1)))
    (Path(outdir) / f"rank{rank}.json").write_text(json.dumps({
        "timings": timings, "broadcast": sent.tolist(), "gathered": table.tolist()}))
    dist.barrier()
    dist.destroy_process_group()


def test_bench_collectives_times_every_op_and_moves_the_data(tmp_path: Path) -> None:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    ctx = mp.start_processes(_worker, args=(store.port, str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not ctx.join(timeout=0.5):
            assert time.monotonic() < deadline, f"the benchmark did not finish within {RUN_TIMEOUT_S:.0f} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for got in ranks:
        keys = {(t["topology"], t["op"], t["bytes"]) for t in got["timings"]}
        ops = ("all_reduce", "all_gather", "broadcast")
        assert keys == {(topo, op, size) for topo in ("mesh", "ring") for op in ops for size in SIZES}
        assert all(0 < t["min_ms"] <= t["median_ms"] for t in got["timings"])
        assert got["broadcast"] == [1.0] * 4  # rank 0's values
        assert got["gathered"] == [[1.0] * 4, [2.0] * 4]


def test_bench_request_refuses_an_unknown_op_and_oversized_messages() -> None:
    with pytest.raises(ValidationError, match="all_reduce"):
        CollectiveBenchRequest(generation=1, ops=["reduce_scatter"])
    with pytest.raises(ValidationError, match="less than or equal"):
        CollectiveBenchRequest(generation=1, sizes_bytes=[1 << 30])
