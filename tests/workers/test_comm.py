"""Tests for workers.comm: topology all-reduce and DDP communication hooks.

The distributed checks run in real gloo process groups: one spawned run per world size
(2, 3, 4) does every check inside it and saves what it measured; the tests below assert on
those results. The test process hosts the TCPStore (127.0.0.1, port 0) each run joins.
"""

from __future__ import annotations

import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import workers.comm  # noqa: F401
except ImportError:  # run from elsewhere than the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from workers.comm import (  # noqa: E402
    TOPOLOGIES,
    TopologyReducer,
    _topk_pack,
    hierarchy_groups,
    make_ddp_hook,
)

SIZES = (1, 2, 3, 7, 1001, 30011)
PER_RANK = 8  # samples per rank in the DDP checks
DDP_STEPS = 5
TOPK_STEPS = 40
RUN_TIMEOUT_S = 80.0
PG_TIMEOUT = timedelta(seconds=30)


# ----------------------------------------------------------------------------- helpers


def _data(rank: int, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * size + 17 * rank + 1)
    return torch.randn(size, generator=g, dtype=torch.float64).to(dtype)


def _true_mean(ranks: list[int], size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.stack([_data(r, size, dtype).double() for r in ranks]).mean(0)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 10), nn.Tanh(), nn.Linear(10, 3))


def _problem(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(world * PER_RANK, 20, generator=g)
    teacher = torch.randn(20, 3, generator=g) / math.sqrt(20)
    return x, torch.tanh(x @ teacher) * 2.0


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _train_local(world: int, steps: int, lr: float = 0.1) -> torch.Tensor:
    model = _model()
    x, y = _problem(world)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return _flat_params(model)


def _train_ddp(
    reducer: TopologyReducer, compression: float | None, rank: int, world: int, steps: int, lr: float = 0.1
) -> dict[str, Any]:
    model = _model()
    x, y = _problem(world)
    with torch.no_grad():
        full_loss_before = float(F.mse_loss(model(x), y))
    xs, ys = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
    # Tiny buckets: several buckets per step, so the queue order and per-bucket state matter.
    ddp = DDP(model, process_group=reducer.group, bucket_cap_mb_list=[0.0001] * 4)
    state, hook = make_ddp_hook(reducer, compression)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    try:
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(ddp(xs), ys).backward()
            opt.step()
    finally:
        state.close()
    with torch.no_grad():
        full_loss_after = float(F.mse_loss(model(x), y))
    return {
        "params": _flat_params(model),
        "stats": state.stats(),
        "loss_before": full_loss_before,
        "loss_after": full_loss_after,
    }


# ----------------------------------------------------------------------------- spawned worker


def _check_allreduce(reducers: dict[str, TopologyReducer], world: int) -> list[dict[str, Any]]:
    out = []
    ranks = list(range(world))
    me = dist.get_rank()
    for size in SIZES:
        mesh_result = None
        for topo in TOPOLOGIES:
            red = reducers[topo]
            for dtype in (torch.float32, torch.float64) if size == 1001 else (torch.float32,):
                x = _data(me, size, dtype)
                ptr = x.data_ptr()
                before = (red.bytes_sent, red.bytes_received)
                y = red.allreduce_mean(x)
                plan = red.dense_bytes_for(size, x.element_size())
                if topo == "mesh" and dtype == torch.float32:
                    mesh_result = y.clone()
                out.append(
                    {
                        "topology": topo,
                        "size": size,
                        "dtype": str(dtype),
                        "rel_err": _rel_err(y, _true_mean(ranks, size, dtype)),
                        "rel_vs_mesh": _rel_err(y, mesh_result.double()) if dtype == torch.float32 else 0.0,
                        "in_place": y is x and y.data_ptr() == ptr,
                        "sent": red.bytes_sent - before[0],
                        "received": red.bytes_received - before[1],
                        "plan": plan,
                        "result": y.clone() if size <= 1001 else y[:1001].clone(),
                    }
                )
    # a non-contiguous 2-D tensor
    for topo in TOPOLOGIES:
        x = _data(me, 35).view(5, 7).t()
        y = reducers[topo].allreduce_mean(x)
        want = _true_mean(ranks, 35).view(5, 7).t()
        out.append(
            {
                "topology": topo,
                "size": 35,
                "dtype": "float32 non-contiguous",
                "rel_err": _rel_err(y, want),
                "rel_vs_mesh": 0.0,
                "in_place": y is x,
                "sent": 0,
                "received": 0,
                "plan": (0, 0),
                "result": y.clone().reshape(-1),
            }
        )
    return out


def _check_allgather(reducers: dict[str, TopologyReducer], world: int) -> list[dict[str, Any]]:
    out = []
    me = dist.get_rank()
    for topo in TOPOLOGIES:
        red = reducers[topo]
        for size, dtype in ((1, torch.float32), (333, torch.float32), (37, torch.uint8)):
            x = (_data(me, size) * 50).abs().to(dtype)
            want = torch.stack([(_data(r, size) * 50).abs().to(dtype) for r in range(world)])
            before = (red.bytes_sent, red.bytes_received)
            table = red.allgather(x)
            out.append(
                {
                    "topology": topo,
                    "size": size,
                    "equal": bool(torch.equal(table, want)),
                    "sent": red.bytes_sent - before[0],
                    "received": red.bytes_received - before[1],
                    "plan": red.gather_bytes_for(size, x.element_size()),
                }
            )
    return out


def _subset_specs(world: int) -> list[dict[str, Any]]:
    if world == 2:
        return [{"ranks": [1], "hub": None, "group_size": None}]
    if world == 3:
        return [{"ranks": [2, 0], "hub": 0, "group_size": None}]
    return [
        {"ranks": [3, 1, 2], "hub": 2, "group_size": None},  # clusters [[3, 1], [2]]
        {"ranks": [0, 1, 2, 3], "hub": 3, "group_size": 1},  # every rank its own leader
    ]


def _check_subsets(world: int) -> list[dict[str, Any]]:
    me = dist.get_rank()
    out = []
    for spec in _subset_specs(world):
        for topo in TOPOLOGIES:
            red = TopologyReducer(topo, ranks=spec["ranks"], hub=spec["hub"], group_size=spec["group_size"])
            rec: dict[str, Any] = {"topology": topo, "ranks": spec["ranks"], "member": red.is_member}
            size = 101
            if red.is_member:
                y = red.allreduce_mean(_data(me, size))
                rec["rel_err"] = _rel_err(y, _true_mean(spec["ranks"], size))
                table = red.allgather(_data(me, 5))
                rec["gather_ok"] = bool(torch.equal(table, torch.stack([_data(r, 5) for r in spec["ranks"]])))
            else:
                try:
                    red.allreduce_mean(_data(me, size))
                    rec["refused"] = False
                except RuntimeError:
                    rec["refused"] = True
            out.append(rec)
    dist.barrier()
    return out


def _check_ring_volume(reducers: dict[str, TopologyReducer], world: int) -> dict[str, Any]:
    red = reducers["ring"]
    n = 300_001
    x = _data(dist.get_rank(), n)
    before = (red.bytes_sent, red.bytes_received, red.comm_seconds)
    red.allreduce_mean(x)
    return {
        "sent": red.bytes_sent - before[0],
        "received": red.bytes_received - before[1],
        "seconds": red.comm_seconds - before[2],
        "expected": 2 * (world - 1) / world * n * 4,
    }


def _check_ddp(reducers: dict[str, TopologyReducer], rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"local": _train_local(world, DDP_STEPS)}
    for topo in TOPOLOGIES:
        out[(topo, None)] = _train_ddp(reducers[topo], None, rank, world, DDP_STEPS)
        out[(topo, 1.0)] = _train_ddp(reducers[topo], 1.0, rank, world, DDP_STEPS)
    if world <= 3:
        for topo in TOPOLOGIES:
            out[(topo, 0.1)] = _train_ddp(reducers[topo], 0.1, rank, world, TOPK_STEPS)
    return out


def _peer_failure(rank: int, outdir: Path) -> None:
    """Rank 1 dies before a backward pass; rank 0's backward must raise, not hang."""
    red = TopologyReducer("ring", timeout=timedelta(seconds=10))
    model = _model()
    x, y = _problem(2)
    ddp = DDP(model, process_group=red.group)
    state, hook = make_ddp_hook(red)
    ddp.register_comm_hook(state, hook)
    F.mse_loss(ddp(x), y).backward()  # one healthy step
    dist.barrier()
    if rank == 1:
        os._exit(0)
    time.sleep(0.3)
    start = time.perf_counter()
    try:
        F.mse_loss(ddp(x), y).backward()
        outcome = "no error"
    except Exception as exc:  # what a training loop would see
        outcome = f"{type(exc).__name__}: {exc}"
    torch.save({"error": outcome, "seconds": time.perf_counter() - start}, outdir / "failure.pt")
    state.close(timeout=5)
    os._exit(0)  # the group is broken; skip its teardown


def _worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    out = Path(outdir)
    base = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=PG_TIMEOUT)
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(f"comm/w{world}", base), rank=rank, world_size=world, timeout=PG_TIMEOUT
    )
    timings: dict[str, float] = {}
    start = time.perf_counter()
    reducers = {topo: TopologyReducer(topo) for topo in TOPOLOGIES}
    res: dict[str, Any] = {
        "hier_clusters": reducers["hierarchical"].clusters,
        "allreduce": _check_allreduce(reducers, world),
    }
    timings["allreduce"] = time.perf_counter() - start
    res["allgather"] = _check_allgather(reducers, world)
    res["subsets"] = _check_subsets(world)
    res["ring_volume"] = _check_ring_volume(reducers, world)
    timings["before_ddp"] = time.perf_counter() - start
    res["ddp"] = _check_ddp(reducers, rank, world)
    timings["total"] = time.perf_counter() - start
    res["timings"] = timings
    torch.save(res, out / f"rank{rank}.pt")
    dist.barrier()
    if world == 2:
        _peer_failure(rank, out)
    dist.destroy_process_group()


_RUNS: dict[int, tuple[bool, Any]] = {}


def _spawn(world: int, outdir: Path) -> dict[str, Any]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    ctx = mp.start_processes(
        _worker, args=(world, store.port, str(outdir)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"world {world} run did not finish within {RUN_TIMEOUT_S:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    ranks = [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(world)]
    failure = outdir / "failure.pt"
    return {"ranks": ranks, "failure": torch.load(failure, weights_only=True) if failure.exists() else None}


def _run(world: int, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if world not in _RUNS:
        try:
            _RUNS[world] = (True, _spawn(world, tmp_path_factory.mktemp(f"comm_w{world}")))
        except Exception as exc:
            _RUNS[world] = (False, exc)
    ok, value = _RUNS[world]
    if not ok:
        raise value
    return value


WORLDS = pytest.mark.parametrize("world", [2, 3, 4])


# ----------------------------------------------------------------------------- in-process tests


def test_hierarchy_groups() -> None:
    assert hierarchy_groups([0]) == [[0]]
    assert hierarchy_groups([0, 1]) == [[0, 1]]
    assert hierarchy_groups([0, 1, 2]) == [[0, 1], [2]]
    assert hierarchy_groups([0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert hierarchy_groups(list(range(5))) == [[0, 1, 2], [3, 4]]
    assert hierarchy_groups(list(range(9))) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert hierarchy_groups([3, 1, 2]) == [[3, 1], [2]]
    assert hierarchy_groups([0, 1, 2, 3], group_size=1) == [[0], [1], [2], [3]]
    assert hierarchy_groups([0, 1, 2, 3], group_size=10) == [[0, 1, 2, 3]]
    assert hierarchy_groups(list(range(7)), group_size=3) == [[0, 1, 2], [3, 4], [5, 6]]
    for n in range(1, 20):
        groups = hierarchy_groups(list(range(n)))
        assert [r for g in groups for r in g] == list(range(n))
        assert max(map(len, groups)) - min(map(len, groups)) <= 1
    with pytest.raises(ValueError):
        hierarchy_groups([])
    with pytest.raises(ValueError):
        hierarchy_groups([0, 1], group_size=0)


def test_reducer_needs_valid_topology_and_group() -> None:
    with pytest.raises(ValueError, match="unknown topology"):
        TopologyReducer("torus")  # type: ignore[arg-type]
    if dist.is_initialized():
        pytest.skip("another test left a process group in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        TopologyReducer("ring")


class _FakeReducer:
    topology = "ring"
    size = 2
    rank = 0

    def __init__(self, fail_on: int | None = None) -> None:
        self.seen: list[float] = []
        self.fail_on = fail_on

    def dense_bytes_for(self, numel: int, element_size: int = 4) -> tuple[int, int]:
        return numel * element_size, numel * element_size

    def allreduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        time.sleep(0.01)
        if self.fail_on is not None and len(self.seen) == self.fail_on:
            raise RuntimeError("Connection closed by peer")
        self.seen.append(float(t[0]))
        return t.mul_(2)


class _FakeBucket:
    def __init__(self, index: int, buf: torch.Tensor) -> None:
        self._index, self._buf = index, buf

    def buffer(self) -> torch.Tensor:
        return self._buf

    def index(self) -> int:
        return self._index


def test_thread_hook_runs_buckets_in_order_and_surfaces_errors() -> None:
    red = _FakeReducer()
    state, hook = make_ddp_hook(red)  # type: ignore[arg-type]
    futs = [hook(state, _FakeBucket(i, torch.full((4,), float(i)))) for i in range(5)]
    assert [float(f.wait()[0]) for f in futs] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert red.seen == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert state.stats()["dense_bytes"] == 5 * 16 and state.stats()["bytes_saved"] == 0
    state.close()
    with pytest.raises(RuntimeError, match="closed"):
        hook(state, _FakeBucket(0, torch.ones(4))).wait()

    red = _FakeReducer(fail_on=1)
    state, hook = make_ddp_hook(red)  # type: ignore[arg-type]
    futs = [hook(state, _FakeBucket(i, torch.full((4,), float(i)))) for i in range(3)]
    assert float(futs[0].wait()[0]) == 0.0
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        futs[1].wait()
    with pytest.raises(RuntimeError, match="earlier failure"):
        futs[2].wait()
    state.close()


def test_make_ddp_hook_validates_compression() -> None:
    for bad in (0, 0.0, -0.5, 1.5, True, "0.1"):
        with pytest.raises(ValueError):
            make_ddp_hook(_FakeReducer(), bad)  # type: ignore[arg-type]


def test_topk_error_feedback() -> None:
    state, _ = make_ddp_hook(_FakeReducer(), 0.25)  # type: ignore[arg-type]
    g = torch.tensor([0.1, -4.0, 0.3, 2.0, -0.2, 0.05, 1.0, -0.6])
    bucket = _FakeBucket(0, g.clone())
    packed, k, idx_dtype = _topk_pack(state, bucket, bucket.buffer(), 0.25)
    assert k == 2 and packed.dtype == torch.uint8 and packed.numel() == k * (4 + 4)
    values = packed[: 4 * k].clone().view(torch.float32)
    idx = packed[4 * k :].clone().view(idx_dtype).long()
    assert sorted(idx.tolist()) == [1, 3]
    contributed = torch.zeros(8).index_add_(0, idx, values)
    residual = state.residuals[("bucket", 0, 8)]
    assert torch.equal(contributed + residual, g)  # nothing lost
    # next step: residual is added before selecting
    packed, k, _ = _topk_pack(state, bucket, torch.zeros(8), 0.25)
    idx = packed[4 * k :].clone().view(idx_dtype).long()
    assert sorted(idx.tolist()) == [6, 7]  # 1.0 and -0.6 were left over


class _ParamBucket(_FakeBucket):
    def __init__(self, index: int, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        super().__init__(index, torch.cat(grads))
        self._params = params

    def parameters(self) -> list[torch.Tensor]:
        return self._params


def test_topk_residual_follows_parameters_across_bucket_rebuilds() -> None:
    state, _ = make_ddp_hook(_FakeReducer(), 0.2)  # type: ignore[arg-type]
    a, b = torch.zeros(3), torch.zeros(7)
    ga = torch.tensor([5.0, 0.5, -0.25])
    gb = torch.tensor([0.1, -6.0, 0.2, 0.3, -0.4, 0.7, 0.05])
    bucket = _ParamBucket(0, [a, b], [ga, gb])  # k = 2 of 10: keeps 5.0 and -6.0
    _topk_pack(state, bucket, bucket.buffer(), 0.2)
    assert torch.equal(state.residuals[("param", id(a))], torch.tensor([0.0, 0.5, -0.25]))
    assert torch.equal(state.residuals[("param", id(b))], gb * torch.tensor([1, 0, 1, 1, 1, 1, 1.0]))
    # DDP rebuilt its buckets: b alone in bucket 0, a alone in bucket 1; residuals carry over
    bucket_b = _ParamBucket(0, [b], [torch.zeros(7)])
    packed, k, idx_dtype = _topk_pack(state, bucket_b, bucket_b.buffer(), 0.2)
    values = packed[: 4 * k].clone().view(torch.float32)
    assert k == 1 and float(values[0]) == pytest.approx(0.7)


# ----------------------------------------------------------------------------- distributed tests


@WORLDS
def test_allreduce_mean_equals_true_mean(world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _run(world, tmp_path_factory)
    for rank, res in enumerate(run["ranks"]):
        assert len(res["allreduce"]) == len(SIZES) * len(TOPOLOGIES) + len(TOPOLOGIES) * 2
        for rec in res["allreduce"]:
            where = f"world {world} rank {rank} {rec['topology']} size {rec['size']} {rec['dtype']}"
            assert rec["rel_err"] <= 1e-5, where
            assert rec["rel_vs_mesh"] <= 1e-5, where
            assert rec["in_place"], where
    # every rank holds bit-identical averages
    for i, rec in enumerate(run["ranks"][0]["allreduce"]):
        for res in run["ranks"][1:]:
            assert torch.equal(res["allreduce"][i]["result"], rec["result"]), rec["topology"]


@WORLDS
def test_byte_counters_match_the_exchange(world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _run(world, tmp_path_factory)
    for res in run["ranks"]:
        for rec in res["allreduce"]:
            if rec["dtype"].endswith("non-contiguous"):
                continue
            assert (rec["sent"], rec["received"]) == rec["plan"], rec["topology"]
            if rec["topology"] in ("ring", "star") and rec["size"] >= world:
                assert rec["sent"] > 0
        for rec in res["allgather"]:
            assert (rec["sent"], rec["received"]) == rec["plan"], rec["topology"]
    # total bytes sent == total bytes received over all ranks, for the exactly counted topologies
    for topo in ("ring", "star"):
        sent = sum(r["sent"] for res in run["ranks"] for r in res["allreduce"] if r["topology"] == topo)
        received = sum(r["received"] for res in run["ranks"] for r in res["allreduce"] if r["topology"] == topo)
        assert sent == received


@WORLDS
def test_ring_sends_2_n_minus_1_over_n_of_the_tensor(world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _run(world, tmp_path_factory)
    for res in run["ranks"]:
        rv = res["ring_volume"]
        assert abs(rv["sent"] / rv["expected"] - 1) < 1e-3
        assert abs(rv["received"] / rv["expected"] - 1) < 1e-3
        assert rv["seconds"] > 0


@WORLDS
def test_allgather_along_topology(world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _run(world, tmp_path_factory)
    for res in run["ranks"]:
        for rec in res["allgather"]:
            assert rec["equal"], rec


@WORLDS
def test_subset_reducers(world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _run(world, tmp_path_factory)
    if world == 4:
        assert run["ranks"][0]["hier_clusters"] == [[0, 1], [2, 3]]
    for res in run["ranks"]:
        assert res["subsets"]
        for rec in res["subsets"]:
            if rec["member"]:
                assert rec["rel_err"] <= 1e-5, rec
                assert rec["gather_ok"], rec
            else:
                assert rec["refused"], rec


@WORLDS
def test_ddp_hooks_match_single_process_training(world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _run(world, tmp_path_factory)
    local = run["ranks"][0]["ddp"]["local"]
    for rank, res in enumerate(run["ranks"]):
        ddp = res["ddp"]
        assert torch.equal(ddp["local"], local)
        for topo in TOPOLOGIES:
            rec = ddp[(topo, None)]
            assert (rec["params"] - local).abs().max() <= 1e-5, (topo, rank)
            assert (rec["params"] - ddp[("mesh", None)]["params"]).abs().max() <= 1e-5, (topo, rank)
            assert torch.equal(rec["params"], run["ranks"][0]["ddp"][(topo, None)]["params"]), (topo, rank)
            stats = rec["stats"]
            assert stats["buckets"] >= 2 * DDP_STEPS  # several buckets per step
            assert stats["dense_bytes"] == stats["sent_bytes"] > 0
            assert stats["bytes_saved"] == 0
            assert stats["comm_seconds"] > 0


@WORLDS
def test_topk_ratio_one_equals_uncompressed(world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _run(world, tmp_path_factory)
    for rank, res in enumerate(run["ranks"]):
        ddp = res["ddp"]
        for topo in TOPOLOGIES:
            dense = ddp[(topo, None)]["params"]
            topk = ddp[(topo, 1.0)]["params"]
            assert (topk - dense).abs().max() <= 1e-5, (topo, rank)
            assert torch.equal(topk, run["ranks"][0]["ddp"][(topo, 1.0)]["params"]), (topo, rank)


@pytest.mark.parametrize("world", [2, 3])
def test_topk_ratio_point_one_saves_bytes_and_learns(world: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = _run(world, tmp_path_factory)
    for rank, res in enumerate(run["ranks"]):
        for topo in TOPOLOGIES:
            rec = res["ddp"][(topo, 0.1)]
            stats = rec["stats"]
            assert stats["bytes_saved"] > 0, (topo, rank, stats)
            assert stats["sent_bytes"] < stats["dense_bytes"]
            assert stats["bytes_saved"] == stats["dense_bytes"] - stats["sent_bytes"]
            assert rec["loss_after"] < 0.7 * rec["loss_before"], (topo, rank, rec["loss_before"], rec["loss_after"])
            # replicas stay identical under compression
            assert torch.equal(rec["params"], run["ranks"][0]["ddp"][(topo, 0.1)]["params"])


def test_dead_peer_makes_backward_raise(tmp_path_factory: pytest.TempPathFactory) -> None:
    failure = _run(2, tmp_path_factory)["failure"]
    assert failure is not None
    assert failure["error"] != "no error"
    assert failure["error"].startswith("RuntimeError"), failure
    assert failure["seconds"] < 15.0, failure
