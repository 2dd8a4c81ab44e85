"""Synchronous data parallel under consensus ``byzantine``: robust aggregation of gradients.

No DDP hook here. Every step each worker computes its gradient on its batch (``accum``
micro-batches), flattens it and sends it to the hub -- the aggregator when the job has one,
else the first worker -- in one ``dist.gather`` on the group workers + hub. The hub applies the
job's rule (:func:`.consensus.resolve_rule`: a job left at ``fedavg`` gets krum or the median)
with ``f = byzantine_f``, ``beta = trim_beta``, ``m = multi_krum_m`` and, for FedAvg /
Multi-Krum, weights = examples per step (equal) x reputation when ``reputation_weighting`` is
set; it broadcasts the robust gradient and every member (hub included) loads it into its
parameters' ``.grad``, clips it (``grad_clip``) and steps its own optimizer, so the replicas
stay identical. The hub updates its reputation of each worker every step and counts the
updates the rule left out (``rejected_updates``); once per epoch it logs what the rule
selected / rejected and the reputations. Workers with a non-honest behaviour corrupt the
gradient they send (simulation, :mod:`.adversary`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from workers.aggregation import AggregationError, aggregate

from .adversary import HONEST, behavior_of, corrupt_gradient, describe, is_honest
from .common import Sums, TrainedModel, epoch_order, grad_norm, make_optimizer
from .consensus import WEIGHTED_RULES, Reputation, resolve_rule, rule_kwargs
from .coord import agree, error_of
from .federated import FAILED, _failed_info, flat_weights, set_weights
from .runtime import Ctx

log = logging.getLogger(__name__)


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float()
                      for p in params])


def _set_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    for p in params:
        k = p.numel()
        p.grad = flat[off : off + k].view_as(p).to(p.dtype).clone()
        off += k


def run_sync_robust(ctx: Ctx) -> TrainedModel:
    job, plan = ctx.job, ctx.plan
    group = ctx.groups["active"]  # workers + hub
    members = sorted(plan.active)
    hub = plan.aggregator
    assert hub is not None
    is_hub, is_worker = plan.rank == hub, plan.is_worker
    workers = plan.workers
    model = ctx.model
    model.train()
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    rule, note = resolve_rule(job, len(workers))
    kwargs = rule_kwargs(job)
    behavior = behavior_of(job, plan.rank) if is_worker else HONEST
    opt = make_optimizer(job.optimizer, params, job.learning_rate)
    ctx.restore_optimizer(opt)
    spe, accum = ctx.steps_per_epoch(ctx.setup.worker_train_sizes)
    widx = plan.worker_index if is_worker else len(workers)
    torch.manual_seed(job.seed * 1_000_003 + widx + 1)
    step = (ctx.start - 1) * spe
    ctx.sink.update(total_epochs=job.epochs, total_steps=spe * job.epochs, step=step, epoch=ctx.start - 1)
    if ctx.is_reporter or is_hub:
        ctx.say(f"sync data parallel with byzantine consensus over workers {workers}: {rule} of the gradients "
                f"at hub rank {hub}, {spe} steps per epoch of {accum} x {job.batch_size} per worker")
        if note and is_hub:
            ctx.say(note)
    if not is_honest(behavior):
        ctx.say(f"ADVERSARY SIMULATION: this worker sends corrupted gradients ({describe(behavior)}); "
                "its own computation stays honest")
    ctx.report_baseline()
    reputation = Reputation(list(workers)) if is_hub else None
    if reputation is not None:
        reputation.report(ctx.sink)

    w0 = flat_weights(model)
    dist.broadcast(w0, src=hub, group=group)  # one starting point (builds are seeded anyway)
    set_weights(model, w0)
    n = len(ctx.data.train) if (is_worker and ctx.data is not None) else 0
    per_step = float(job.batch_size * accum)
    for epoch in range(ctx.start, job.epochs + 1):
        ctx.epoch = epoch
        ctx.sink.update(epoch=epoch)
        order = epoch_order(n, job.seed, epoch, widx) if is_worker else None
        local = Sums(ctx.num_classes)
        rejected: Counter[int] = Counter()
        suspicious: Counter[int] = Counter()
        t_epoch = time.perf_counter()
        for s in range(spe):
            t0 = time.perf_counter()
            ctx.schedule_lr(opt, step, spe * job.epochs)
            opt.zero_grad(set_to_none=True)
            if is_worker:
                ctx.forward_backward(model, order, s * accum, accum, local)
            g = _flat_grad(params)
            if not is_honest(behavior):
                g = corrupt_gradient(g, behavior, seed=job.seed, rank=plan.rank, when=step)
            table = [torch.empty_like(g) for _ in members] if is_hub else None
            tc = time.perf_counter()
            dist.gather(g, gather_list=table, dst=hub, group=group)
            status = 0.0
            err = None
            if is_hub:
                assert table is not None and reputation is not None
                ctx.bytes_received += (len(members) - 1) * d * 4
                rows = torch.stack([table[members.index(r)] for r in workers]).numpy()
                counts = np.full(len(workers), per_step)
                weights = (reputation.weights(counts) if (job.reputation_weighting and rule in WEIGHTED_RULES)
                           else counts)
                info: dict[str, Any] = {}
                try:
                    new, info = aggregate(rule, rows, weights=weights, **kwargs)
                    if not np.isfinite(new).all():
                        raise AggregationError(f"the {rule} aggregate of the gradients holds NaN or inf values")
                except AggregationError as exc:
                    err, status, new = error_of(exc), FAILED, np.zeros(d, dtype=np.float32)
                    info = _failed_info(torch.from_numpy(rows))
                if info:
                    for r in reputation.observe(info, rule):
                        suspicious[r] += 1
                    for i in info.get("rejected") or []:
                        rejected[workers[i]] += 1
                robust = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32))
            else:
                ctx.bytes_sent += d * 4
                robust = torch.empty(d)
            payload = torch.cat([robust, torch.tensor([status])])
            dist.broadcast(payload, src=hub, group=group)
            ctx.comm_s += time.perf_counter() - tc
            if is_hub:
                ctx.bytes_sent += (len(members) - 1) * payload.numel() * 4
            else:
                ctx.bytes_received += payload.numel() * 4
            if float(payload[d]) >= FAILED:
                agree(err, None, group)  # every member raises the hub's error
            _set_grad(params, payload[:d])
            local.add_gnorm(grad_norm(params, job.grad_clip))
            opt.step()
            step += 1
            if ctx.finish_step(step, t0, group):
                break
        seconds = time.perf_counter() - t_epoch
        glob = ctx.epoch_sums(local, group, model if is_worker and ctx.data is not None else None)
        final = ctx.stopped or epoch == job.epochs
        if reputation is not None:
            reputation.report(ctx.sink)
            ctx.say(f"epoch {epoch}: {rule} over {spe} steps; updates rejected per worker {dict(sorted(rejected.items()))}, "
                    f"suspicious {dict(sorted(suspicious.items()))}; reputation {reputation.text()}")
        ctx.epoch_end(epoch, step, glob, seconds, local if is_worker else None, model, opt, final)
        if ctx.stopped:
            ctx.say(f"stopped after epoch {epoch} (step {step})")
            break
    return ctx.trained(model)


__all__ = ["run_sync_robust"]
