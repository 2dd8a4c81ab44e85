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
  workers' validation parts, whose union is the validation split, are used). It is committed
  when its validation loss is at most ``(1 + pol_tolerance)`` x that of the last committed
  global model (round 1: the initial model). Otherwise the round is rejected: every member
  goes back to the last committed model, which each of them keeps in memory (so the rollback
  needs no transfer), ``rejected_rounds`` grows (node stat and per-round metric on the
  reporter) and the aggregator logs "round N rejected: val loss X -> Y". A candidate that
  cannot be formed (e.g. FedAvg over a NaN update) is rejected the same way.
* ``byzantine``: the aggregator applies the job's robust rule (``f = byzantine_f``,
  ``beta = trim_beta``, ``m = multi_krum_m``); a job left at the default ``fedavg`` gets krum
  (n >= 2f + 3) or the coordinate median (see :mod:`.consensus`).
* ``raft``: the aggregator is the leader (term ``job.raft_term``, 1 at the start). Each round it sends the new version to
  every worker and validator (the broadcast); each member stores it (in memory and as
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

While workers train, the aggregator (and workers that finish early) wait on the rendezvous
store, not in a collective, so a round may take longer than the process-group timeout.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from workers.aggregation import AggregationError, aggregate

from .adversary import HONEST, behavior_of, corrupt_weights, describe, is_honest
from .checkpoint import checkpoint_payload, write_atomic
from .common import Sums, TrainedModel, epoch_order, evaluate, grad_norm, make_optimizer
from .consensus import WEIGHTED_RULES, RaftReplica, Reputation, majority, pol_accepts, resolve_rule, rule_kwargs
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


OK, INVALID = 0.0, 1.0
"""Candidate status in the broadcast: formed, or not (aggregation failed: rejected under PoL)."""


def run_federated(ctx: Ctx) -> TrainedModel | None:
    job, plan = ctx.job, ctx.plan
    agg = plan.aggregator
    assert agg is not None
    group = ctx.groups["active"]  # [aggregator] + workers (+ validators under PoL / raft)
    worker_group = ctx.groups.get("workers")
    members = sorted(plan.active)  # group-rank order of the gather list
    is_agg = plan.rank == agg
    is_worker = plan.is_worker
    consensus = plan.consensus
    pol, raft = consensus == "proof-of-learning", consensus == "raft"
    model = ctx.model
    model.train()
    d = flat_weights(model).numel()
    rule, note = resolve_rule(job, len(plan.workers))
    kwargs = rule_kwargs(job)
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
        ctx.say(f"federated averaging ({rule}, consensus {consensus}) over workers {plan.workers}, aggregator rank "
                f"{agg}: {job.rounds} rounds x {job.local_epochs} local epochs, {d:,} weights")
        if note:
            ctx.say(note)
    if not is_honest(behavior):
        ctx.say(f"ADVERSARY SIMULATION: this worker sends corrupted weights ({describe(behavior)}); "
                "its local training stays honest")
    reputation = Reputation(list(plan.workers)) if is_agg else None
    if reputation is not None:
        reputation.report(ctx.sink)
    ctx.report_baseline()

    # Round 0: everybody starts from the aggregator's global model.
    glob_w = flat_weights(model)
    _broadcast(ctx, glob_w, agg, group, members)
    set_weights(model, glob_w)
    committed = glob_w.clone()  # the last committed global model, kept by every member
    committed_val: Sums | None = None
    prev_loss = math.inf
    rejected_rounds = 0
    if pol:
        committed_val, prev_loss, source = _evaluate(ctx, model, group, judge=True)
        judged_by = _judged_by(ctx, source)
        if is_agg:
            ctx.sink.node_stat("rejected_rounds", 0)
            if prev_loss is None:
                ctx.say("proof-of-learning: no validation data (validation_split 0); rounds are committed unchecked")
            else:
                ctx.say(f"proof-of-learning: initial validation loss {prev_loss:.4g}, tolerance "
                        f"{job.pol_tolerance:g} (relative), judged by {judged_by}")
    replica = None
    commit_index = 0
    if raft:
        term = job.raft_term  # the server bumps it when a surviving node takes over as leader
        raft_ck = (ctx.ckpt or {}).get("raft") or {}
        commit_index = int(raft_ck.get("commit_index") or 0)

        def write(path: Path, version: int) -> None:
            write_atomic(path, checkpoint_payload(
                job, version, model, None, ctx.setup.task, ctx.setup.tokenizer, ctx.setup.label_names,
                ctx.setup.max_len, ctx.latest,
                raft={"term": term, "version": version, "commit_index": commit_index + 1, "leader": agg}),
                ctx.quota)

        replica = RaftReplica(ctx.sandbox, write, version=int(raft_ck.get("version") or 0))
        if is_agg:
            ctx.sink.node_stat("raft_term", term)
            ctx.sink.node_stat("raft_commit_index", commit_index)
            ctx.say(f"raft: leader rank {agg}, term {term}; a version commits with a majority of "
                    f"{len(members) // 2 + 1} of {len(members)} acknowledgements")

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
        sent = flat_weights(model)
        if not is_honest(behavior):
            sent = corrupt_weights(sent, committed, behavior, seed=job.seed, rank=plan.rank, when=rnd)
        row = torch.cat([sent, extra])
        t0 = time.perf_counter()
        table = [torch.empty_like(row) for _ in members] if is_agg else None
        dist.gather(row, gather_list=table, dst=agg, group=group)
        ctx.comm_s += time.perf_counter() - t0
        n_members = len(members)
        flag, status = 0.0, OK
        agg_error = None
        train_sums = Sums(ctx.num_classes)
        if is_agg:
            assert table is not None and reputation is not None
            ctx.bytes_received += (n_members - 1) * row.numel() * 4
            rows = torch.stack([table[members.index(r)] for r in plan.workers])
            counts = rows[:, d].double().numpy()
            flag = float(torch.stack([t[d + 1] for t in table]).max()) if table else 0.0
            flag = max(flag, 1.0 if ctx.stop.is_set() else 0.0)
            for k, name in enumerate(_ROW[2:-1], start=2):
                train_sums.train[name] = float(rows[:, d + k].double().sum())
            ctx.lr = float(rows[:, d + len(_ROW) - 1].double().mean())  # the workers' current rate
            weights = reputation.weights(counts) if (job.reputation_weighting and rule in WEIGHTED_RULES) else counts
            t_agg = time.perf_counter()
            info: dict[str, Any] = {}
            try:
                new, info = aggregate(rule, rows[:, :d].numpy(), weights=weights, **kwargs)
                if not np.isfinite(new).all():
                    raise AggregationError(f"the {rule} aggregate holds NaN or inf values")
            except AggregationError as exc:  # e.g. a diverged (or Byzantine) worker sent NaN weights
                agg_error = error_of(exc)
                new = committed.numpy()
                info = _failed_info(rows[:, :d])
                if pol:
                    status = INVALID
                    ctx.say(f"round {rnd}: no candidate model: {exc}")
                else:
                    flag = FAILED
            agg_seconds += time.perf_counter() - t_agg
            glob_w = torch.from_numpy(np.ascontiguousarray(new, dtype=np.float32))
            if info:
                _log_round(ctx, rnd, rule, info, reputation.observe(info, rule), reputation)
            reputation.report(ctx.sink)
        else:
            ctx.bytes_sent += row.numel() * 4
            glob_w = torch.empty(d)
        payload = torch.cat([glob_w, torch.tensor([flag, status])])
        _broadcast(ctx, payload, agg, group, members)
        flag, status = float(payload[d]), float(payload[d + 1])
        if flag >= FAILED:  # every member raises the aggregator's error
            agree(agg_error, None, group)
        stopping = flag > 0
        final = stopping or rnd == job.rounds
        if is_worker and final:
            local_model = copy.deepcopy(model)  # this worker's own last model
        candidate = payload[:d].clone()
        set_weights(model, candidate)
        extra_metrics: dict[str, float] = {}
        val: Sums | None = None
        if pol:
            loss: float | None = None
            if status == OK:
                val, loss, _ = _evaluate(ctx, model, group, judge=True)
                if ctx.judge_val is not None and loss is not None:
                    ctx.sink.node_stat("candidate_val_loss", loss)
            verdict = torch.tensor([0.0])
            if is_agg:
                ok = status == OK and (loss is None or prev_loss is None or pol_accepts(prev_loss, loss,
                                                                                         job.pol_tolerance))
                verdict[0] = 1.0 if ok else 0.0
            _broadcast(ctx, verdict, agg, group, members)
            if verdict.item() > 0:
                committed, committed_val = candidate, val
                prev_loss = loss if loss is not None else prev_loss
            else:
                rejected_rounds += 1
                set_weights(model, committed)
                val = committed_val
                if is_agg:
                    was = f"{prev_loss:.4g}" if prev_loss is not None else "?"
                    now = f"{loss:.4g}" if loss is not None else "no candidate"
                    ctx.say(f"round {rnd} rejected: val loss {was} -> {now}")
            extra_metrics["rejected_rounds"] = float(rejected_rounds)
            if is_agg:
                ctx.sink.node_stat("rejected_rounds", rejected_rounds)
        if raft:
            assert replica is not None
            ack = torch.tensor([1.0 if replica.store(rnd, candidate) else 0.0])
            acks = [torch.zeros(1) for _ in members]
            t0 = time.perf_counter()
            dist.all_gather(acks, ack, group=group)
            ctx.comm_s += time.perf_counter() - t0
            if majority([float(a) for a in acks], n_members):  # the same decision on every member
                if not replica.commit(rnd, candidate):
                    ctx.say(f"round {rnd}: version {rnd} is committed but this node could not record it in "
                            f"{replica.committed_path}")
                commit_index += 1
                committed = candidate
            else:
                replica.discard()
                set_weights(model, committed)
                if is_agg:
                    ctx.say(f"round {rnd}: version {rnd} not committed ({int(sum(float(a) for a in acks))} of "
                            f"{n_members} acknowledged); keeping version {replica.version}")
            extra_metrics["raft_commit_index"] = float(commit_index)
            if is_agg:
                ctx.sink.node_stat("raft_commit_index", commit_index)
        elif not pol:
            committed = candidate
        rounds_done += 1
        seconds = time.perf_counter() - t_round
        if val is None:
            val, _, _ = _evaluate(ctx, model, group, judge=False)
        glob = Sums.from_tensor(val.tensor(), ctx.num_classes)
        glob.train = train_sums.train
        ctx.sink.update(step=rnd)
        ctx.epoch_end(rnd, rnd, glob, seconds, local if is_worker else None, model, opt if is_worker else None, final,
                      extra=extra_metrics)
        if is_agg:
            ctx.node_stats(rounds=rounds_done, mean_aggregation_ms=1000.0 * agg_seconds / rounds_done)
        if stopping:
            ctx.stopped = True
            ctx.say(f"stopped after round {rnd}")
            break
    if not is_worker and not is_agg:
        return None  # a validator holds no model of its own
    return ctx.trained(model, local_model)


def _judged_by(ctx: Ctx, source: str | None) -> str:
    plan = ctx.plan
    if source == "judges":
        return f"validator rank(s) {plan.validators}" if plan.validators else f"aggregator rank {plan.aggregator}"
    if source == "workers":
        return "the workers' validation parts (no judge holds the validation split)"
    return "nobody (no validation data)"


def _evaluate(ctx: Ctx, model: nn.Module, group: object,
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


def _failed_info(rows: torch.Tensor) -> dict[str, Any]:
    """What a failed aggregation still tells the reputation: who sent non-finite values."""
    bad = [i for i in range(rows.shape[0]) if not bool(torch.isfinite(rows[i]).all())]
    return {"nonfinite": bad, "rejected": bad, "distances_to_aggregate": []} if bad else {}


def _log_round(ctx: Ctx, rnd: int, rule: str, info: dict[str, Any], flagged: list[int], rep: Reputation) -> None:
    workers = ctx.plan.workers
    parts = [f"round {rnd}: {rule}"]
    if "selected" in info:
        parts.append(f"selected workers {[workers[i] for i in info['selected']]}")
    if info.get("rejected"):
        parts.append(f"rejected {[workers[i] for i in info['rejected']]}")
    if info.get("nonfinite"):
        parts.append(f"non-finite {[workers[i] for i in info['nonfinite']]}")
    if flagged:
        parts.append(f"suspicious {flagged}")
    ctx.say(", ".join(parts) + f"; reputation {rep.text()}")


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
    # The session's step counts rounds; these node stats show progress inside a round.
    ctx.sink.node_stat("round_steps", job.local_epochs * spe)
    ctx.sink.node_stat("round_steps_done", 0)
    for le in range(job.local_epochs):
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
