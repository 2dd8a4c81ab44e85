"""Parameter servers in federated runs: the global model lives in shards on the servers.

The model's tensors are split between the parameter-server (PS) ranks the same way as in
parameter-server training (:func:`.ps.assign_shards`: whole tensors, largest first to the least
loaded server). Per round:

1. the aggregator combines the workers' updates as usual (FedAvg, a robust rule, proof-of-learning
   screening, secure aggregation and central DP all need whole updates, so those still reach it);
2. it sends each server the aggregate's change to that server's shard (point to point, after a
   store barrier so a long round cannot time the receive out);
3. each server applies the change to its shard and broadcasts the candidate shard to the
   federation (aggregator, workers, validators): the members pull the candidate global model
   from the servers instead of receiving the whole model from the aggregator;
4. the commit rule runs among the members as without servers; the aggregator then sends every
   server the verdict, and a server keeps the candidate shard (committed) or goes back to its
   last committed shard (rejected round).

At the start the aggregator hands the servers the initial (or resumed) model's shards and the
members pull it from them the same way. The servers report ``updates_applied`` (committed
updates of their shard), ``sync_latency_ms`` (receive + apply + serve, per round) and their
memory. Without parameter servers nothing here runs.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from .commit import broadcast
from .common import TrainingError, _tensors
from .ps import assign_shards
from .runtime import Ctx

log = logging.getLogger(__name__)

FAILED = 2.0  # the aggregator's flag when aggregation failed (federated.FAILED)


def federation_members(plan) -> list[int]:  # noqa: ANN001 -- a setup.Plan
    """The ranks that train, aggregate and judge a central federated round (not the servers)."""
    return sorted(set(plan.active) - set(plan.ps))


class ShardLayout:
    """Which slices of the flat weight vector each server holds (whole tensors)."""

    def __init__(self, ctx: Ctx) -> None:
        sizes = [t.numel() for t in _tensors(ctx.model)]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.servers = list(ctx.plan.ps)
        self.spans = {p: [(offsets[i], sizes[i]) for i in ix] for p, ix in assign_shards(sizes, self.servers).items()}
        self.numel = {p: sum(k for _, k in spans) for p, spans in self.spans.items()}

    def take(self, flat: torch.Tensor, p: int) -> torch.Tensor:
        return torch.cat([flat[o:o + k] for o, k in self.spans[p]] + [flat.new_empty(0)])

    def put(self, flat: torch.Tensor, p: int, values: torch.Tensor) -> None:
        off = 0
        for o, k in self.spans[p]:
            flat[o:o + k] = values[off:off + k]
            off += k

    def describe(self) -> str:
        return ", ".join(f"rank {p}: {len(self.spans[p])} tensors / {self.numel[p]:,} values" for p in self.servers)


class ShardClient:
    """A federation member's side: pull the global model from the servers; the aggregator also
    hands them each round's aggregate and the commit verdict."""

    def __init__(self, ctx: Ctx, members: list[int]) -> None:
        self.ctx, self.members = ctx, members
        self.layout = ShardLayout(ctx)
        self.groups = ctx.groups["shards"]
        self.agg = ctx.plan.aggregator
        self.is_agg = ctx.plan.rank == self.agg
        if self.is_agg:
            ctx.say("parameter servers hold the global model: " + self.layout.describe())

    def _hand_over(self, name: str, parts: dict[int, torch.Tensor]) -> None:
        """Aggregator: send every server its part, after all met on the store (no pg timeout)."""
        ctx = self.ctx
        ctx.coord.barrier(name, [self.agg] + self.layout.servers, patient=True)
        t0 = time.perf_counter()
        for p, part in parts.items():
            dist.send(part, dst=p)
            ctx.bytes_sent += part.numel() * 4
        ctx.comm_s += time.perf_counter() - t0

    def _pull(self, tail: int) -> torch.Tensor:
        """The flat vector the servers broadcast, plus ``tail`` control values from the first server."""
        ctx, layout = self.ctx, self.layout
        d = sum(layout.numel.values())
        flat = torch.empty(d)
        control = torch.empty(tail)
        for p in layout.servers:  # the same order on every member and server
            buf = torch.empty(layout.numel[p] + tail)
            broadcast(ctx, buf, p, self.groups[p], [p] + self.members)
            layout.put(flat, p, buf[:layout.numel[p]])
            control = buf[layout.numel[p]:]
        return torch.cat([flat, control])

    def start(self, initial: torch.Tensor) -> torch.Tensor:
        """Round 0: the aggregator's initial model to the servers; every member pulls it back."""
        if self.is_agg:
            self._hand_over("shards-start", {p: self.layout.take(initial, p).contiguous()
                                             for p in self.layout.servers})
        return self._pull(0)

    def deliver(self, rnd: int, glob_w: torch.Tensor | None, committed: torch.Tensor, flag: float, status: float,
                final: bool) -> torch.Tensor:
        """The round's candidate: the aggregator sends each server the change to its shard (with the
        flag, status and whether this is the last round); every member pulls ``[candidate, flag, status]``."""
        if self.is_agg:
            assert glob_w is not None
            change = glob_w - committed
            tail = torch.tensor([flag, status, 1.0 if final else 0.0])
            self._hand_over(f"shards-round-{rnd}", {p: torch.cat([self.layout.take(change, p), tail])
                                                    for p in self.layout.servers})
        return self._pull(2)

    def verdict(self, rnd: int, committed: bool) -> None:
        """Aggregator: tell the servers whether the round's candidate was committed."""
        if self.is_agg:
            flag = torch.tensor([1.0 if committed else 0.0])
            self._hand_over(f"shards-verdict-{rnd}", {p: flag.clone() for p in self.layout.servers})


def run_shard_server(ctx: Ctx) -> None:
    """A parameter server's rounds: hold a shard of the global model, apply the aggregator's change,
    serve the candidate shard to the members, keep it when committed."""
    plan = ctx.plan
    layout = ShardLayout(ctx)
    me, agg = plan.rank, plan.aggregator
    assert agg is not None
    group = ctx.groups["shards"][me]
    members = federation_members(plan)
    numel = layout.numel[me]
    ranks = [agg] + layout.servers
    ctx.say(f"parameter server for {len(layout.spans[me])} tensors ({numel:,} values) of the global model, "
            f"serving {len(members)} federation members")

    def receive(name: str, n: int) -> torch.Tensor:
        ctx.coord.barrier(name, ranks, patient=True)  # the aggregator arrives when the round's aggregate is ready
        buf = torch.empty(n)
        t0 = time.perf_counter()
        dist.recv(buf, src=agg)
        ctx.comm_s += time.perf_counter() - t0
        ctx.bytes_received += n * 4
        return buf

    def serve(values: torch.Tensor) -> None:
        t0 = time.perf_counter()
        dist.broadcast(values, src=me, group=group)
        ctx.comm_s += time.perf_counter() - t0
        ctx.bytes_sent += values.numel() * 4 * len(members)

    committed = receive("shards-start", numel)
    serve(committed.clone())
    updates, latency_s, rounds = 0, 0.0, 0
    rnd = ctx.start
    while True:
        ctx.epoch = rnd
        msg = receive(f"shards-round-{rnd}", numel + 3)
        t0 = time.perf_counter()
        flag, final = float(msg[numel]), bool(msg[numel + 2] > 0)  # msg[numel + 1]: status, for the members
        candidate = committed + msg[:numel]
        serve(torch.cat([candidate, msg[numel:numel + 2]]))
        latency_s += time.perf_counter() - t0
        rounds += 1
        if flag >= FAILED:
            raise TrainingError(f"round {rnd}: the aggregator could not form a global model (see its log); "
                                "the parameter servers keep the last committed one")
        if float(receive(f"shards-verdict-{rnd}", 1)[0]) > 0:
            committed = candidate
            updates += 1
        ctx.node_stats(updates_applied=updates, sync_latency_ms=1000.0 * latency_s / rounds,
                       shard_values=numel, rounds=rounds)
        if final or flag > 0:
            if flag > 0 and flag < FAILED:
                ctx.stopped = True
            return None
        rnd += 1


__all__ = ["ShardClient", "ShardLayout", "federation_members", "run_shard_server"]
