"""``run_training``: one node's part of a distributed training job.

Called by the node agent on its single torch.distributed thread after the default process
group is initialised; every rank of the group calls it with the same :class:`TrainJob`.

Order of work, the same on every rank (so no rank waits for a collective another never
enters):

1. plan the roles (pure function of the job -- a bad job raises identically everywhere);
2. exchange a job digest and a nonce (:func:`.coord.all_gather_json`);
3. phase 1: workers read their shard, every rank reads ``resume_from``; outcomes agreed
   (any failure -> every rank raises the lowest failing rank's error);
4. vocabulary, ``max_len``, task, model (deterministic from the gathered summaries);
5. phase 2: workers encode their shard; sizes / LM counts agreed; batch-size check;
6. sub-groups created on every rank in one fixed order;
7. the mode's loop on the ranks that take part; the others wait on the store for the outcome;
8. a final barrier.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from workers.models import build_model
from workers.protocol import JobState, TrainJob

from .checkpoint import load_state, read_checkpoint, resolve_resume
from .common import TrainedModel, TrainingError, rss_mb
from .coord import Coordinator, agree, all_gather_json, destroy_group, error_of
from .modes import TrainingMode, training_mode
from .progress import ProgressSink
from .runtime import Ctx
from .setup import (
    Plan,
    encode_local,
    encode_validation,
    finish_setup,
    global_setup,
    make_plan,
    read_local,
    read_validation,
)

log = logging.getLogger(__name__)


def run_training(
    job: TrainJob,
    *,
    node_id: str,
    sandbox: Path,
    sink: ProgressSink,
    stop: threading.Event,
) -> TrainedModel | None:
    """Run this rank's part of ``job``; returns the model this node holds (None for nodes
    that hold none: parameter servers and nodes without a part in the mode).

    Sets ``sink``'s state (preparing -> running -> completed | stopped | failed) and raises
    with a clear message on failure.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise TrainingError("this node has not joined a process group; connect the cluster first")
    sink.set_state(JobState.PREPARING)
    groups: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        result, state = _run(job, node_id, Path(sandbox), sink, stop, groups)
    except BaseException as exc:
        _, msg = error_of(exc)
        sink.set_state(JobState.FAILED, error=msg)
        sink.log(f"failed: {msg}")
        _destroy(groups)
        raise
    _destroy(groups)
    if torch.cuda.is_initialized():  # the served model lives on CPU: give the GPU memory back
        torch.cuda.empty_cache()
    sink.node_stat("rss_mb", rss_mb())
    sink.log(f"{state} in {time.perf_counter() - started:.1f} s")
    sink.set_state(state)
    return result


def _destroy(groups: dict[str, Any]) -> None:
    red = groups.pop("reducer", None)
    if red is not None:
        for g in (red.group, red._cluster_pg, red._leaders_pg):
            destroy_group(g)
    seen: set[int] = set()
    for g in list(groups.values()):
        for sub in (g.values() if isinstance(g, dict) else [g]):
            if id(sub) not in seen:
                seen.add(id(sub))
                destroy_group(sub)
    groups.clear()


def _run(job: TrainJob, node_id: str, sandbox: Path, sink: ProgressSink, stop: threading.Event,
         groups: dict[str, Any]) -> tuple[TrainedModel | None, JobState]:
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    if "gloo" not in backend:
        raise TrainingError(f"the training engine needs gloo for its CPU collectives; this group uses "
                            f"{backend!r}. Reconnect the cluster (backend auto, gloo or nccl)")
    plan = make_plan(job, rank, world)
    sink.set_reporter(rank == plan.reporter)
    sink.update(epoch=0, step=0, total_epochs=job.rounds if job.mode == "federated" else job.epochs)

    # 2. same job everywhere? one nonce for the store keys of this run
    digest = hashlib.sha256(job.model_dump_json().encode()).hexdigest()
    items = all_gather_json([digest, uuid.uuid4().hex, node_id])
    if any(d != digest for d, _, _ in items):
        odd = [r for r, (d, _, _) in enumerate(items) if d != items[0][0]]
        raise TrainingError(f"ranks {odd} received a different job than rank 0; start the job again")
    with Coordinator(items[0][1], rank, stop) as coord:
        return _run_job(job, plan, node_id, sandbox, sink, stop, groups, coord)


def _run_job(job: TrainJob, plan: Plan, node_id: str, sandbox: Path, sink: ProgressSink, stop: threading.Event,
             groups: dict[str, Any], coord: Coordinator) -> tuple[TrainedModel | None, str]:
    rank, world = plan.rank, plan.world
    everyone = list(range(world))
    sink.log(f"{plan.role} rank {rank}/{world} ({node_id}): {job.mode} training of {job.architecture}/{job.model} "
             f"on {job.dataset[:80]}")

    mode = training_mode(job.mode, plan.consensus)
    if any(b.kind != "honest" for b in getattr(job, "behaviors", None) or []) and not mode.adversaries:
        sink.log("behaviors (adversary simulation) apply to federated training and to sync training with "
                 "consensus 'byzantine'; they are ignored in this mode")

    # 3. phase 1
    ckpt = None
    local = summary = err = None
    try:
        if job.resume_from:
            ckpt = read_checkpoint(resolve_resume(job.resume_from, sandbox))
        if plan.is_worker:
            local, summary = read_local(plan, sandbox, sink.log)
        elif plan.is_judge:
            local, summary = read_validation(plan, sandbox, sink.log)
    except Exception as exc:
        log.info("phase 1 failed on this rank", exc_info=True)
        err = error_of(exc)
    coord.barrier("phase1", everyone)
    summaries = agree(err, summary)
    if local is not None and any((summaries[r] or {}).get("private") for r in plan.workers):
        local.judge_val = None  # data private to the workers: their parts are the validation split

    # 4. global facts
    setup = global_setup(plan, summaries, ckpt)
    start = 1
    total = job.rounds if job.mode == "federated" else job.epochs
    if ckpt is not None:
        start = int(ckpt.get("epoch") or 0) + 1
        if start > total:
            unit = "rounds" if job.mode == "federated" else "epochs"
            raise TrainingError(
                f"checkpoint {job.resume_from} already covers {start - 1} {unit} and the job asks for {total}; "
                f"ask for more than {start - 1} {unit} to continue training"
            )

    # 5. phase 2
    enc = info = err = None
    judge_val = None
    try:
        if plan.is_worker:
            assert local is not None
            enc, info = encode_local(local, setup)
        if plan.is_judge and local is not None:
            judge_val = encode_validation(local, setup)
    except Exception as exc:
        log.info("phase 2 failed on this rank", exc_info=True)
        err = error_of(exc)
    coord.barrier("phase2", everyone)
    infos = agree(err, info)
    finish_setup(plan, setup, infos)
    del local

    torch.manual_seed(job.seed)
    preset, hf_config = _model_source(job, ckpt, sink)
    model = build_model(job.architecture, preset, setup.task,
                        layers=job.layers or None,
                        gradient_checkpointing=job.gradient_checkpointing, hf_config=hf_config)
    if ckpt is not None:
        load_state(model, ckpt["model_state"], str(job.resume_from))
        sink.log(f"resumed from {job.resume_from} at {'round' if job.mode == 'federated' else 'epoch'} {start}")
    if plan.is_worker and enc is not None:
        tail = f", vocabulary {setup.task.vocab_size:,}, max_len {setup.max_len}" if setup.tokenizer else ""
        sink.log(f"task {setup.kind}: {len(enc.train):,} training and {len(enc.val) if enc.val else 0:,} "
                 f"validation {'windows' if setup.kind == 'lm' else 'examples'} here{tail}")

    # 6. groups, same order on every rank, once all are there: building a model may take long on a busy host
    # (the first import of transformers), past the store timeout that creating a group waits under
    coord.barrier("groups", everyone)
    mode.make_groups(plan, groups)

    # 7. the mode
    ctx = Ctx(job=job, plan=plan, setup=setup, sink=sink, stop=stop, coord=coord, sandbox=sandbox, data=enc,
              model=model, start=start, ckpt=ckpt, groups=groups, judge_val=judge_val,
              device=_compute_device(mode, plan, sink), node_id=node_id)
    return _run_mode(ctx, mode)


def _run_mode(ctx: Ctx, mode: TrainingMode) -> tuple[TrainedModel | None, JobState]:
    """Step 7: the mode's loop on the ranks that take part; the others wait for its outcome."""
    job, plan, sink, coord, rank = ctx.job, ctx.plan, ctx.sink, ctx.coord, ctx.plan.rank
    sink.set_state(JobState.RUNNING)
    if not plan.is_active:
        sink.log(f"no part for role {plan.role} in {job.mode} training; waiting for the training ranks")
        status = coord.wait_done(plan.active)
        ctx.node_stats()
        if status.startswith("failed"):
            raise TrainingError(status.partition(": ")[2] or "the training ranks failed")
        dist.barrier()
        return None, JobState.STOPPED if status == JobState.STOPPED else JobState.COMPLETED
    try:
        result = mode.loop(ctx)
    except Exception as exc:
        if isinstance(exc, (TrainingError, ValueError)):
            coord.set_done(f"failed: {error_of(exc)[1]}")
            raise
        unit = "round" if job.mode == "federated" else "epoch"
        where = f"{unit} {ctx.epoch}" if ctx.epoch else "the start"
        wrapped = TrainingError(f"{job.mode} training failed on rank {rank} ({plan.role}) at {where}: "
                                f"{type(exc).__name__}: {exc}")
        coord.set_done(f"failed: {wrapped}")
        raise wrapped from exc
    except BaseException as exc:
        coord.set_done(f"failed: {type(exc).__name__}")
        raise
    state = JobState.STOPPED if ctx.stopped else JobState.COMPLETED
    if rank == plan.reporter:
        coord.set_done(state)
    dist.barrier()
    return result, state


def _model_source(job: TrainJob, ckpt: dict[str, Any] | None, sink: ProgressSink) -> tuple[str, dict[str, Any] | None]:
    """(the preset the model is labelled with, the GPT-2 config it is built from or None for the job's
    preset / layers). A resume source that records its GPT-2 config (a Hugging Face directory, a
    language-model checkpoint) keeps its own shape: fine-tuning starts from exactly that model, whatever
    the cluster's nodes were deployed with."""
    hf_config = (ckpt or {}).get("hf_config")
    if not hf_config:
        return job.model, None
    ck_job = ckpt.get("job") or {}  # type: ignore[union-attr]
    if ckpt.get("preset") == job.model and (ck_job.get("layers") or None) == (job.layers or None):  # type: ignore[union-attr]
        return job.model, hf_config  # the job's own model, resumed
    sink.log(f"the model keeps the shape {job.resume_from} records (GPT-2, {hf_config.get('n_layer')} layers, "
             f"{hf_config.get('n_embd')} wide, {hf_config.get('n_head')} heads, vocabulary "
             f"{hf_config.get('vocab_size')}, context {hf_config.get('n_positions')}); the cluster's "
             f"'{job.model}' model is not used")
    return "custom", hf_config


def _compute_device(mode: TrainingMode, plan: Plan, sink: ProgressSink) -> torch.device:
    """The GPU pinned at join (nccl groups) for the modes that use it, else CPU."""
    job = plan.job
    if "nccl" not in dist.get_backend():
        return torch.device("cpu")
    if mode.uses_gpu:
        device = torch.device("cuda", torch.cuda.current_device())
        if plan.is_worker:
            sink.log(f"computing on {device} ({torch.cuda.get_device_name(device)}); gradients over NCCL")
        return device
    if plan.rank == plan.reporter:
        sink.log(f"{job.mode} training{' with byzantine consensus' if job.mode == 'sync' else ''} computes "
                 "on CPU over gloo; the GPUs serve plain synchronous data parallel")
    return torch.device("cpu")


__all__ = ["run_training"]
