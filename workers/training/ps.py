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

from .common import Sums, TrainedModel, epoch_order, make_optimizer
from .runtime import STOP_CHECK_EVERY, Ctx

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
    shard_numel = {p: sum(params[i].numel() for i in shards[p]) for p in servers}
    groups = ctx.groups["ps"]  # server -> group [server] + workers
    ps_group = ctx.groups.get("ps_all")
    active = ctx.groups["active"]
    n_workers = len(plan.workers)
    spe, accum = ctx.steps_per_epoch(ctx.setup.worker_train_sizes)
    step = (ctx.start - 1) * spe
    ctx.sink.update(total_epochs=job.epochs, total_steps=spe * job.epochs, step=step, epoch=ctx.start - 1)
    if plan.rank == plan.reporter:
        ctx.say("parameter shards: " + ", ".join(
            f"rank {p}: {len(shards[p])} tensors / {shard_numel[p]:,} values" for p in servers))
    ctx.report_baseline()
    if plan.is_worker:
        return _worker(ctx, params, shards, shard_numel, groups, active, spe, accum, step)
    _server(ctx, params, shards[plan.rank], groups[plan.rank], ps_group, active, n_workers, spe, step)
    return None


def _worker(ctx: Ctx, params: list[torch.Tensor], shards: dict[int, list[int]], shard_numel: dict[int, int],
            groups: dict[int, object], active: object, spe: int, accum: int, step: int) -> TrainedModel:
    job, plan = ctx.job, ctx.plan
    assert ctx.data is not None
    model = ctx.model
    servers = plan.ps
    widx = plan.worker_index
    torch.manual_seed(job.seed * 1_000_003 + widx + 1)
    n = len(ctx.data.train)
    latency_s = 0.0
    syncs = 0
    for epoch in range(ctx.start, job.epochs + 1):
        ctx.epoch = epoch
        ctx.sink.update(epoch=epoch)
        order = epoch_order(n, job.seed, epoch, widx)
        local = Sums(ctx.num_classes)
        t_epoch = time.perf_counter()
        for s in range(spe):
            t0 = time.perf_counter()
            ctx.schedule_lr(None, step, spe * job.epochs)
            model.zero_grad(set_to_none=True)
            ctx.forward_backward(model, order, s * accum, accum, local)
            t_sync = time.perf_counter()
            with torch.no_grad():
                works = []
                for p in servers:
                    flat = torch.cat([params[i].grad.reshape(-1) for i in shards[p]] + [torch.zeros(1)])
                    works.append(dist.reduce(flat, dst=p, op=dist.ReduceOp.SUM, group=groups[p], async_op=True))
                    ctx.bytes_sent += flat.numel() * 4
                for w in works:
                    w.wait()
                bufs = {p: torch.empty(shard_numel[p] + 1) for p in servers}
                works = [dist.broadcast(bufs[p], src=p, group=groups[p], async_op=True) for p in servers]
                for w in works:
                    w.wait()
                for p in servers:
                    buf = bufs[p]
                    ctx.bytes_received += buf.numel() * 4
                    off = 0
                    for i in shards[p]:
                        k = params[i].numel()
                        params[i].copy_(buf[off : off + k].view_as(params[i]))
                        off += k
            dt = time.perf_counter() - t_sync
            latency_s += dt
            ctx.comm_s += dt
            syncs += 1
            local.add_gnorm(float(bufs[servers[0]][-1]))
            step += 1
            if ctx.finish_step(step, t0, active):
                break
        seconds = time.perf_counter() - t_epoch
        glob = ctx.epoch_sums(local, active, model)
        final = ctx.stopped or epoch == job.epochs
        ctx.epoch_end(epoch, step, glob, seconds, local, model, None, final)
        ctx.node_stats(sync_latency_ms=1000.0 * latency_s / max(1, syncs))
        if ctx.stopped:
            ctx.say(f"stopped after epoch {epoch} (step {step})")
            break
    return ctx.trained(model)


def _server(ctx: Ctx, params: list[torch.Tensor], mine: list[int], group: object, ps_group: object,
            active: object, n_workers: int, spe: int, step: int) -> None:
    job, plan = ctx.job, ctx.plan
    shard = [params[i] for i in mine]
    numel = sum(p.numel() for p in shard)
    # On resume the weights come from the checkpoint; a server's optimizer state starts fresh.
    opt = make_optimizer(job.optimizer, shard, job.learning_rate) if shard else None
    updates = 0
    latency_s = 0.0
    ctx.say(f"parameter server for {len(shard)} tensors ({numel:,} values), {n_workers} workers")
    for epoch in range(ctx.start, job.epochs + 1):
        ctx.epoch = epoch
        ctx.sink.update(epoch=epoch)
        t_epoch = time.perf_counter()
        for _ in range(spe):
            t0 = time.perf_counter()
            buf = torch.zeros(numel + 1)
            dist.reduce(buf, dst=plan.rank, op=dist.ReduceOp.SUM, group=group)
            t_in = time.perf_counter()
            ctx.bytes_received += buf.numel() * 4 * n_workers
            with torch.no_grad():
                grads = buf[:numel].div_(n_workers)
                sq = grads.double().pow(2).sum().reshape(1)
                if ps_group is not None:
                    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=ps_group)
                norm = math.sqrt(float(sq))
                if job.grad_clip is not None and norm > job.grad_clip:
                    grads.mul_(job.grad_clip / (norm + 1e-6))
                off = 0
                for p in shard:
                    k = p.numel()
                    p.grad = grads[off : off + k].view_as(p).clone()
                    off += k
            if opt is not None:
                ctx.schedule_lr(opt, step, spe * job.epochs)
                opt.step()
                updates += 1
            with torch.no_grad():
                out = torch.cat([p.detach().reshape(-1) for p in shard] + [torch.tensor([norm], dtype=torch.float32)])
            dist.broadcast(out, src=plan.rank, group=group)
            ctx.bytes_sent += out.numel() * 4 * n_workers
            t_out = time.perf_counter()
            latency_s += t_out - t_in
            ctx.comm_s += (t_in - t0) + (t_out - t_in)
            step += 1
            ctx.steps += 1
            ctx.step_seconds += t_out - t0
            ctx.sink.update(step=step)
            if step % STOP_CHECK_EVERY == 0 and ctx.agree_stop(active):
                ctx.stopped = True
                break
        seconds = time.perf_counter() - t_epoch
        local = Sums(ctx.num_classes)
        local.flag = 1.0 if ctx.stop.is_set() else 0.0
        glob = ctx.reduce_sums(local, active)
        ctx.stopped = ctx.stopped or glob.flag > 0
        ctx.epoch_end(epoch, step, glob, seconds, None, None, None, False)
        ctx.node_stats(updates_applied=updates, sync_latency_ms=1000.0 * latency_s / max(1, updates))
        if ctx.stopped:
            break
