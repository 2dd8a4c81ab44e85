"""Parameter-server training.

Parameters are split between the parameter-server (PS) ranks: whole tensors, assigned
greedily by size (largest first, to the least loaded PS) so the shards are balanced. For PS
``p`` there is a group ``[p] + workers``. Every step each worker computes gradients on its
batch and ``dist.reduce``-s the flattened gradients of ``p``'s tensors to ``p`` (the PS
contributes zeros); the PS averages them, applies the job's optimizer to its shard and
``dist.broadcast``-s the updated flat parameters (plus the global gradient norm) back.

With several PS ranks the global gradient norm (for ``grad_clip`` and the ``grad_norm``
metric) is an all-reduce of the shards' squared norms among the PS ranks.

Byte counters use the same stated model as ``workers.comm``: a reduce = each worker sends
the tensor once and the root receives one per worker; a broadcast = the root sends one per
worker.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from .common import TrainedModel, make_optimizer
from .loop import AggregatorStep, StepStrategy, run_epochs
from .runtime import Ctx

log = logging.getLogger(__name__)


def assign_shards(sizes: list[int], servers: list[int]) -> dict[int, list[int]]:
    """Tensor indices per server: largest tensor first to the least loaded server (ties: the
    lower index / earlier server), each shard in tensor order."""
    load = {p: 0 for p in servers}
    shards: dict[int, list[int]] = {p: [] for p in servers}
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        p = min(servers, key=lambda s: (load[s], servers.index(s)))
        shards[p].append(i)
        load[p] += sizes[i]
    return {p: sorted(ix) for p, ix in shards.items()}


def run_parameter_server(ctx: Ctx) -> TrainedModel | None:
    job, plan = ctx.job, ctx.plan
    model = ctx.model
    model.train()
    params = list(model.parameters())
    servers = plan.ps
    shards = assign_shards([p.numel() for p in params], servers)
    spe, accum = ctx.steps_per_epoch(ctx.setup.worker_train_sizes)
    step = (ctx.start - 1) * spe
    ctx.sink.update(total_epochs=job.epochs, total_steps=spe * job.epochs, step=step, epoch=ctx.start - 1)
    if plan.rank == plan.reporter:
        ctx.say("parameter shards: " + ", ".join(
            f"rank {p}: {len(shards[p])} tensors / {sum(params[i].numel() for i in shards[p]):,} values"
            for p in servers))
    ctx.report_baseline()
    if plan.is_worker:
        torch.manual_seed(job.seed * 1_000_003 + plan.worker_index + 1)
        strategy: StepStrategy = PSWorkerStep(ctx, params, shards)
    elif plan.rank == plan.epoch_judge:
        strategy = AggregatorStep(ctx)
    else:
        strategy = PSServerStep(ctx, [params[i] for i in shards[plan.rank]])
    # Only the servers build an optimizer, whose first use in a process may take long on a busy
    # host: meet on the store (no process-group timeout) before the first collective.
    ctx.coord.barrier("ps-ready", sorted(plan.active))
    run_epochs(ctx, strategy, spe, accum, step)
    return ctx.trained(model) if plan.is_worker else None


class PSWorkerStep(StepStrategy):
    """A worker: reduce each shard's gradients to its server, load the servers' new weights."""

    def __init__(self, ctx: Ctx, params: list[torch.Tensor], shards: dict[int, list[int]]) -> None:
        self.params, self.shards = params, shards
        self.groups = ctx.groups["ps"]  # server -> group [server] + workers
        self.group = ctx.groups["active"]
        self.checkpoint_model = ctx.model
        self.shard_numel = {p: sum(params[i].numel() for i in ix) for p, ix in shards.items()}
        self.latency_s = 0.0
        self.syncs = 0

    def apply(self, ctx: Ctx, step: int) -> float:
        params, servers = self.params, ctx.plan.ps
        t_sync = time.perf_counter()
        with torch.no_grad():
            works = []
            for p in servers:
                flat = torch.cat([params[i].grad.reshape(-1) for i in self.shards[p]] + [torch.zeros(1)])
                works.append(dist.reduce(flat, dst=p, op=dist.ReduceOp.SUM, group=self.groups[p], async_op=True))
                ctx.bytes_sent += flat.numel() * 4
            for w in works:
                w.wait()
            bufs = {p: torch.empty(self.shard_numel[p] + 1) for p in servers}
            works = [dist.broadcast(bufs[p], src=p, group=self.groups[p], async_op=True) for p in servers]
            for w in works:
                w.wait()
            for p in servers:
                buf = bufs[p]
                ctx.bytes_received += buf.numel() * 4
                off = 0
                for i in self.shards[p]:
                    k = params[i].numel()
                    params[i].copy_(buf[off : off + k].view_as(params[i]))
                    off += k
        dt = time.perf_counter() - t_sync
        self.latency_s += dt
        ctx.comm_s += dt
        self.syncs += 1
        return float(bufs[servers[0]][-1])  # the global norm, computed by the servers

    def epoch_stats(self, ctx: Ctx) -> dict[str, float]:
        return {"sync_latency_ms": 1000.0 * self.latency_s / max(1, self.syncs)}


class PSServerStep(StepStrategy):
    """A server: average the workers' gradients of its shard, clip by the global norm, step,
    broadcast the shard's new weights (plus the norm)."""

    trains = False

    def __init__(self, ctx: Ctx, shard: list[torch.Tensor]) -> None:
        job, plan = ctx.job, ctx.plan
        self.shard = shard
        self.numel = sum(p.numel() for p in shard)
        self.to_workers = ctx.groups["ps"][plan.rank]
        self.ps_group = ctx.groups.get("ps_all")
        self.group = ctx.groups["active"]
        self.n_workers = len(plan.workers)
        # On resume the weights come from the checkpoint; a server's optimizer state starts fresh.
        self.optimizer = make_optimizer(job.optimizer, shard, job.learning_rate) if shard else None
        self.updates = 0
        self.latency_s = 0.0
        ctx.say(f"parameter server for {len(shard)} tensors ({self.numel:,} values), {self.n_workers} workers")

    def apply(self, ctx: Ctx, step: int) -> None:
        clip, numel, n_workers = ctx.job.grad_clip, self.numel, self.n_workers
        t0 = time.perf_counter()
        buf = torch.zeros(numel + 1)
        dist.reduce(buf, dst=ctx.plan.rank, op=dist.ReduceOp.SUM, group=self.to_workers)
        t_in = time.perf_counter()
        ctx.bytes_received += buf.numel() * 4 * n_workers
        with torch.no_grad():
            grads = buf[:numel].div_(n_workers)
            sq = grads.double().pow(2).sum().reshape(1)
            if self.ps_group is not None:
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.ps_group)
            norm = math.sqrt(float(sq))
            if clip is not None and norm > clip:
                grads.mul_(clip / (norm + 1e-6))
            off = 0
            for p in self.shard:
                k = p.numel()
                p.grad = grads[off : off + k].view_as(p).clone()
                off += k
        if self.optimizer is not None:
            self.optimizer.step()
            self.updates += 1
        with torch.no_grad():
            out = torch.cat([p.detach().reshape(-1) for p in self.shard] + [torch.tensor([norm], dtype=torch.float32)])
        dist.broadcast(out, src=ctx.plan.rank, group=self.to_workers)
        ctx.bytes_sent += out.numel() * 4 * n_workers
        t_out = time.perf_counter()
        self.latency_s += t_out - t_in
        ctx.comm_s += t_out - t0
        return None

    def epoch_stats(self, ctx: Ctx) -> dict[str, float]:
        return {"updates_applied": self.updates,
                "sync_latency_ms": 1000.0 * self.latency_s / max(1, self.updates)}
