"""Commit rules of federated training: what a round does with the candidate global model
once every member holds it (the round loop in :mod:`.federated` runs them, the way Flower
separates a strategy from the loop that runs it).

* :class:`PlainCommit` -- every candidate is the new global model (consensus ``byzantine``:
  the robustness is in the aggregation rule).
* :class:`ProofOfLearningCommit` -- every worker's update is scored on the validation split
  before aggregation (:meth:`~PlainCommit.screen`): an update whose validation loss is worse
  than the committed model's beyond the tolerance is left out of the aggregate. The judges'
  validation loss of the aggregate of the accepted updates then decides
  (:func:`.consensus.pol_accepts`); a rejected round rolls every member back to the last
  committed model, which each keeps in memory.
* :class:`RaftCommit` -- every member stores the version and acknowledges; a majority
  commits it (:class:`.consensus.RaftReplica`).

:func:`commit_rule` picks the rule for the job's consensus.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import checkpoint_payload, write_atomic
from .common import Sums, evaluate, flat_weights, set_weights
from .consensus import RaftReplica, majority, pol_accepts
from .runtime import Ctx


def broadcast(ctx: Ctx, t: torch.Tensor, src: int, group: object, members: list[int]) -> None:
    """``dist.broadcast`` of ``t`` over ``members``, counted in this rank's traffic and time."""
    t0 = time.perf_counter()
    dist.broadcast(t, src=src, group=group)
    ctx.comm_s += time.perf_counter() - t0
    if ctx.plan.rank == src:
        ctx.bytes_sent += (len(members) - 1) * t.numel() * t.element_size()
    else:
        ctx.bytes_received += t.numel() * t.element_size()


def evaluate_members(ctx: Ctx, model: nn.Module, group: object,
                     judge: bool) -> tuple[Sums, float | None, str | None]:
    """Evaluate the model every member holds: workers on their validation parts (summed:
    the reported metrics) and, with ``judge``, judges on the whole validation split.

    Returns (summed validation sums, the judged validation loss, its source): the judges'
    loss ("judges"), or when no judge holds data the workers' ("workers"), or (None, None)
    when there is no validation data at all."""
    val = Sums(ctx.num_classes)
    if ctx.plan.is_worker and ctx.data is not None:
        val.set_val(evaluate(model, ctx.data.val, ctx.kind, ctx.num_classes))
    judged = [0.0, 0.0]
    if judge and ctx.judge_val is not None:
        ev = evaluate(model, ctx.judge_val, ctx.kind, ctx.num_classes)
        judged = [ev["loss_sum"], ev["count"]]
    t = torch.cat([val.tensor(), torch.tensor(judged, dtype=torch.float64)])
    ctx.coord.meet(group)  # the judges' evaluation may outlast the process-group timeout
    t0 = time.perf_counter()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    ctx.comm_s += time.perf_counter() - t0
    glob = Sums.from_tensor(t[:-2], ctx.num_classes)
    if not judge:
        return glob, None, None
    if float(t[-1]) > 0:
        return glob, float(t[-2] / t[-1]), "judges"
    if glob.val["val_count"] > 0:
        return glob, glob.val["val_loss_sum"] / glob.val["val_count"], "workers"
    return glob, None, None


def start_proof_of_learning(ctx: Ctx, loss: float | None, unit: str, judged_by: str, counters: tuple[str, ...]) -> None:
    """What both proof-of-learning rules (per round here, per epoch in :mod:`.epoch_commit`) do once
    the start's model is measured, on the node that shows the rule's figures: its counters at 0
    and one sentence naming the reference loss, the tolerance and who judges."""
    for name in counters:
        ctx.sink.node_stat(name, 0)
    if loss is None:
        ctx.say(f"proof-of-learning: no validation data (validation_split 0); {unit}s are committed unchecked")
    else:
        ctx.say(f"proof-of-learning per {unit}: initial validation loss {loss:.4g}, tolerance "
                f"{ctx.job.pol_tolerance:g} (relative), judged by {judged_by}")


class PlainCommit:
    """Every candidate becomes the global model."""

    rejects_failed_aggregation = False
    """True: a round whose aggregation failed is rejected; False: the job fails."""

    def __init__(self, ctx: Ctx, model: nn.Module, group: object, members: list[int]) -> None:
        self.ctx, self.model, self.group, self.members = ctx, model, group, members
        self.is_leader = ctx.plan.rank == ctx.plan.aggregator
        self.committed = torch.empty(0)
        """The last committed global model (flat weights), kept by every member."""

    def start(self, initial: torch.Tensor) -> None:
        """Round 0: every member holds ``initial``, the first committed model."""
        self.committed = initial.clone()

    def resume_fields(self) -> dict[str, Any]:
        """What a checkpoint written mid-session needs for the rule to resume from it (raft: its log)."""
        return {}

    def screen(self, rnd: int, updates: torch.Tensor | None, n: int) -> list[int] | None:
        """Collective, before aggregation: the positions (0..n-1, worker order) of the worker
        updates the aggregate may use, or None for all. ``updates`` (n x d) is given on the
        aggregator only."""
        return None

    def commit(self, rnd: int, candidate: torch.Tensor, formed: bool) -> tuple[Sums | None, dict[str, float]]:
        """Decide on ``candidate`` (loaded in the model; ``formed`` False: aggregation failed).
        Returns the round's summed validation figures when the rule measured them, and the
        rule's metrics of the round."""
        self.committed = candidate
        return None, {}


class ProofOfLearningCommit(PlainCommit):
    """Commit when the judged validation loss rises at most ``pol_tolerance`` (relative)."""

    rejects_failed_aggregation = True

    def __init__(self, ctx: Ctx, model: nn.Module, group: object, members: list[int]) -> None:
        super().__init__(ctx, model, group, members)
        self.committed_val: Sums | None = None
        self.prev_loss: float | None = math.inf
        self.rejected_rounds = 0
        self.excluded_updates = 0

    def start(self, initial: torch.Tensor) -> None:
        super().start(initial)
        ctx = self.ctx
        self.committed_val, self.prev_loss, source = evaluate_members(ctx, self.model, self.group, judge=True)
        if self.is_leader:
            start_proof_of_learning(ctx, self.prev_loss, "round", self._judged_by(source),
                                    ("rejected_rounds", "excluded_updates"))

    def _judged_by(self, source: str | None) -> str:
        plan = self.ctx.plan
        if source == "judges":
            return f"rank(s) {plan.judges} (validators / the validation capability, else the aggregator)"
        if source == "workers":
            return "the workers' validation parts (no judge holds the validation split)"
        return "nobody (no validation data)"

    def screen(self, rnd: int, updates: torch.Tensor | None, n: int) -> list[int] | None:
        """Score every worker's update on the validation split (the same judges and split as
        the committed model's loss) and keep those within the tolerance. The aggregator sends
        the n updates to every member; each member evaluates them on what it holds and one
        all-reduce sums the scores, so every member reaches the same verdict."""
        ctx = self.ctx
        if self.prev_loss is None or not math.isfinite(self.prev_loss):
            return None  # nothing to judge against (no validation data)
        d = self.committed.numel()
        table = updates.contiguous().float() if self.is_leader and updates is not None else torch.empty(n, d)
        broadcast(ctx, table, ctx.plan.aggregator, self.group, self.members)
        own = flat_weights(self.model)  # a worker's own trained weights, restored below
        scores = torch.zeros(n, 4, dtype=torch.float64)  # workers' loss sum, count; judges' loss sum, count
        for i in range(n):
            if not bool(torch.isfinite(table[i]).all()):
                scores[i] = math.nan
                continue
            set_weights(self.model, table[i])
            if ctx.plan.is_worker and ctx.data is not None:
                ev = evaluate(self.model, ctx.data.val, ctx.kind, ctx.num_classes)
                scores[i, 0], scores[i, 1] = ev["loss_sum"], ev["count"]
            if ctx.judge_val is not None:
                ev = evaluate(self.model, ctx.judge_val, ctx.kind, ctx.num_classes)
                scores[i, 2], scores[i, 3] = ev["loss_sum"], ev["count"]
        set_weights(self.model, own)
        ctx.coord.meet(self.group)  # n evaluations of the whole validation split on a judge take long
        t0 = time.perf_counter()
        dist.all_reduce(scores, op=dist.ReduceOp.SUM, group=self.group)
        ctx.comm_s += time.perf_counter() - t0
        losses = [_mean_loss(row) for row in scores.tolist()]
        kept = [i for i, x in enumerate(losses) if pol_accepts(self.prev_loss, x, ctx.job.pol_tolerance)]
        self.excluded_updates += n - len(kept)
        if self.is_leader:
            ctx.sink.node_stat("excluded_updates", self.excluded_updates)
            if len(kept) < n:
                workers = ctx.plan.workers
                out = ", ".join(f"{workers[i]} ({losses[i]:.4g})" for i in range(n) if i not in kept)
                ctx.say(f"round {rnd}: proof-of-learning left out the update of worker rank(s) {out}: validation "
                        f"loss worse than the committed {self.prev_loss:.4g} beyond tolerance "
                        f"{ctx.job.pol_tolerance:g}")
        return kept

    def commit(self, rnd: int, candidate: torch.Tensor, formed: bool) -> tuple[Sums | None, dict[str, float]]:
        ctx = self.ctx
        loss: float | None = None
        val: Sums | None = None
        if formed:
            val, loss, _ = evaluate_members(ctx, self.model, self.group, judge=True)
            if ctx.judge_val is not None and loss is not None:
                ctx.sink.node_stat("candidate_val_loss", loss)
        verdict = torch.tensor([0.0])
        if self.is_leader:  # the aggregator's verdict holds for everyone
            prev = self.prev_loss
            ok = formed and (loss is None or prev is None or pol_accepts(prev, loss, ctx.job.pol_tolerance))
            verdict[0] = 1.0 if ok else 0.0
        broadcast(ctx, verdict, ctx.plan.aggregator, self.group, self.members)
        if verdict.item() > 0:
            self.committed, self.committed_val = candidate, val
            self.prev_loss = loss if loss is not None else self.prev_loss
        else:
            self.rejected_rounds += 1
            set_weights(self.model, self.committed)
            val = self.committed_val
            if self.is_leader:
                was = f"{self.prev_loss:.4g}" if self.prev_loss is not None else "?"
                now = f"{loss:.4g}" if loss is not None else "no candidate"
                ctx.say(f"round {rnd} rejected: val loss {was} -> {now}")
        if self.is_leader:
            ctx.sink.node_stat("rejected_rounds", self.rejected_rounds)
        return val, {"rejected_rounds": float(self.rejected_rounds), "excluded_updates": float(self.excluded_updates)}


def _mean_loss(row: list[float]) -> float:
    """An update's validation loss from its summed scores: the judges' when they hold the
    split, else the workers' parts (the same source as the committed model's loss)."""
    w_sum, w_n, j_sum, j_n = row
    if j_n > 0:
        return j_sum / j_n
    return w_sum / w_n if w_n > 0 else math.nan


class RaftCommit(PlainCommit):
    """The aggregator leads (term ``job.raft_term``); a version commits with a majority of
    acknowledgements (stored copies), else everyone keeps the previous one."""

    def __init__(self, ctx: Ctx, model: nn.Module, group: object, members: list[int]) -> None:
        super().__init__(ctx, model, group, members)
        self.term = ctx.job.raft_term  # the server bumps it when a surviving node takes over as leader
        raft_ck = (ctx.ckpt or {}).get("raft") or {}
        self.commit_index = int(raft_ck.get("commit_index") or 0)
        self.replica = RaftReplica(ctx.sandbox, self._write, version=int(raft_ck.get("version") or 0))

    def _write(self, path: Path, version: int) -> None:
        ctx = self.ctx
        write_atomic(path, checkpoint_payload(
            ctx.job, version, self.model, None, ctx.setup.task, ctx.setup.tokenizer, ctx.setup.label_names,
            ctx.setup.max_len, ctx.latest,
            raft={"term": self.term, "version": version, "commit_index": self.commit_index + 1,
                  "leader": ctx.plan.aggregator}),
            ctx.quota)

    def resume_fields(self) -> dict[str, Any]:
        return {"raft": {"term": self.term, "version": self.replica.version, "commit_index": self.commit_index,
                         "leader": self.ctx.plan.aggregator}}

    def start(self, initial: torch.Tensor) -> None:
        super().start(initial)
        if self.is_leader:
            n = len(self.members)
            self.ctx.sink.node_stat("raft_term", self.term)
            self.ctx.sink.node_stat("raft_commit_index", self.commit_index)
            self.ctx.say(f"raft: leader rank {self.ctx.plan.aggregator}, term {self.term}; a version commits "
                         f"with a majority of {n // 2 + 1} of {n} acknowledgements")

    def commit(self, rnd: int, candidate: torch.Tensor, formed: bool) -> tuple[Sums | None, dict[str, float]]:
        ctx, replica, n = self.ctx, self.replica, len(self.members)
        ack = torch.tensor([1.0 if replica.store(rnd, candidate) else 0.0])
        acks = [torch.zeros(1) for _ in self.members]
        t0 = time.perf_counter()
        dist.all_gather(acks, ack, group=self.group)
        ctx.comm_s += time.perf_counter() - t0
        if majority([float(a) for a in acks], n):  # the same decision on every member
            if not replica.commit(rnd, candidate):
                ctx.say(f"round {rnd}: version {rnd} is committed but this node could not record it in "
                        f"{replica.committed_path}")
            self.commit_index += 1
            self.committed = candidate
        else:
            replica.discard()
            set_weights(self.model, self.committed)
            if self.is_leader:
                ctx.say(f"round {rnd}: version {rnd} not committed ({int(sum(float(a) for a in acks))} of "
                        f"{n} acknowledged); keeping version {replica.version}")
        if self.is_leader:
            ctx.sink.node_stat("raft_commit_index", self.commit_index)
        return None, {"raft_commit_index": float(self.commit_index)}


COMMIT_RULES: dict[str, type[PlainCommit]] = {
    "proof-of-learning": ProofOfLearningCommit,
    "raft": RaftCommit,
    "byzantine": PlainCommit,
}


def commit_rule(consensus: str) -> type[PlainCommit]:
    """The commit rule of a central federated consensus (gossip has no central round)."""
    return COMMIT_RULES.get(consensus, PlainCommit)


__all__ = ["COMMIT_RULES", "PlainCommit", "ProofOfLearningCommit", "RaftCommit", "broadcast", "commit_rule",
           "evaluate_members", "start_proof_of_learning"]
