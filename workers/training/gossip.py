"""Gossip learning (consensus ``gossip``, federated): no central aggregator.

Every round each worker trains ``local_epochs`` on its own shard, then averages its model with
its neighbours in the cluster topology (over worker positions, in rank order; see
:func:`.consensus.gossip_neighbours`): ring -- previous and next worker; mesh -- all workers;
hierarchical -- binary-tree parent ((i - 1) // 2) and children; star -- the hub (the first
worker) with every other worker. Flat weights travel by point-to-point ``isend``/``irecv``
(every receive and send of a worker posted at once, then waited on, so no pair can
deadlock). The mix uses Metropolis-Hastings weights (:func:`.consensus.mixing_weights`),
which keep the workers' mean model and drive every model towards it on any connected graph.

Per round the workers also measure ``model_spread``: the mean over workers of the L2 distance
of each worker's (mixed) model to the average model (``all_reduce`` of the flat weights for
the average, ``all_gather`` of the scalar distances), recorded by the reporter (the first
worker) as a metric and a node stat. Validation metrics are evaluated by each worker on its
own model and validation part and all-reduced, i.e. the mean over the workers' models.
Aggregator ranks, if any, have no part and wait. A worker with a non-honest behaviour sends
corrupted weights to its neighbours (simulation, :mod:`.adversary`).
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torch.distributed as dist
from torch import nn

from .adversary import behavior_of, corrupt_weights, describe, is_honest
from .common import Sums, TrainedModel, evaluate, flat_weights, make_optimizer, set_weights
from .consensus import gossip_neighbours, mixing_weights
from .federated import local_training
from .runtime import Ctx

log = logging.getLogger(__name__)


def run_gossip(ctx: Ctx) -> TrainedModel:
    job, plan = ctx.job, ctx.plan
    group = ctx.groups["active"]  # the workers
    worker_group = ctx.groups.get("workers")
    workers = plan.workers
    n, me = len(workers), plan.worker_index
    neighbours = gossip_neighbours(job.topology, n)
    mix = mixing_weights(neighbours)[me]
    mine_nb = neighbours[me]
    model = ctx.model
    model.train()
    d = flat_weights(model).numel()
    behavior = behavior_of(job, plan.rank)
    opt = make_optimizer(job.optimizer, model.parameters(), job.learning_rate)
    if ctx.ckpt is not None and ctx.ckpt.get("mode") == "federated" and plan.rank == plan.reporter:
        ctx.restore_optimizer(opt)
    torch.manual_seed(job.seed * 1_000_003 + me + 1)
    assert ctx.data is not None
    spe, accum = ctx.steps_per_epoch([len(ctx.data.train)])
    ctx.sink.update(total_epochs=job.rounds, total_steps=job.rounds, step=ctx.start - 1, epoch=ctx.start - 1)
    if ctx.is_reporter:
        ctx.say(f"gossip learning over workers {workers} ({job.topology}): {job.rounds} rounds x "
                f"{job.local_epochs} local epochs, {d:,} weights, Metropolis-Hastings mixing")
    ctx.say(f"gossip neighbours of rank {plan.rank}: {[workers[j] for j in mine_nb]} "
            f"(self weight {mix[me]:.3f})")
    if not is_honest(behavior):
        ctx.say(f"ADVERSARY SIMULATION: this worker sends corrupted weights ({describe(behavior)}) to its "
                "neighbours; its local training stays honest")
    ctx.report_baseline()

    start_w = flat_weights(model)
    t0 = time.perf_counter()
    dist.broadcast(start_w, src=workers[0], group=group)  # one starting point for everybody
    ctx.comm_s += time.perf_counter() - t0
    set_weights(model, start_w)

    local_model: nn.Module | None = None
    for rnd in range(ctx.start, job.rounds + 1):
        ctx.epoch = rnd
        ctx.sink.update(epoch=rnd)
        t_round = time.perf_counter()
        local = Sums(ctx.num_classes)
        local_training(ctx, model, opt, rnd, local, worker_group, spe, accum)
        ctx.coord.barrier(f"gossip-{rnd}", workers)  # uneven shards: wait on the store
        if rnd == job.rounds or ctx.stop.is_set():
            local_model = copy.deepcopy(model)
        mine = flat_weights(model)
        sent = mine
        if not is_honest(behavior):
            sent = corrupt_weights(mine, start_w, behavior, seed=job.seed, rank=plan.rank, when=rnd)
        bufs = {j: torch.empty(d) for j in mine_nb}
        t0 = time.perf_counter()
        reqs = [dist.irecv(bufs[j], src=workers[j], tag=rnd) for j in mine_nb]
        reqs += [dist.isend(sent, dst=workers[j], tag=rnd) for j in mine_nb]
        for req in reqs:
            req.wait()
        ctx.comm_s += time.perf_counter() - t0
        ctx.bytes_sent += len(mine_nb) * d * 4
        ctx.bytes_received += len(mine_nb) * d * 4
        mixed = mix[me] * mine
        for j in mine_nb:
            mixed += mix[j] * bufs[j]
        set_weights(model, mixed)
        start_w = mixed.clone()
        spread = _spread(ctx, mixed, group, n)

        local.set_val(evaluate(model, ctx.data.val, ctx.kind, ctx.num_classes))
        local.flag = 1.0 if ctx.stop.is_set() else 0.0
        glob = ctx.reduce_sums(local, group)
        stopping = glob.flag > 0
        final = stopping or rnd == job.rounds
        ctx.sink.update(step=rnd)
        ctx.sink.node_stat("model_spread", spread)
        ctx.epoch_end(rnd, rnd, glob, time.perf_counter() - t_round, local, model, opt, final,
                      extra={"model_spread": spread})
        if stopping:
            ctx.stopped = True
            ctx.say(f"stopped after round {rnd}")
            break
    return ctx.trained(model, local_model)


def _spread(ctx: Ctx, flat: torch.Tensor, group: object, n: int) -> float:
    """Mean L2 distance of the workers' models to their average model."""
    t0 = time.perf_counter()
    total = flat.double()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    mine = torch.linalg.vector_norm(flat.double() - total / n).reshape(1)
    dists = [torch.zeros(1, dtype=torch.float64) for _ in range(n)]
    dist.all_gather(dists, mine, group=group)
    ctx.comm_s += time.perf_counter() - t0
    return float(torch.cat(dists).mean())


__all__ = ["run_gossip"]
