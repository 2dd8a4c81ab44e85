"""The epoch loop of the step-wise modes (sync, parameter server, sync under byzantine
consensus), parameterised by a :class:`StepStrategy`: how one optimizer step exchanges
gradients or parameters after this rank's forward / backward.

What the loop does for every mode: the per-epoch shard order, ``accum`` micro-batches per
step (mixed precision inside :meth:`Ctx.forward_backward`), the learning-rate schedule,
progress and the collective stop check every ``STOP_CHECK_EVERY`` steps, then per epoch the
validation, the metric sums, the dedicated aggregator's validation (:mod:`.epoch_judge`), the
per-epoch commit rule (:mod:`.epoch_commit`: proof-of-learning
rolls a rejected epoch back), reporting and the checkpoint (:meth:`Ctx.epoch_end`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .common import Sums, epoch_order
from .epoch_commit import EpochCommit
from .epoch_judge import EpochJudge
from .runtime import Ctx


class StepStrategy:
    """How one mode's rank takes part in an optimizer step. Subclasses set the attributes
    and implement :meth:`apply`; the hooks default to doing nothing."""

    trains: bool = True
    """This rank computes gradients on its own shard (False: a parameter server, a hub that
    holds no data)."""
    forward_model: nn.Module | None = None
    """What forward / backward runs through (DDP's wrapper in sync); None: ``ctx.model``."""
    no_sync: Any = None
    """DDP's ``no_sync`` so accumulation micro-batches skip the exchange; None elsewhere."""
    optimizer: torch.optim.Optimizer | None = None
    """This rank's optimizer (its learning rate follows the schedule; checkpointed)."""
    group: Any = None
    """The group that agrees on stopping and sums the epoch's metrics."""
    checkpoint_model: nn.Module | None = None
    """The model this rank validates, reports and checkpoints; None: nothing of its own."""

    def apply(self, ctx: Ctx, step: int) -> float | None:
        """After backward: exchange, update the parameters; the gradient norm to book (None:
        nothing to book on this rank)."""
        raise NotImplementedError

    def before_epoch_end(self, ctx: Ctx, epoch: int, spe: int) -> None:
        """Epoch figures of the exchange, before the metrics are recorded."""

    def epoch_stats(self, ctx: Ctx) -> dict[str, float] | None:
        """Node stats of the exchange, refreshed after the epoch's report (None: none)."""
        return None

    def close(self) -> None:
        """Release what the strategy holds (runs also when training fails)."""


class AggregatorStep(StepStrategy):
    """The dedicated aggregator during the steps: no data, no update; it keeps pace with the
    stop checks and at the epoch end validates, commits and checkpoints (:class:`.epoch_judge.EpochJudge`)."""

    trains = False

    def __init__(self, ctx: Ctx) -> None:
        ctx.model.cpu()  # it only evaluates, between epochs
        self.group = ctx.groups["active"]
        self.checkpoint_model = ctx.model
        ctx.say(f"aggregator: validates the global model every epoch on {len(ctx.judge_val or [])} examples, "
                "runs the commit rule and writes the checkpoints")

    def apply(self, ctx: Ctx, step: int) -> None:
        return None


def run_epochs(ctx: Ctx, strategy: StepStrategy, spe: int, accum: int, step: int) -> int:
    """Epochs ``ctx.start`` .. ``job.epochs`` of ``spe`` steps from global step ``step``;
    returns the step reached. Stops early when the ranks agree to."""
    job = ctx.job
    model = strategy.forward_model or ctx.model
    data = ctx.data if strategy.trains else None
    eval_model = strategy.checkpoint_model if data is not None else None
    try:
        judge = EpochJudge(ctx, strategy.group,
                           strategy.checkpoint_model if strategy.checkpoint_model is not None else ctx.model)
        gate = EpochCommit(ctx, strategy.optimizer, strategy.group, eval_model, judge)
        ctx.validate_start(eval_model, strategy.group, gate.committed_val)
        for epoch in range(ctx.start, job.epochs + 1):
            ctx.epoch = epoch
            ctx.sink.update(epoch=epoch)
            order = epoch_order(len(data.train), job.seed, epoch, ctx.plan.worker_index) if data is not None else None
            local = Sums(ctx.num_classes)
            t_epoch = time.perf_counter()
            for s in range(spe):
                t0 = time.perf_counter()
                ctx.schedule_lr(strategy.optimizer, step, spe * job.epochs)
                ctx.model.zero_grad(set_to_none=True)
                if data is not None:
                    ctx.forward_backward(model, order, s * accum, accum, local, no_sync=strategy.no_sync)
                gnorm = strategy.apply(ctx, step)
                if gnorm is not None:
                    local.add_gnorm(gnorm)
                step += 1
                if ctx.finish_step(step, t0, strategy.group):
                    break
            seconds = time.perf_counter() - t_epoch
            glob = ctx.epoch_sums(local, strategy.group, eval_model)
            extra = gate.judge(epoch, glob, judge.validate(epoch))
            final = ctx.stopped or epoch == job.epochs
            strategy.before_epoch_end(ctx, epoch, spe)
            ctx.epoch_end(epoch, step, glob, seconds, local if strategy.trains else None,
                          strategy.checkpoint_model, strategy.optimizer, final, extra=extra)
            stats = strategy.epoch_stats(ctx)
            if stats is not None:
                ctx.node_stats(**stats)
            if ctx.stopped:
                ctx.say(f"stopped after epoch {epoch} (step {step})")
                break
    finally:
        strategy.close()
    return step


__all__ = ["AggregatorStep", "StepStrategy", "run_epochs"]
