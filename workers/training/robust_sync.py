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
from .common import TrainedModel, flat_weights, grad_norm, make_optimizer, set_weights
from .consensus import WEIGHTED_RULES, Reputation, resolve_rule, rule_kwargs
from .coord import agree, error_of
from .federated import FAILED, failed_info
from .loop import StepStrategy, run_epochs
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
    strategy = RobustGradientStep(ctx)
    workers, hub = plan.workers, strategy.hub
    spe, accum = ctx.steps_per_epoch(ctx.setup.worker_train_sizes)
    strategy.per_step = float(job.batch_size * accum)
    widx = plan.worker_index if plan.is_worker else len(workers)
    torch.manual_seed(job.seed * 1_000_003 + widx + 1)
    step = (ctx.start - 1) * spe
    ctx.sink.update(total_epochs=job.epochs, total_steps=spe * job.epochs, step=step, epoch=ctx.start - 1)
    if ctx.is_reporter or strategy.is_hub:
        ctx.say(f"sync data parallel with byzantine consensus over workers {workers}: {strategy.rule} of the "
                f"gradients at hub rank {hub}, {spe} steps per epoch of {accum} x {job.batch_size} per worker")
        if strategy.note and strategy.is_hub:
            ctx.say(strategy.note)
    if not is_honest(strategy.behavior):
        ctx.say(f"ADVERSARY SIMULATION: this worker sends corrupted gradients ({describe(strategy.behavior)}); "
                "its own computation stays honest")
    ctx.report_baseline()
    if strategy.reputation is not None:
        strategy.reputation.report(ctx.sink)
    w0 = flat_weights(ctx.model)
    dist.broadcast(w0, src=hub, group=strategy.group)  # one starting point (builds are seeded anyway)
    set_weights(ctx.model, w0)
    run_epochs(ctx, strategy, spe, accum, step)
    return ctx.trained(ctx.model)


class RobustGradientStep(StepStrategy):
    """Gather every member's flat gradient at the hub, which applies the robust rule and
    broadcasts the result; every member loads it, clips and steps its own optimizer."""

    def __init__(self, ctx: Ctx) -> None:
        job, plan = ctx.job, ctx.plan
        self.group = ctx.groups["active"]  # workers + hub
        self.members = sorted(plan.active)
        assert plan.aggregator is not None
        self.hub = plan.aggregator
        self.is_hub = plan.rank == self.hub
        self.trains = plan.is_worker
        model = ctx.model
        model.train()
        self.checkpoint_model = model
        self.params = list(model.parameters())
        self.d = sum(p.numel() for p in self.params)
        self.rule, self.note = resolve_rule(job, len(plan.workers))
        self.kwargs = rule_kwargs(job)
        self.behavior = behavior_of(job, plan.rank) if plan.is_worker else HONEST
        self.optimizer = make_optimizer(job.optimizer, self.params, job.learning_rate)
        ctx.restore_optimizer(self.optimizer)
        self.reputation = Reputation(list(plan.workers)) if self.is_hub else None
        self.per_step = float(job.batch_size)  # examples per step and worker (set with the accumulation)
        self.rejected: Counter[int] = Counter()
        self.suspicious: Counter[int] = Counter()

    def apply(self, ctx: Ctx, step: int) -> float:
        job, d, members = ctx.job, self.d, self.members
        g = _flat_grad(self.params)
        if not is_honest(self.behavior):
            g = corrupt_gradient(g, self.behavior, seed=job.seed, rank=ctx.plan.rank, when=step)
        table = [torch.empty_like(g) for _ in members] if self.is_hub else None
        tc = time.perf_counter()
        dist.gather(g, gather_list=table, dst=self.hub, group=self.group)
        status, err = 0.0, None
        if self.is_hub:
            assert table is not None
            ctx.bytes_received += (len(members) - 1) * d * 4
            robust, status, err = self._aggregate(ctx, table)
        else:
            ctx.bytes_sent += d * 4
            robust = torch.empty(d)
        payload = torch.cat([robust, torch.tensor([status])])
        dist.broadcast(payload, src=self.hub, group=self.group)
        ctx.comm_s += time.perf_counter() - tc
        if self.is_hub:
            ctx.bytes_sent += (len(members) - 1) * payload.numel() * 4
        else:
            ctx.bytes_received += payload.numel() * 4
        if float(payload[d]) >= FAILED:
            agree(err, None, self.group)  # every member raises the hub's error
        _set_grad(self.params, payload[:d])
        gnorm = grad_norm(self.params, job.grad_clip)
        assert self.optimizer is not None
        self.optimizer.step()
        return gnorm

    def _aggregate(self, ctx: Ctx, table: list[torch.Tensor]) -> tuple[torch.Tensor, float, Any]:
        """The hub: (robust gradient, status, error) from the gathered gradients."""
        workers, reputation, rule = ctx.plan.workers, self.reputation, self.rule
        assert reputation is not None
        rows = torch.stack([table[self.members.index(r)] for r in workers]).numpy()
        counts = np.full(len(workers), self.per_step)
        weights = (reputation.weights(counts) if (ctx.job.reputation_weighting and rule in WEIGHTED_RULES)
                   else counts)
        status, err = 0.0, None
        info: dict[str, Any] = {}
        try:
            new, info = aggregate(rule, rows, weights=weights, **self.kwargs)
            if not np.isfinite(new).all():
                raise AggregationError(f"the {rule} aggregate of the gradients holds NaN or inf values")
        except AggregationError as exc:
            err, status, new = error_of(exc), FAILED, np.zeros(self.d, dtype=np.float32)
            info = failed_info(torch.from_numpy(rows))
        if info:
            for r in reputation.observe(info, rule):
                self.suspicious[r] += 1
            for i in info.get("rejected") or []:
                self.rejected[workers[i]] += 1
        return torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32)), status, err

    def before_epoch_end(self, ctx: Ctx, epoch: int, spe: int) -> None:
        if self.reputation is not None:
            self.reputation.report(ctx.sink)
            ctx.say(f"epoch {epoch}: {self.rule} over {spe} steps; updates rejected per worker "
                    f"{dict(sorted(self.rejected.items()))}, suspicious {dict(sorted(self.suspicious.items()))}; "
                    f"reputation {self.reputation.text()}")
        self.rejected.clear()
        self.suspicious.clear()


__all__ = ["run_sync_robust"]
