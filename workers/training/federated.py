"""Federated averaging, with the central consensus modes.

Per round: the aggregator's global weights are on every worker (``dist.broadcast`` on the
group [aggregator] + workers [+ validators]); each worker trains ``local_epochs`` on its own
shard with its own optimizer; the flattened local weights, the worker's sample count and its
training sums travel to the aggregator in one ``dist.gather``; the aggregator combines them
with ``workers.aggregation.aggregate`` and broadcasts the candidate global model with the
agreed stop flag; workers evaluate it on their validation parts and the sums are
all-reduced. Raw examples never leave a worker.

Consensus (``job.consensus``):

* ``proof-of-learning`` (the default): the candidate is evaluated on the validation split by
  the validator rank(s) -- each loads the dataset's seeded validation split, the same split
  the workers cut their validation parts from -- or by the aggregator when there is no
  validator (with data private to the workers, or when no judge can read the dataset, the
  workers' validation parts, whose union is the validation split, are used). Before
  aggregation every worker's update is scored the same way (the aggregator sends the n updates
  to the members, who evaluate them and all-reduce the scores); an update worse than the last
  committed model beyond the tolerance is left out of the aggregate (``excluded_updates``)
  and counts against its sender's reputation, so one bad update cannot veto the honest ones.
  The aggregate of the accepted updates is then judged: it is committed
  when its validation loss is at most ``(1 + pol_tolerance)`` x that of the last committed
  global model (round 1: the initial model). Otherwise the round is rejected: every member
  goes back to the last committed model, which each of them keeps in memory (so the rollback
  needs no transfer), ``rejected_rounds`` grows (node stat and per-round metric on the
  reporter) and the aggregator logs "round N rejected: val loss X -> Y". A candidate that
  cannot be formed (e.g. FedAvg over a NaN update) is rejected the same way.
* ``byzantine``: the aggregator applies the job's robust rule (``f = byzantine_f``,
  ``beta = trim_beta``, ``m = multi_krum_m``); a job left at the default ``fedavg`` gets krum
  (n >= 2f + 3) or the coordinate median (see :mod:`.consensus`).
* ``raft``: the aggregator is the leader (term ``job.raft_term``, 1 at the start). Each round it sends the new version
  to every worker and validator (the broadcast); each member stores it (in memory and as
  ``<sandbox>/raft/pending.safetensors``) and acknowledges (``all_gather`` of ack flags); with a
  majority of the group (the leader included) the version is committed everywhere
  (``pending.safetensors`` renamed over ``raft/committed.safetensors``, a normal checkpoint that
  ``resume_from`` accepts) and ``raft_commit_index`` grows; without one, everyone keeps the
  previous version. Leader takeover after the leader dies is orchestrated by the server: it
  re-forms the group without the dead node and starts the job again with ``resume_from`` set
  to ``raft/committed.safetensors`` on a surviving node, which continues from the committed round.
* ``gossip`` has no aggregator: see :mod:`.gossip`.

In every central mode the aggregator keeps a reputation per worker rank (:class:`.consensus.
Reputation`), reported as node stats ``reputation_rank<r>`` and ``rejected_updates`` (updates
the rule left out), with one log line per round; with ``reputation_weighting`` FedAvg and
Multi-Krum weigh each update by sample count x reputation. Workers with a non-honest
``behaviors[rank]`` corrupt the weights they send (simulation, :mod:`.adversary`).

The round loop here gathers, aggregates (``workers.aggregation``) and broadcasts; what is then
committed is decided by the consensus' commit rule (:mod:`.commit`).

``secure_aggregation``: the weights travel masked, through the rendezvous store
(:mod:`.secure_round`; keys and secret shares at the start of the round, the masked updates after
local training), with every member's row of figures; only the sum reaches the aggregator. A worker
that dies mid-round is recovered there: the survivors' shares remove its masks and the aggregate is
the survivors' FedAvg. This job's groups still hold the dead rank, so the aggregator checkpoints the
round's candidate (``secagg_pending``) and the survivors end the job (:class:`SurvivorsGoOn`); the
server re-forms the group over them and resumes, and the new job commits that round first
(:func:`_commit_pending`) on the survivors.

While workers train, the aggregator (and workers that finish early) wait on the rendezvous
store, not in a collective, so a round may take longer than the process-group timeout.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from workers.aggregation import AggregationError, aggregate
from workers.privacy import RoundCost, budget_refusal, central_aggregate, central_cost, clip_update, noised_mean
from workers.protocol import SECAGG_HANDOVER, Behavior
from workers.secagg import default_threshold

from .adversary import HONEST, behavior_of, corrupt_weights, describe, is_honest
from .commit import PlainCommit, broadcast, commit_rule, evaluate_members
from .common import Sums, TrainedModel, TrainingError, epoch_order, flat_weights, grad_norm, make_optimizer, set_weights
from .consensus import WEIGHTED_RULES, Reputation, resolve_rule, rule_kwargs
from .coord import agree, error_of
from .private import LocalDP, SecAggStats, session_cost
from .runtime import Ctx
from .secure_round import DROPOUT_AFTER_S, SecureRound
from .shards import ShardClient, federation_members, run_shard_server

log = logging.getLogger(__name__)

FAILED = 2.0
"""Flag value the aggregator broadcasts when aggregation failed (1.0 = stop)."""

# Extra values after the weights in a worker's gathered row.
_ROW = ("n_examples", "flag", "loss_sum", "correct", "count", "samples", "tokens", "gnorm_sum", "gnorm_n", "lr")

OK, INVALID = 0.0, 1.0
"""Candidate status in the broadcast: formed, or not (aggregation failed: rejected under PoL)."""


@dataclass
class _Federation:
    """What one rank holds through the rounds of a central federated job."""

    group: Any  # [aggregator] + workers (+ validators under PoL / raft)
    worker_group: Any
    members: list[int]  # group-rank order of the gather list
    agg: int
    is_agg: bool
    d: int  # flat weights
    rule: str
    kwargs: dict[str, Any]
    behavior: Behavior
    opt: torch.optim.Optimizer | None
    reputation: Reputation | None
    spe: int
    accum: int
    commit: PlainCommit
    last_round: int = 0  # job.rounds, or fewer when target_epsilon allows fewer
    dp_cost: RoundCost | None = None  # what one round spends (differential_privacy)
    local_dp: LocalDP | None = None  # this worker's DP-SGD (local differential privacy)
    secagg: SecAggStats | None = None  # secure aggregation's cost on this rank
    threshold: int = 0  # secure aggregation: shares needed to unmask (t of the session's n workers)
    agg_seconds: float = 0.0
    rounds_done: int = 0
    shards: ShardClient | None = None  # the parameter servers that hold the global model, if any
    round_started: float = 0.0  # perf_counter() at the start of the current round


class SurvivorsGoOn(TrainingError):
    """A worker dropped out of a secure-aggregation round and the survivors recovered its sum: the
    job ends here on every survivor (its process group holds the dead rank), the aggregator having
    written the round's candidate into a checkpoint; the server re-forms the group over the
    survivors and resumes from it, and the survivors commit that round first (:func:`_commit_pending`)."""


@dataclass
class _Outcome:
    """What the aggregator decided in a round (placeholders on the other ranks)."""

    weights: torch.Tensor  # the candidate global model
    flag: float  # 1.0: stop after this round; FAILED: aggregation failed
    status: float  # OK | INVALID
    error: Any  # the aggregation error (FAILED)
    train: Sums  # the workers' summed training figures


def run_federated(ctx: Ctx) -> TrainedModel | None:
    if ctx.plan.rank in ctx.plan.ps:
        return run_shard_server(ctx)  # holds a shard of the global model (:mod:`.shards`)
    fed = _start(ctx)
    local_model: nn.Module | None = None
    first, stopping = ctx.start, False
    pending = (ctx.ckpt or {}).get("secagg_pending")
    if pending is not None and int(pending["round"]) == ctx.start:
        stopping, local_model = _commit_pending(ctx, fed, pending)
        first += 1
    for rnd in range(first, fed.last_round + 1):
        if stopping:
            break
        stopping, last_local = _round(ctx, fed, rnd)
        local_model = last_local or local_model
    if fed.local_dp is not None:
        fed.local_dp.close()
    if not ctx.plan.is_worker and not fed.is_agg:
        return None  # a validator holds no model of its own
    return ctx.trained(ctx.model, local_model)


def _start(ctx: Ctx) -> _Federation:
    """Optimizer, rule and reputation; round 0: every member holds the aggregator's model."""
    job, plan = ctx.job, ctx.plan
    agg = plan.aggregator
    assert agg is not None
    group = ctx.groups.get("federation") or ctx.groups["active"]
    members = federation_members(plan)
    is_agg, is_worker = plan.rank == agg, plan.is_worker
    model = ctx.model
    model.train()
    d = flat_weights(model).numel()
    rule, note = resolve_rule(job, len(plan.workers))
    behavior = behavior_of(job, plan.rank) if is_worker else HONEST
    opt = None
    if is_worker:
        opt = make_optimizer(job.optimizer, model.parameters(), job.learning_rate)
        if ctx.ckpt is not None and ctx.ckpt.get("mode") == "federated" and plan.rank == agg:
            ctx.restore_optimizer(opt)  # the checkpoint holds the aggregator's own (worker) optimizer
        torch.manual_seed(job.seed * 1_000_003 + plan.worker_index + 1)
    spe, accum = ctx.steps_per_epoch([len(ctx.data.train)]) if (is_worker and ctx.data) else (0, 1)
    ctx.sink.update(total_epochs=job.rounds, total_steps=job.rounds, step=ctx.start - 1, epoch=ctx.start - 1)
    if is_agg:
        ctx.say(f"federated averaging ({rule}, consensus {plan.consensus}) over workers {plan.workers}, aggregator "
                f"rank {agg}: {job.rounds} rounds x {job.local_epochs} local epochs, {d:,} weights")
        if note:
            ctx.say(note)
    if not is_honest(behavior):
        ctx.say(f"ADVERSARY SIMULATION: this worker sends corrupted weights ({describe(behavior)}); "
                "its local training stays honest")
    reputation = Reputation(list(plan.workers)) if is_agg else None
    if reputation is not None:
        reputation.report(ctx.sink)
    dp_cost, last_round = _privacy_plan(ctx, is_agg)
    local_dp = None
    if is_worker and job.differential_privacy is not None and job.differential_privacy.mode == "local":
        assert opt is not None
        local_dp = LocalDP(ctx, model, opt)
    if job.secure_aggregation and is_agg:
        ctx.say(f"secure aggregation: {len(plan.workers)} workers mask their updates pairwise (X25519, "
                f"ChaCha20 masks over 2^64 fixed point), unmasking threshold "
                f"{default_threshold(len(plan.workers))}; the aggregator sees only the sum")
    ctx.report_baseline()
    if job.differential_privacy is not None or job.secure_aggregation:
        ctx.coord.barrier("privacy-ready", members)  # opacus' import may take long: wait on the store

    initial = flat_weights(model)
    shards = ShardClient(ctx, members) if plan.ps else None
    if shards is not None:
        initial = shards.start(initial)  # handed to the parameter servers, pulled back from them
    else:
        broadcast(ctx, initial, agg, group, members)
    set_weights(model, initial)
    commit = commit_rule(plan.consensus)(ctx, model, group, members)
    commit.start(initial)
    return _Federation(group=group, worker_group=ctx.groups.get("workers"), members=members, agg=agg,
                       is_agg=is_agg, d=d, rule=rule, kwargs=rule_kwargs(job), behavior=behavior, opt=opt,
                       reputation=reputation, spe=spe, accum=accum, commit=commit, last_round=last_round,
                       dp_cost=dp_cost, local_dp=local_dp,
                       secagg=SecAggStats() if job.secure_aggregation else None,
                       threshold=default_threshold(len(plan.workers)), shards=shards)


def _privacy_plan(ctx: Ctx, is_agg: bool) -> tuple[RoundCost | None, int]:
    """(what a round spends, the last round to run) under differential_privacy; every rank
    computes the same from the job and the shard sizes, so they stop together. A target that
    not even one round fits fails the job before any training."""
    job = ctx.job
    dp = job.differential_privacy
    if dp is None:
        return None, job.rounds
    if dp.mode == "local":
        cost = session_cost(ctx)
        what = f"local DP-SGD ({job.local_epochs} local epoch(s) at sample rate {cost.sample_rate:.3g})"
    else:
        cost, what = central_cost(dp, len(ctx.plan.workers)), "central DP"
    if refusal := budget_refusal(cost, dp.target_epsilon, what):
        raise TrainingError(refusal)
    last = job.rounds
    if dp.target_epsilon is not None:
        last = min(job.rounds, cost.affordable_rounds(dp.target_epsilon, job.rounds))
    if is_agg:
        planned = cost.after(job.rounds)
        ctx.say(f"differential privacy ({dp.mode}): noise_multiplier {dp.noise_multiplier:g}, max_grad_norm "
                f"{dp.max_grad_norm:g}; epsilon after {job.rounds} rounds {planned:.3g} at delta {cost.delta:.3g}"
                + (f"; target_epsilon {dp.target_epsilon:g} allows {last} round(s)"
                   if dp.target_epsilon is not None else ""))
    return cost, last


def _round(ctx: Ctx, fed: _Federation, rnd: int) -> tuple[bool, nn.Module | None]:
    """One round: local training, gather, aggregate, broadcast, commit, report. Returns
    (stopping, this worker's own model when the round is its last)."""
    ctx.epoch = rnd
    ctx.sink.update(epoch=rnd)
    t_round = fed.round_started = time.perf_counter()
    local = Sums(ctx.num_classes)
    secure = None
    if fed.secagg is not None:  # keys and secret shares first: a worker lost while training is recovered
        secure = SecureRound(ctx.coord, rnd, ctx.plan.workers, fed.agg, ctx.plan.rank, fed.threshold)
        secure.share_keys()
    if ctx.plan.is_worker:
        # under secure aggregation no gloo collective may span the workers while they train: one
        # could die, and its masks are recovered only if the others reach the masked sum
        local_training(ctx, ctx.model, fed.opt, rnd, local, fed.worker_group if secure is None else None,
                       fed.spe, fed.accum, fed.local_dp)
    outcome = _gather(ctx, fed, rnd, local) if secure is None else _secure_gather(ctx, fed, rnd, local, secure)
    return _finish_round(ctx, fed, rnd, outcome, local, t_round)


def _gather(ctx: Ctx, fed: _Federation, rnd: int, local: Sums) -> _Outcome:
    """The weights in the clear: every member's row gathered on the aggregator, screened by the
    commit rule, aggregated."""
    d = fed.d
    # long waits happen here, on the store; a stop request (the user's, or an elastic boundary) waits for
    # the round's end, when the workers arrive with the stop flag
    ctx.coord.barrier(f"round-{rnd}", fed.members, patient=True)
    row = _row(ctx, fed, local, rnd)
    t0 = time.perf_counter()
    table = [torch.empty_like(row) for _ in fed.members] if fed.is_agg else None
    dist.gather(row, gather_list=table, dst=fed.agg, group=fed.group)
    ctx.comm_s += time.perf_counter() - t0
    rows = _worker_rows(ctx, fed, table) if fed.is_agg else None  # stacked once: screened, then aggregated
    kept = fed.commit.screen(rnd, rows[:, :d] if rows is not None else None, len(ctx.plan.workers))
    if not fed.is_agg:
        ctx.bytes_sent += row.numel() * 4
        return _Outcome(torch.empty(d), 0.0, OK, None, Sums(ctx.num_classes))
    assert table is not None and rows is not None
    return _Outcome(*_aggregate(ctx, fed, table, rows, rnd, None, kept))


def _secure_gather(ctx: Ctx, fed: _Federation, rnd: int, local: Sums, secure: SecureRound) -> _Outcome:
    """The weights masked (secure aggregation, over the store): the aggregator gets the sum of the
    surviving workers' vectors and every member's row without weights. proof-of-learning cannot
    score single updates here, so only the aggregate is judged (the session's start message says
    so). When a worker dropped out, the survivors hand the round over (:func:`_hand_over`)."""
    d, plan = fed.d, ctx.plan
    row = _row(ctx, fed, local, rnd, with_weights=False)
    if not fed.is_agg:  # posted before the masked vector: a survivor's row is there when its vector is
        ctx.coord.post(f"secagg/{rnd}/row", row.numpy().tobytes())
        ctx.bytes_sent += row.numel() * 4
    total = secure.masked_sum(_secure_vector(ctx, fed, rnd) if plan.is_worker else None, d + 1)
    result = secure.outcome()
    survivors, dropped, unmasked = result["survivors"], result["dropped"], result["unmasked"]
    assert fed.secagg is not None
    fed.secagg.add(secure.seconds, {**secure.figures(), "secagg_dropped_workers": float(len(dropped))})
    outcome = _Outcome(torch.empty(d), 0.0, OK, None, Sums(ctx.num_classes))
    if fed.is_agg:
        others = [r for r in fed.members if r != fed.agg and (r in survivors or r not in plan.workers)]
        got = ctx.coord.collect(f"secagg/{rnd}/row", others, DROPOUT_AFTER_S)
        if missing := sorted(set(others) - set(got)):
            raise TrainingError(f"round {rnd}: rank(s) {missing} showed no sign of life for {DROPOUT_AFTER_S:.0f} s "
                                "(process dead or hung); the job cannot continue")
        ctx.coord.forget(f"secagg/{rnd}/row", dropped)
        have = {fed.agg: row, **{r: torch.frombuffer(bytearray(b), dtype=torch.float32) for r, b in got.items()}}
        table = [have[r] for r in fed.members if r in have]
        rows = torch.stack([have[r] for r in plan.workers if r in survivors])
        outcome = _Outcome(*_aggregate(ctx, fed, table, rows, rnd, total, None))
    if dropped:
        _hand_over(ctx, fed, rnd, outcome, survivors, dropped, unmasked)
    return outcome


def _hand_over(ctx: Ctx, fed: _Federation, rnd: int, outcome: _Outcome, survivors: list[int],
               dropped: list[int], unmasked: list[int]) -> None:
    """Worker(s) ``dropped`` out of round ``rnd``, which the survivors recovered. This job's groups
    hold the dead rank, so the round cannot be committed here: the aggregator writes the last
    committed model with the round's candidate (``secagg_pending``) as the checkpoint of round
    ``rnd - 1``, and every survivor ends the job (SurvivorsGoOn); the server re-forms the group
    over the survivors (or a replacement, with auto_healing) and resumes from that checkpoint."""
    early = [r for r in dropped if r not in unmasked]
    what = (f"worker rank(s) {dropped} dropped out of round {rnd}; "
            + (f"the survivors revealed their shares of the mask keys of {unmasked}, whose masks were removed, "
               if unmasked else "")
            + (f"{early} dropped before sharing secrets (no mask of theirs was in the sum), " if early else "")
            + f"and the round's aggregate is the sum of the {len(survivors)} surviving workers' updates")
    if fed.is_agg:
        assert fed.secagg is not None
        pending = {"round": rnd, "candidate": outcome.weights.clone(), "flag": outcome.flag, "status": outcome.status,
                   "error": list(outcome.error) if outcome.error else None, "train": dict(outcome.train.train),
                   "lr": ctx.lr, "survivors": survivors, "dropped": dropped, "secagg": dict(fed.secagg.last),
                   "seconds": time.perf_counter() - fed.round_started}
        before = ctx.last_checkpoint
        set_weights(ctx.model, fed.commit.committed)
        ctx.write_checkpoint(rnd - 1, ctx.model, None, extra={"secagg_pending": pending, **fed.commit.resume_fields()})
        if ctx.last_checkpoint == before:
            raise TrainingError(f"{what}, but the checkpoint to continue from could not be written; the round is lost")
        ctx.node_stats(secagg_recovered_round=rnd)
        ctx.say(f"{what}; the group is re-formed over the survivors, which commit round {rnd} and go on")
    raise SurvivorsGoOn(f"{what}; this job ends so that {SECAGG_HANDOVER}, which resume from round {rnd}'s "
                        "checkpoint")


def _commit_pending(ctx: Ctx, fed: _Federation, pending: dict[str, Any]) -> tuple[bool, nn.Module | None]:
    """The round a worker dropped out of, recovered by the survivors before this job: its candidate
    (in the checkpoint) is broadcast, judged by the commit rule, evaluated and reported here, on
    the re-formed group."""
    rnd = int(pending["round"])
    ctx.epoch = rnd
    ctx.sink.update(epoch=rnd)
    train = Sums(ctx.num_classes)
    train.train.update({k: float(v) for k, v in (pending.get("train") or {}).items()})
    error = tuple(pending["error"]) if pending.get("error") else None
    outcome = _Outcome(pending["candidate"].float() if fed.is_agg else torch.empty(fed.d), float(pending["flag"]),
                       float(pending["status"]), error, train)
    ctx.lr = float(pending.get("lr") or ctx.lr)
    if fed.secagg is not None:  # the round's figures as the aggregator measured them (its own secagg_ms)
        fed.secagg.add(0.0, {k: float(v) for k, v in (pending.get("secagg") or {}).items()} if fed.is_agg else {})
    if fed.is_agg:
        ctx.say(f"round {rnd}: committing the aggregate the survivors recovered without worker rank(s) "
                f"{pending.get('dropped')} (ranks of the earlier group)")
    return _finish_round(ctx, fed, rnd, outcome, Sums(ctx.num_classes),
                         time.perf_counter() - float(pending.get("seconds") or 0.0))


def _finish_round(ctx: Ctx, fed: _Federation, rnd: int, outcome: _Outcome, local: Sums,
                  t_round: float) -> tuple[bool, nn.Module | None]:
    """The candidate to every member, the commit rule, the evaluation and the round's report."""
    model, d, is_worker = ctx.model, fed.d, ctx.plan.is_worker
    if fed.shards is not None:  # through the parameter servers, which apply it to their shards
        payload = fed.shards.deliver(rnd, outcome.weights if fed.is_agg else None, fed.commit.committed,
                                     outcome.flag, outcome.status, final=outcome.flag > 0 or rnd == fed.last_round)
    else:
        payload = torch.cat([outcome.weights, torch.tensor([outcome.flag, outcome.status])])
        broadcast(ctx, payload, fed.agg, fed.group, fed.members)
    flag, status = float(payload[d]), float(payload[d + 1])
    if flag >= FAILED:  # every member raises the aggregator's error
        agree(outcome.error, None, fed.group)
    stopping = flag > 0
    final = stopping or rnd == fed.last_round  # the last round, or the last a privacy budget allows
    local_model = copy.deepcopy(model) if (is_worker and final) else None  # this worker's own last model
    candidate = payload[:d].clone()
    set_weights(model, candidate)
    val, extra_metrics = fed.commit.commit(rnd, candidate, status == OK)
    if fed.shards is not None:
        fed.shards.verdict(rnd, fed.commit.committed is candidate)
    extra_metrics = {**extra_metrics, **_privacy_metrics(ctx, fed, rnd)}
    fed.rounds_done += 1
    seconds = time.perf_counter() - t_round
    if val is None:
        val, _, _ = evaluate_members(ctx, model, fed.group, judge=False)
    glob = Sums.from_tensor(val.tensor(), ctx.num_classes)
    glob.train = outcome.train.train
    ctx.sink.update(step=rnd)
    ctx.epoch_end(rnd, rnd, glob, seconds, local if is_worker else None, model, fed.opt if is_worker else None,
                  final, extra=extra_metrics)
    if fed.is_agg:
        ctx.node_stats(rounds=fed.rounds_done, mean_aggregation_ms=1000.0 * fed.agg_seconds / fed.rounds_done)
    if stopping:
        ctx.stopped = True
        ctx.say(f"stopped after round {rnd}")
    return stopping, local_model


def _privacy_metrics(ctx: Ctx, fed: _Federation, rnd: int) -> dict[str, float]:
    """The round's privacy figures: epsilon spent so far (opacus' accountant), and what secure
    aggregation cost; the last round a privacy budget allows says so."""
    out: dict[str, float] = {}
    dp = ctx.job.differential_privacy
    if fed.dp_cost is not None and dp is not None:
        out["dp_epsilon"] = fed.dp_cost.after(rnd)
        out["dp_delta"] = fed.dp_cost.delta
        if fed.local_dp is not None:  # this worker's own accountant, stepped by its optimizer
            ctx.sink.node_stat("dp_epsilon_local", fed.local_dp.epsilon())
        if rnd == fed.last_round < ctx.job.rounds:
            out["dp_budget_stop"] = 1.0
            ctx.say(f"stopped after round {rnd} of {ctx.job.rounds}: the privacy budget is reached (epsilon "
                    f"{out['dp_epsilon']:.3g}; round {rnd + 1} would spend {fed.dp_cost.after(rnd + 1):.3g} > "
                    f"target_epsilon {dp.target_epsilon:g})")
    if fed.secagg is not None and fed.secagg.rounds:
        out.update(fed.secagg.last)
        for name, value in fed.secagg.last.items():
            ctx.sink.node_stat(name, value)
    return out


def _secure_vector(ctx: Ctx, fed: _Federation, rnd: int) -> np.ndarray:
    """What a worker adds into the secure sum: its count-weighted update and its count (FedAvg), or
    under central DP its update clipped to max_grad_norm and a 1 (the aggregator cannot clip it)."""
    assert ctx.data is not None
    delta = (_sent_weights(ctx, fed, rnd).double() - fed.commit.committed.double()).numpy()
    dp = ctx.job.differential_privacy
    if dp is not None and dp.mode == "central":
        return np.append(clip_update(delta, dp.max_grad_norm), 1.0)
    n = float(ctx.data.n_examples)
    return np.append(n * delta, n)


def _sent_weights(ctx: Ctx, fed: _Federation, rnd: int) -> torch.Tensor:
    """This worker's weights as it sends them (corrupted by a simulated adversary)."""
    sent = flat_weights(ctx.model)
    if not is_honest(fed.behavior):
        sent = corrupt_weights(sent, fed.commit.committed, fed.behavior, seed=ctx.job.seed, rank=ctx.plan.rank,
                               when=rnd)
    return sent


def _row(ctx: Ctx, fed: _Federation, local: Sums, rnd: int, with_weights: bool = True) -> torch.Tensor:
    """What this member sends the aggregator: its weights (corrupted by a simulated adversary;
    none under secure aggregation), its example count, stop flag, training sums and learning
    rate (``_ROW``)."""
    is_worker = ctx.plan.is_worker
    extra = torch.tensor([
        float(ctx.data.n_examples) if (is_worker and ctx.data) else 0.0,
        1.0 if ctx.stop.is_set() else 0.0,
        local.train["loss_sum"], local.train["correct"], local.train["count"],
        local.train["samples"], local.train["tokens"], local.train["gnorm_sum"], local.train["gnorm_n"],
        ctx.lr,
    ], dtype=torch.float32)
    sent = _sent_weights(ctx, fed, rnd) if (with_weights and is_worker) else torch.zeros(
        fed.d if with_weights else 0)
    return torch.cat([sent, extra])


def _worker_rows(ctx: Ctx, fed: _Federation, table: list[torch.Tensor] | None) -> torch.Tensor:
    """The gathered rows of the workers, in worker order (aggregator only)."""
    assert table is not None
    return torch.stack([table[fed.members.index(r)] for r in ctx.plan.workers])


def _aggregate(ctx: Ctx, fed: _Federation, table: list[torch.Tensor], rows: torch.Tensor, rnd: int,
               secure: np.ndarray | None = None,
               kept: list[int] | None = None) -> tuple[torch.Tensor, float, float, Any, Sums]:
    """The aggregator: (candidate weights, flag, status, error, the workers' summed training
    figures) from the gathered ``table`` (every member's row) and ``rows`` (the workers' rows of it,
    stacked in worker order; without weights under secure aggregation: ``secure`` holds the sum of
    the workers' vectors instead); ``kept``: the worker positions whose updates the commit rule let
    through (None: all)."""
    job, rule, reputation = ctx.job, fed.rule, fed.reputation
    d = fed.d if secure is None else 0  # weights in a row
    central = job.differential_privacy is not None and job.differential_privacy.mode == "central"
    assert reputation is not None
    ctx.bytes_received += (len(fed.members) - 1) * table[0].numel() * 4
    n = rows.shape[0]
    use = list(range(n)) if kept is None else list(kept)
    excluded = [i for i in range(n) if i not in use]
    counts = rows[:, d].double().numpy()
    flag = float(torch.stack([t[d + 1] for t in table]).max()) if table else 0.0
    flag = max(flag, 1.0 if ctx.stop.is_set() else 0.0)
    status = OK
    agg_error = None
    train_sums = Sums(ctx.num_classes)
    for k, name in enumerate(_ROW[2:-1], start=2):
        train_sums.train[name] = float(rows[:, d + k].double().sum())
    ctx.lr = float(rows[:, d + len(_ROW) - 1].double().mean())  # the workers' current rate
    weights = reputation.weights(counts) if (job.reputation_weighting and rule in WEIGHTED_RULES) else counts
    t_agg = time.perf_counter()
    info: dict[str, Any] = {}
    try:
        if not use:
            raise AggregationError("proof-of-learning left out every worker's update (each made the validation "
                                   "loss worse beyond the tolerance)")
        if secure is not None or central:
            new = _private_aggregate(ctx, fed, rows[use, :d], secure)
        else:
            new, info = aggregate(rule, rows[use, :d].numpy(), weights=np.asarray(weights)[use], **fed.kwargs)
        if not np.isfinite(new).all():
            raise AggregationError(f"the {rule} aggregate holds NaN or inf values")
        info = full_info(info, use, excluded, rows[:, :d], new)
    except AggregationError as exc:  # e.g. a diverged (or Byzantine) worker sent NaN weights
        agg_error = error_of(exc)
        new = fed.commit.committed.numpy()
        info = failed_info(rows[:, :d], excluded)
        if fed.commit.rejects_failed_aggregation:
            status = INVALID
            ctx.say(f"round {rnd}: no candidate model: {exc}")
        else:
            flag = FAILED
    fed.agg_seconds += time.perf_counter() - t_agg
    glob_w = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32))
    if info:
        _log_round(ctx, rnd, rule, info, reputation.observe(info, rule), reputation)
    reputation.report(ctx.sink)
    return glob_w, flag, status, agg_error, train_sums


def _private_aggregate(ctx: Ctx, fed: _Federation, rows: torch.Tensor, secure: np.ndarray | None) -> np.ndarray:
    """The new global model from the secure sum (FedAvg: sum of count x update over the summed
    counts) and/or under central DP (clipped updates, summed, Gaussian noise, / workers)."""
    dp = ctx.job.differential_privacy
    central = dp is not None and dp.mode == "central"
    g = fed.commit.committed.double().numpy()
    rng = np.random.default_rng()  # fresh OS entropy: the noise must not follow from the job's seed
    if secure is None:
        assert dp is not None
        return g + central_aggregate(rows.double().numpy() - g, dp, rng)
    total, count = secure[:fed.d], float(secure[fed.d])
    if central:
        assert dp is not None
        return g + noised_mean(total, round(count), dp, rng)  # the workers clipped their own updates
    return g + total / count


def failed_info(rows: torch.Tensor, excluded: list[int] | None = None) -> dict[str, Any]:
    """What a failed aggregation still tells the reputation: who sent non-finite values and
    whose update the commit rule left out."""
    bad = [i for i in range(rows.shape[0]) if not bool(torch.isfinite(rows[i]).all())]
    out = sorted(set(bad) | set(excluded or []))
    return {"nonfinite": bad, "rejected": out, "excluded": out, "distances_to_aggregate": []} if out else {}


def full_info(info: dict[str, Any], used: list[int], excluded: list[int], rows: torch.Tensor,
              new: np.ndarray) -> dict[str, Any]:
    """The rule's ``info`` over the ``used`` updates, re-indexed to every worker position; the
    ``excluded`` ones count as rejected, with their distance to the aggregate."""
    if not excluded:
        return info
    out = dict(info)
    for key in ("selected", "rejected", "nonfinite"):
        if key in info:
            out[key] = [used[i] for i in info[key]]
    dists = dict(zip(used, info.get("distances_to_aggregate") or [], strict=False))
    agg = torch.from_numpy(np.asarray(new, dtype=np.float32))
    for i in excluded:
        x = float(torch.linalg.vector_norm(rows[i].float() - agg))
        dists[i] = x if np.isfinite(x) else float("inf")
    out["distances_to_aggregate"] = [dists[i] for i in range(rows.shape[0])]
    out["rejected"] = sorted(set(out.get("rejected", [])) | set(excluded))
    out["excluded"] = list(excluded)
    return out


def _log_round(ctx: Ctx, rnd: int, rule: str, info: dict[str, Any], flagged: list[int], rep: Reputation) -> None:
    workers = ctx.plan.workers
    parts = [f"round {rnd}: {rule}"]
    if "selected" in info:
        parts.append(f"selected workers {[workers[i] for i in info['selected']]}")
    if info.get("rejected"):
        parts.append(f"rejected {[workers[i] for i in info['rejected']]}")
    if info.get("nonfinite"):
        parts.append(f"non-finite {[workers[i] for i in info['nonfinite']]}")
    if info.get("excluded"):
        parts.append(f"left out by proof-of-learning {[workers[i] for i in info['excluded']]}")
    if flagged:
        parts.append(f"suspicious {flagged}")
    ctx.say(", ".join(parts) + f"; reputation {rep.text()}")


def local_training(ctx: Ctx, model: nn.Module, opt: torch.optim.Optimizer | None, rnd: int, local: Sums,
                   worker_group: object, spe: int, accum: int, dp: LocalDP | None = None) -> None:
    """``local_epochs`` over this worker's whole shard; workers agree on stopping between
    local epochs (after a store barrier, so an uneven split cannot time the check out). With
    ``dp`` each local epoch is DP-SGD over Poisson-sampled batches instead."""
    job, plan = ctx.job, ctx.plan
    assert ctx.data is not None and opt is not None
    n = len(ctx.data.train)
    params = list(model.parameters())
    # The session's step counts rounds; these node stats show progress inside a round.
    ctx.sink.node_stat("round_steps", dp.cost.steps if dp is not None else job.local_epochs * spe)
    ctx.sink.node_stat("round_steps_done", 0)
    for le in range(job.local_epochs):
        if dp is not None:
            dp.epoch(rnd, le, local, job.rounds * job.local_epochs * dp.cost.steps // job.local_epochs)
            spe = 0  # the DP epoch did this epoch's steps
        order = epoch_order(n, job.seed, rnd * 10_000 + le, plan.worker_index)
        for s in range(spe):
            t0 = time.perf_counter()
            k = ((rnd - 1) * job.local_epochs + le) * spe + s
            ctx.schedule_lr(opt, k, job.rounds * job.local_epochs * spe)
            opt.zero_grad(set_to_none=True)
            ctx.forward_backward(model, order, s * accum, accum, local)
            local.add_gnorm(grad_norm(params, job.grad_clip))
            opt.step()
            ctx.steps += 1
            ctx.step_seconds += time.perf_counter() - t0
            ctx.sink.node_stat("round_steps_done", le * spe + s + 1)
        if le < job.local_epochs - 1:
            if worker_group is not None:
                ctx.coord.barrier(f"round-{rnd}-local-{le}", plan.workers)
                if ctx.agree_stop(worker_group):
                    break
            elif ctx.stop.is_set():
                break
