"""Synchronous data parallel: DDP over the worker ranks, gradients combined along the
cluster topology by the comm hook while backward runs."""

from __future__ import annotations

import copy
import logging

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from workers.comm import make_ddp_hook

from .common import TrainedModel, grad_norm, make_optimizer
from .loop import AggregatorStep, StepStrategy, run_epochs
from .runtime import Ctx

log = logging.getLogger(__name__)


class DDPStep(StepStrategy):
    """DDP's comm hook has combined the gradients during backward: clip, step."""

    def __init__(self, ctx: Ctx) -> None:
        job = ctx.job
        self.group = ctx.groups["active"]  # the workers, and the dedicated aggregator when there is one
        self.reducer = ctx.groups["reducer"]
        model = ctx.model.to(ctx.device)
        model.train()
        self.checkpoint_model = model
        self.ddp = DDP(model, process_group=ctx.groups["workers"],
                       device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.state, hook = make_ddp_hook(self.reducer, compression=job.gradient_compression)
        self.ddp.register_comm_hook(self.state, hook)
        self.forward_model, self.no_sync = self.ddp, self.ddp.no_sync
        self.optimizer = make_optimizer(job.optimizer, model.parameters(), job.learning_rate)
        ctx.restore_optimizer(self.optimizer)
        self.params = list(model.parameters())
        self.hook_stats: dict[str, float] = {}

    def apply(self, ctx: Ctx, step: int) -> float:
        assert self.optimizer is not None
        gnorm = grad_norm(self.params, ctx.job.grad_clip)
        self.optimizer.step()
        return gnorm

    def before_epoch_end(self, ctx: Ctx, epoch: int, spe: int) -> None:
        self.hook_stats = self.state.stats()
        rc = self.reducer.counters()
        ctx.bytes_sent, ctx.bytes_received = rc["bytes_sent"], rc["bytes_received"]

    def epoch_stats(self, ctx: Ctx) -> dict[str, float]:
        hs = self.hook_stats
        stats = {"hook_comm_s": hs["comm_seconds"]}
        if ctx.job.gradient_compression:
            stats.update(bytes_saved=hs["bytes_saved"], dense_bytes=hs["dense_bytes"], sent_bytes=hs["sent_bytes"],
                         dense_fallback_buckets=hs["dense_fallback_buckets"])
        stats["comm_s"] = ctx.comm_s + hs["comm_seconds"]  # the hook's time is not in ctx.comm_s
        return stats

    def close(self) -> None:
        self.state.close()


def run_sync(ctx: Ctx) -> TrainedModel | None:
    job, plan = ctx.job, ctx.plan
    spe, accum = ctx.steps_per_epoch(ctx.setup.worker_train_sizes)
    step = (ctx.start - 1) * spe
    if not plan.is_worker:  # the dedicated aggregator
        ctx.sink.update(total_epochs=job.epochs, total_steps=spe * job.epochs, step=step, epoch=ctx.start - 1)
        run_epochs(ctx, AggregatorStep(ctx), spe, accum, step)
        return None
    assert ctx.data is not None
    strategy = DDPStep(ctx)
    # Same initial weights everywhere (seeded build + DDP's broadcast); dropout differs per
    # worker but is reproducible, so the same seed gives the same run on every topology.
    torch.manual_seed(job.seed * 1_000_003 + plan.worker_index + 1)
    ctx.sink.update(total_epochs=job.epochs, total_steps=spe * job.epochs, step=step, epoch=ctx.start - 1)
    ctx.say(f"sync data parallel over workers {plan.workers} ({job.topology}"
            f"{f', top-{job.gradient_compression:g} compression' if job.gradient_compression else ''}): "
            f"{spe} steps per epoch of {accum} x {job.batch_size} per worker")
    ctx.report_baseline()
    run_epochs(ctx, strategy, spe, accum, step)
    # DDP left autograd hooks on the parameters; hand back a clean copy of the model, made on
    # CPU so a GPU never holds two copies.
    model = strategy.checkpoint_model
    assert model is not None
    del strategy
    return ctx.trained(copy.deepcopy(model.cpu()))
