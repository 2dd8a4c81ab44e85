"""Synchronous data parallel: DDP over the worker ranks, gradients combined along the
cluster topology by the comm hook while backward runs."""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from workers.comm import make_ddp_hook

from .common import Sums, TrainedModel, epoch_order, grad_norm, make_optimizer
from .runtime import Ctx

log = logging.getLogger(__name__)


def run_sync(ctx: Ctx) -> TrainedModel:
    job, plan = ctx.job, ctx.plan
    assert ctx.data is not None
    group = ctx.groups["workers"]
    reducer = ctx.groups["reducer"]
    model = ctx.model.to(ctx.device)
    model.train()
    ddp = DDP(model, process_group=group, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    state, hook = make_ddp_hook(reducer, compression=job.gradient_compression)
    ddp.register_comm_hook(state, hook)
    opt = make_optimizer(job.optimizer, model.parameters(), job.learning_rate)
    ctx.restore_optimizer(opt)
    params = list(model.parameters())
    spe, accum = ctx.steps_per_epoch(ctx.setup.worker_train_sizes)
    widx = plan.worker_index
    # Same initial weights everywhere (seeded build + DDP's broadcast); dropout differs per
    # worker but is reproducible, so the same seed gives the same run on every topology.
    torch.manual_seed(job.seed * 1_000_003 + widx + 1)
    step = (ctx.start - 1) * spe
    ctx.sink.update(total_epochs=job.epochs, total_steps=spe * job.epochs, step=step, epoch=ctx.start - 1)
    ctx.say(f"sync data parallel over workers {plan.workers} ({job.topology}"
            f"{f', top-{job.gradient_compression:g} compression' if job.gradient_compression else ''}): "
            f"{spe} steps per epoch of {accum} x {job.batch_size} per worker")
    ctx.report_baseline()
    n = len(ctx.data.train)
    try:
        for epoch in range(ctx.start, job.epochs + 1):
            ctx.epoch = epoch
            ctx.sink.update(epoch=epoch)
            order = epoch_order(n, job.seed, epoch, widx)
            local = Sums(ctx.num_classes)
            t_epoch = time.perf_counter()
            for s in range(spe):
                t0 = time.perf_counter()
                ctx.schedule_lr(opt, step, spe * job.epochs)
                opt.zero_grad(set_to_none=True)
                ctx.forward_backward(ddp, order, s * accum, accum, local, no_sync=ddp.no_sync)
                local.add_gnorm(grad_norm(params, job.grad_clip))
                opt.step()
                step += 1
                if ctx.finish_step(step, t0, group):
                    break
            seconds = time.perf_counter() - t_epoch
            glob = ctx.epoch_sums(local, group, model)
            hs = state.stats()
            rc = reducer.counters()
            ctx.bytes_sent, ctx.bytes_received = rc["bytes_sent"], rc["bytes_received"]
            extra = {"hook_comm_s": hs["comm_seconds"]}
            if job.gradient_compression:
                extra.update(bytes_saved=hs["bytes_saved"], dense_bytes=hs["dense_bytes"], sent_bytes=hs["sent_bytes"])
            final = ctx.stopped or epoch == job.epochs
            ctx.epoch_end(epoch, step, glob, seconds, local, model, opt, final)
            ctx.node_stats(**extra)
            ctx.sink.node_stat("comm_s", ctx.comm_s + hs["comm_seconds"])
            if ctx.stopped:
                ctx.say(f"stopped after epoch {epoch} (step {step})")
                break
    finally:
        state.close()
    # DDP left autograd hooks on the parameters; hand back a clean copy of the model, made on
    # CPU so a GPU never holds two copies.
    del ddp
    return ctx.trained(copy.deepcopy(model.cpu()))
