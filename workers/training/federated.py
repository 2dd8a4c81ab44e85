"""Federated averaging.

Per round: the aggregator's global weights are on every worker (``dist.broadcast`` on the
group [aggregator] + workers); each worker trains ``local_epochs`` on its own shard with its
own optimizer; the flattened local weights, the worker's sample count and its training sums
travel to the aggregator in one ``dist.gather``; the aggregator combines them with
``workers.aggregation.aggregate(rule, updates, weights=sample_counts)`` (rule: the job's
``aggregation_rule`` when it has one, else ``fedavg``) and broadcasts the new global model
with the agreed stop flag; workers evaluate it on their validation parts and the sums are
all-reduced. Raw examples never leave a worker.

While workers train, the aggregator (and workers that finish early) wait on the rendezvous
store, not in a collective, so a round may take longer than the process-group timeout.
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from workers.aggregation import AggregationError, aggregate

from .common import Sums, TrainedModel, epoch_order, evaluate, grad_norm, lr_factor, make_optimizer, set_lr
from .coord import agree, error_of
from .runtime import Ctx

log = logging.getLogger(__name__)

FAILED = 2.0
"""Flag value the aggregator broadcasts when aggregation failed (1.0 = stop)."""

# Extra values after the weights in a worker's gathered row.
_ROW = ("n_examples", "flag", "loss_sum", "correct", "count", "samples", "tokens", "gnorm_sum", "gnorm_n", "lr")


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every floating tensor of the model's state, each once (tied weights counted once)."""
    return list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]


def flat_weights(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1).float() for t in _tensors(model)])


def set_weights(model: nn.Module, flat: torch.Tensor) -> None:
    with torch.no_grad():
        off = 0
        for t in _tensors(model):
            k = t.numel()
            t.copy_(flat[off : off + k].view_as(t))
            off += k


def run_federated(ctx: Ctx) -> TrainedModel:
    job, plan = ctx.job, ctx.plan
    agg = plan.aggregator
    assert agg is not None
    group = ctx.groups["active"]  # [aggregator] + workers
    worker_group = ctx.groups.get("workers")
    members = sorted(plan.active)  # group-rank order of the gather list
    is_agg = plan.rank == agg
    is_worker = plan.is_worker
    model = ctx.model
    model.train()
    d = flat_weights(model).numel()
    rule = getattr(job, "aggregation_rule", None) or "fedavg"
    opt = None
    if is_worker:
        opt = make_optimizer(job.optimizer, model.parameters(), job.learning_rate)
        if ctx.ckpt is not None and ctx.ckpt.get("mode") == "federated" and plan.rank == agg:
            ctx.restore_optimizer(opt)  # the checkpoint holds the aggregator's own (worker) optimizer
        torch.manual_seed(job.seed * 1_000_003 + plan.worker_index + 1)
    spe, accum = ctx.steps_per_epoch([len(ctx.data.train)]) if (is_worker and ctx.data) else (0, 1)
    ctx.sink.update(total_epochs=job.rounds, total_steps=job.rounds, step=ctx.start - 1, epoch=ctx.start - 1)
    if is_agg:
        ctx.say(f"federated averaging ({rule}) over workers {plan.workers}, aggregator rank {agg}: "
                f"{job.rounds} rounds x {job.local_epochs} local epochs, {d:,} weights")
    ctx.report_baseline()

    # Round 0: everybody starts from the aggregator's global model.
    glob_w = flat_weights(model)
    _broadcast(ctx, glob_w, agg, group, members)
    set_weights(model, glob_w)

    local_model: nn.Module | None = None
    rounds_done = 0
    agg_seconds = 0.0
    for rnd in range(ctx.start, job.rounds + 1):
        ctx.epoch = rnd
        ctx.sink.update(epoch=rnd)
        t_round = time.perf_counter()
        local = Sums(ctx.num_classes)
        if is_worker:
            _local_training(ctx, model, opt, rnd, local, worker_group, spe, accum)
        ctx.coord.barrier(f"round-{rnd}", members)  # long waits happen here, on the store
        extra = torch.tensor([
            float(ctx.data.n_examples) if (is_worker and ctx.data) else 0.0,
            1.0 if ctx.stop.is_set() else 0.0,
            local.train["loss_sum"], local.train["correct"], local.train["count"],
            local.train["samples"], local.train["tokens"], local.train["gnorm_sum"], local.train["gnorm_n"],
            ctx.lr,
        ], dtype=torch.float32)
        row = torch.cat([flat_weights(model), extra])
        t0 = time.perf_counter()
        table = [torch.empty_like(row) for _ in members] if is_agg else None
        dist.gather(row, gather_list=table, dst=agg, group=group)
        ctx.comm_s += time.perf_counter() - t0
        n_members = len(members)
        flag = 0.0
        agg_error = None
        train_sums = Sums(ctx.num_classes)
        if is_agg:
            assert table is not None
            ctx.bytes_received += (n_members - 1) * row.numel() * 4
            rows = torch.stack([table[members.index(r)] for r in plan.workers])
            counts = rows[:, d].double().numpy()
            flag = float(torch.stack([t[d + 1] for t in table]).max()) if table else 0.0
            flag = max(flag, 1.0 if ctx.stop.is_set() else 0.0)
            for k, name in enumerate(_ROW[2:-1], start=2):
                train_sums.train[name] = float(rows[:, d + k].double().sum())
            ctx.lr = float(rows[:, d + len(_ROW) - 1].double().mean())  # the workers' current rate
            t_agg = time.perf_counter()
            try:
                new, info = aggregate(rule, rows[:, :d].numpy(), weights=counts)
            except AggregationError as exc:  # e.g. a diverged worker sent NaN weights
                agg_error = error_of(exc)
                new, info = flat_weights(model).numpy(), {}
                flag = FAILED
            agg_seconds += time.perf_counter() - t_agg
            glob_w = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32))
            if info.get("rejected"):
                ctx.say(f"round {rnd}: {rule} left out the updates of workers "
                        f"{[plan.workers[i] for i in info['rejected']]}")
        else:
            ctx.bytes_sent += row.numel() * 4
            glob_w = torch.empty(d)
        payload = torch.cat([glob_w, torch.tensor([flag])])
        _broadcast(ctx, payload, agg, group, members)
        flag = float(payload[d])
        if flag >= FAILED:  # every member raises the aggregator's error
            agree(agg_error, None, group)
        stopping = flag > 0
        final = stopping or rnd == job.rounds
        if is_worker and final:
            local_model = copy.deepcopy(model)  # this worker's own last model
        set_weights(model, payload[:d])
        rounds_done += 1
        seconds = time.perf_counter() - t_round
        val = Sums(ctx.num_classes)
        if is_worker:
            val.set_val(evaluate(model, ctx.data.val if ctx.data else None, ctx.kind, ctx.num_classes))
        glob = ctx.reduce_sums(val, group)
        glob.train = train_sums.train
        ctx.sink.update(step=rnd)
        ctx.epoch_end(rnd, rnd, glob, seconds, local if is_worker else None, model, opt if is_worker else None, final)
        if is_agg:
            ctx.node_stats(rounds=rounds_done, mean_aggregation_ms=1000.0 * agg_seconds / rounds_done)
        if stopping:
            ctx.stopped = True
            ctx.say(f"stopped after round {rnd}")
            break
    return ctx.trained(model, local_model)


def _broadcast(ctx: Ctx, t: torch.Tensor, src: int, group: object, members: list[int]) -> None:
    t0 = time.perf_counter()
    dist.broadcast(t, src=src, group=group)
    ctx.comm_s += time.perf_counter() - t0
    if ctx.plan.rank == src:
        ctx.bytes_sent += (len(members) - 1) * t.numel() * t.element_size()
    else:
        ctx.bytes_received += t.numel() * t.element_size()


def _local_training(ctx: Ctx, model: nn.Module, opt: torch.optim.Optimizer | None, rnd: int, local: Sums,
                    worker_group: object, spe: int, accum: int) -> None:
    """``local_epochs`` over this worker's whole shard; workers agree on stopping between
    local epochs (after a store barrier, so an uneven split cannot time the check out)."""
    job, plan = ctx.job, ctx.plan
    assert ctx.data is not None and opt is not None
    n = len(ctx.data.train)
    params = list(model.parameters())
    for le in range(job.local_epochs):
        order = epoch_order(n, job.seed, rnd * 10_000 + le, plan.worker_index)
        for s in range(spe):
            t0 = time.perf_counter()
            k = ((rnd - 1) * job.local_epochs + le) * spe + s
            ctx.lr = job.learning_rate * lr_factor(k, job.rounds * job.local_epochs * spe)
            set_lr(opt, ctx.lr)
            opt.zero_grad(set_to_none=True)
            ctx.forward_backward(model, order, s * accum, accum, local)
            local.add_gnorm(grad_norm(params, job.grad_clip))
            opt.step()
            ctx.steps += 1
            ctx.step_seconds += time.perf_counter() - t0
        if le < job.local_epochs - 1:
            if worker_group is not None:
                ctx.coord.barrier(f"round-{rnd}-local-{le}", plan.workers)
                if ctx.agree_stop(worker_group):
                    break
            elif ctx.stop.is_set():
                break
