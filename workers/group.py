"""Process-group membership and link measurements for one node.

All torch.distributed calls of a node run on one thread (the agent's executor), so joining,
probing and training never interleave their collectives. Nodes join through the rendezvous
store that the cluster's first node hosts (``workers.rendezvous``), not the controller, so a
formed group keeps its store when the controller dies.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from workers.devices import group_backend, pin_device
from workers.protocol import (
    CollectiveBenchRequest,
    CollectiveTiming,
    EdgeMeasurement,
    GroupInfo,
    JoinRequest,
    ProbeRequest,
)

log = logging.getLogger(__name__)


class GroupError(RuntimeError):
    """A membership operation failed; the message says which and why."""


class Membership:
    """The node's current process group: join (re-forming on a new generation) and leave."""

    def __init__(self) -> None:
        self.info: GroupInfo | None = None
        self._store: dist.TCPStore | None = None

    def join(self, req: JoinRequest) -> float:
        """Leave any previous group, join generation ``req.generation``; returns join time in ms."""
        self.leave()
        start = time.perf_counter()
        timeout = timedelta(seconds=req.timeout_s)
        try:
            device = pin_device(req.backend, req.local_rank)
            self._store = dist.TCPStore(
                req.store_host, req.store_port, is_master=False, timeout=timeout
            )
            prefixed = dist.PrefixStore(req.store_prefix, self._store)
            dist.init_process_group(
                group_backend(req.backend),
                store=prefixed,
                rank=req.rank,
                world_size=req.world_size,
                timeout=timeout,
            )
            dist.barrier()
        except Exception as exc:
            self.leave()
            raise GroupError(
                f"joining generation {req.generation} as rank {req.rank}/{req.world_size} failed: {exc}"
            ) from exc
        self.info = GroupInfo(
            generation=req.generation, rank=req.rank, world_size=req.world_size, backend=req.backend,
            device=str(device),
        )
        log.info("joined generation %d as rank %d of %d", req.generation, req.rank, req.world_size)
        return (time.perf_counter() - start) * 1000

    def leave(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group still has to go
                log.warning("destroy_process_group failed", exc_info=True)
        self.info = None
        self._store = None

    def require(self, generation: int) -> GroupInfo:
        if self.info is None:
            raise GroupError("this node has not joined a process group; connect the cluster first")
        if self.info.generation != generation:
            raise GroupError(
                f"this node is in generation {self.info.generation}, not {generation}; reconnect the cluster"
            )
        return self.info


def probe_edges(me: GroupInfo, req: ProbeRequest) -> list[EdgeMeasurement]:
    """Ping-pong over every edge in list order; the edge's src measures, dst echoes.

    Every rank walks the same list, so each pair meets in the same order on both sides and no
    cycle of waits can form.
    """
    ping = torch.zeros(1, dtype=torch.float32)
    payload = torch.zeros(max(1, req.payload_bytes // 4), dtype=torch.float32)
    results: list[EdgeMeasurement] = []
    for src, dst in req.edges:
        if me.rank not in (src, dst) or src == dst:
            continue
        peer = dst if me.rank == src else src
        rtts = [_round_trip(ping, peer, me.rank == src) for _ in range(req.rounds)]
        transfer = _round_trip(payload, peer, me.rank == src)
        if me.rank == src:
            rtt = statistics.median(rtts)
            bits = 2 * payload.numel() * payload.element_size() * 8
            results.append(
                EdgeMeasurement(
                    src=src, dst=dst, rtt_ms=rtt * 1000, bandwidth_mbps=bits / transfer / 1e6
                )
            )
    return results


def _round_trip(t: torch.Tensor, peer: int, initiator: bool) -> float:
    start = time.perf_counter()
    if initiator:
        dist.send(t, peer)
        dist.recv(t, peer)
    else:
        dist.recv(t, peer)
        dist.send(t, peer)
    return time.perf_counter() - start


def bench_collectives(me: GroupInfo, req: CollectiveBenchRequest) -> list[CollectiveTiming]:
    """Time each collective per topology and size; every rank runs the same loops in the same order."""
    from workers.comm import TopologyReducer

    out = []
    for topology in req.topologies:
        reducer = TopologyReducer(topology)  # collective: every rank builds it in the same order
        for op in req.ops:
            run = _collective_call(reducer, op)
            for size in req.sizes_bytes:
                t = torch.ones(max(1, size // 4), dtype=torch.float32)
                for _ in range(req.warmup):  # as the bare gloo baseline does
                    run(t)
                times = []
                for _ in range(req.reps):
                    dist.barrier()
                    start = time.perf_counter()
                    run(t)
                    times.append((time.perf_counter() - start) * 1000)
                out.append(CollectiveTiming(topology=topology, op=op, bytes=t.numel() * 4,
                                            median_ms=statistics.median(times), min_ms=min(times)))
    return out


def _collective_call(reducer: Any, op: str) -> Callable[[torch.Tensor], object]:
    """What one timed call of ``op`` does: the reducer's own all-reduce and all-gather (the paths
    training uses), a broadcast from the reducer group's first rank."""
    if op == "all_reduce":
        return reducer.allreduce_mean
    if op == "all_gather":
        return reducer.allgather
    return lambda t: dist.broadcast(t, src=reducer.ranks[0], group=reducer.group)
