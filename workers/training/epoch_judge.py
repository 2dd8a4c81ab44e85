"""The dedicated aggregator's part in the step-wise modes (sync, parameter server).

There the workers (or the parameter servers) update the model step by step; a node with
role ``aggregator`` does not train. It takes part at every epoch end instead: the reporter
(the first worker) sends it the epoch's global model over a group of the two, it evaluates
that model on the whole validation split (held since phase 1, like a federated judge) and
broadcasts the figures to every active rank. The per-epoch commit rule (:mod:`.epoch_commit`)
then judges on these figures, the same on every rank, and the aggregator writes the
checkpoints (the best one kept). Its node stats say what it did: ``consensus_rounds`` (epochs
judged) and ``avg_consensus_ms`` (send, validation and broadcast of one epoch).

Without an aggregator, or when it cannot read the data (files private to the workers), the
workers' validation parts judge as before.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .common import evaluate, flat_weights, set_weights
from .runtime import Ctx


class EpochJudge:
    """One rank's side of the aggregator's per-epoch validation (a no-op without one)."""

    def __init__(self, ctx: Ctx, group: Any, model: nn.Module) -> None:
        self.ctx, self.group, self.model = ctx, group, model
        plan = ctx.plan
        self.rank = plan.epoch_judge
        self.active = self.rank is not None
        self.pair = ctx.groups.get("epoch_judge")
        self.rounds, self.seconds = 0, 0.0

    def validate(self, epoch: int) -> dict[str, float]:
        """Collective over the active ranks: the aggregator's validation figures of the model the
        workers hold now (``judged_val_loss``, ``judged_val_accuracy``; {} when it holds no
        validation data)."""
        if not self.active:
            return {}
        ctx, plan = self.ctx, self.ctx.plan
        t0 = time.perf_counter()
        if plan.rank in (plan.reporter, self.rank):
            flat = flat_weights(self.model).cpu()  # the aggregator's own copy gives the size
            dist.broadcast(flat, src=plan.reporter, group=self.pair)
            if plan.rank == plan.reporter:
                ctx.bytes_sent += flat.numel() * 4
            else:
                ctx.bytes_received += flat.numel() * 4
                set_weights(self.model, flat)
        figures = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        if plan.rank == self.rank:
            ev = evaluate(self.model, ctx.judge_val, ctx.kind, ctx.num_classes)
            figures[0], figures[1], figures[2] = ev["loss_sum"], ev["correct"], ev["count"]
        dist.broadcast(figures, src=self.rank, group=self.group)
        seconds = time.perf_counter() - t0
        ctx.comm_s += seconds
        if figures[2] <= 0:
            return {}
        loss, accuracy = float(figures[0] / figures[2]), float(figures[1] / figures[2])
        if plan.rank == self.rank and epoch > 0:  # epoch 0: the start's model, the rule's reference
            self.rounds += 1
            self.seconds += seconds
            ctx.sink.node_stat("consensus_rounds", self.rounds)
            ctx.sink.node_stat("avg_consensus_ms", 1000.0 * self.seconds / self.rounds)
            ctx.say(f"epoch {epoch}: validated the global model on {int(figures[2]):,} examples: val loss "
                    f"{loss:.4g}, accuracy {accuracy:.4f} ({1000.0 * seconds:.0f} ms)")
        return {"judged_val_loss": loss, "judged_val_accuracy": accuracy}


__all__ = ["EpochJudge"]
