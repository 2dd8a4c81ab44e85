"""Proof-of-learning per epoch in the step-wise modes (sync, parameter server, sync under
byzantine consensus): the federated commit rule (:mod:`.commit`) applied at each epoch end.

Every rank of the epoch group holds what it trains or serves (a sync worker its replica and
optimizer, a parameter server its shard and the shard's optimizer, a byzantine hub its
model). At the start each of them keeps a copy in memory -- the committed state -- and the
workers' validation parts (whose union is the validation split) give its validation loss --
or, with a dedicated aggregator (:mod:`.epoch_judge`), the aggregator's validation of the
whole split. At each epoch end the validation loss of the new state is judged with
:func:`.consensus.pol_accepts` against the committed one: within ``pol_tolerance`` it becomes
the committed state; otherwise every rank loads the committed copy back (the rollback needs
no transfer), the epoch counts in ``rejected_rounds`` and the epoch reports the committed
model's validation figures. The verdict is the same on every rank: it is computed from the
same all-reduced sums (or the figures the aggregator broadcast).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

from .commit import start_proof_of_learning
from .common import Sums, evaluate
from .consensus import pol_accepts
from .epoch_judge import EpochJudge
from .runtime import Ctx


def _val_loss(sums: Sums, judged: dict[str, float]) -> float | None:
    """The aggregator's validation loss when it judged, else the workers' summed parts'."""
    if "judged_val_loss" in judged:
        return judged["judged_val_loss"]
    n = sums.val["val_count"]
    return sums.val["val_loss_sum"] / n if n > 0 else None


class EpochCommit:
    """The per-epoch commit rule of one rank (a no-op unless the consensus is proof-of-learning)."""

    def __init__(self, ctx: Ctx, optimizer: Any, group: Any, eval_model: nn.Module | None,
                 judge: EpochJudge) -> None:
        self.ctx, self.optimizer, self.group = ctx, optimizer, group
        self.active = ctx.plan.consensus == "proof-of-learning"
        self.says = ctx.is_reporter or ctx.plan.rank == judge.rank  # the aggregator shows the rule's figures too
        self.rejected = 0
        self.prev_loss: float | None = None
        self.committed_val: Sums | None = None
        self.committed_judged: dict[str, float] = {}
        self._state: dict[str, Any] | None = None
        if not self.active:
            return
        sums = Sums(ctx.num_classes)
        if eval_model is not None and ctx.data is not None:
            sums.set_val(evaluate(eval_model, ctx.data.val, ctx.kind, ctx.num_classes))
        self.committed_val = ctx.reduce_sums(sums, group)
        self.committed_judged = judge.validate(0)
        self.prev_loss = _val_loss(self.committed_val, self.committed_judged)
        self._keep()
        if self.says:
            by = ("the aggregator on the whole validation split" if self.committed_judged
                  else "the workers' validation parts")
            start_proof_of_learning(ctx, self.prev_loss, "epoch", by, ("rejected_rounds",))

    def _keep(self) -> None:
        self._state = {"model": copy.deepcopy(self.ctx.model.state_dict()),
                       "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None}

    def _restore(self) -> None:
        assert self._state is not None
        self.ctx.model.load_state_dict(self._state["model"])
        if self.optimizer is not None and self._state["optimizer"] is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._state["optimizer"]))

    def judge(self, epoch: int, glob: Sums, judged: dict[str, float]) -> dict[str, float]:
        """Commit or roll back this epoch; ``glob`` (the epoch's summed figures) and ``judged``
        (the aggregator's, see :class:`.epoch_judge.EpochJudge`) get the committed model's
        validation figures when the epoch is rejected. Returns the epoch's metrics of the
        aggregator and the rule."""
        ctx = self.ctx
        if not self.active or self.prev_loss is None:
            return dict(judged)
        loss = _val_loss(glob, judged)
        if loss is not None and pol_accepts(self.prev_loss, loss, ctx.job.pol_tolerance):
            self.prev_loss, self.committed_val = loss, copy.deepcopy(glob)
            self.committed_judged = dict(judged)
            self._keep()
        else:
            self.rejected += 1
            self._restore()
            assert self.committed_val is not None
            glob.val = dict(self.committed_val.val)
            glob.tp, glob.fp, glob.fn = self.committed_val.tp, self.committed_val.fp, self.committed_val.fn
            judged = dict(self.committed_judged)
            if ctx.is_reporter:
                now = f"{loss:.4g}" if loss is not None and math.isfinite(loss) else "not finite"
                ctx.say(f"epoch {epoch} rejected: val loss {self.prev_loss:.4g} -> {now}; back to the committed model")
        if self.says:
            ctx.sink.node_stat("rejected_rounds", self.rejected)
        return {**judged, "rejected_rounds": float(self.rejected)}


__all__ = ["EpochCommit"]
