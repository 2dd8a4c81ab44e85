"""A training session in the shape the Flow Nexus guides read it: per-role stats, convergence,
estimated completion, throughput. Built from what the controller holds in memory (the nodes'
pushed stats and the reporter's per-epoch metrics): no node call, no database read."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from flow_nexus_server import replies as r
from flow_nexus_server.states import SessionState

CONVERGENCE_WINDOW = 5  # epochs / rounds the convergence rate looks back over


def convergence_rate(epoch_metrics: dict[int, dict[str, float]]) -> float | None:
    """Mean relative fall of val_loss (else loss) per epoch over the last CONVERGENCE_WINDOW epochs;
    positive while the model improves. None before two epochs have a figure."""
    for name in ("val_loss", "loss"):
        points = sorted((e, m[name]) for e, m in epoch_metrics.items() if name in m)[-(CONVERGENCE_WINDOW + 1):]
        if len(points) >= 2:
            (e0, first), (e1, last) = points[0], points[-1]
            return (first - last) / abs(first) / (e1 - e0) if first else None
    return None


def completion_time(view: r.TrainingLive) -> str | None:
    if view.status != SessionState.RUNNING or view.eta_s is None:
        return None
    return dt.datetime.fromtimestamp(time.time() + view.eta_s, dt.timezone.utc).isoformat(timespec="seconds")


def _num(stats: dict[str, float], *names: str) -> float | None:
    return next((float(stats[n]) for n in names if n in stats), None)


def role_stats(view: r.TrainingLive, roles: dict[str, str]) -> tuple[list[r.WorkerStats],
                                                                      list[r.ParameterServerStats],
                                                                      list[r.AggregatorStats]]:
    workers, servers, aggregators = [], [], []
    for node_id, stats in (view.nodes or {}).items():
        role, memory = roles.get(node_id), _num(stats, "rss_mb")
        if role == "worker":
            workers.append(r.WorkerStats(node_id=node_id, samples_processed=_num(stats, "samples_processed"),
                                         avg_step_time_ms=_num(stats, "mean_step_ms"),
                                         local_loss=_num(stats, "local_loss"), memory_mb=memory))
        elif role == "parameter_server":
            servers.append(r.ParameterServerStats(node_id=node_id, gradient_updates=_num(stats, "updates_applied"),
                                                  sync_latency_ms=_num(stats, "sync_latency_ms"), memory_mb=memory))
        elif role == "aggregator":
            aggregators.append(r.AggregatorStats(
                node_id=node_id, checkpoints_created=_num(stats, "checkpoints_created"),
                consensus_rounds=_num(stats, "consensus_rounds", "rounds"),
                rejected_rounds=_num(stats, "rejected_rounds"),
                avg_consensus_ms=_num(stats, "avg_consensus_ms", "mean_aggregation_ms"), memory_mb=memory))
    return workers, servers, aggregators


def guide_fields(view: r.TrainingLive, roles: dict[str, str],
                 epoch_metrics: dict[int, dict[str, float]]) -> dict[str, Any]:
    """The guides' status fields for a ClusterStatusReply."""
    workers, servers, aggregators = role_stats(view, roles)
    rate = convergence_rate(epoch_metrics)
    done = completion_time(view)
    m = view.metrics
    summary = r.SessionSummary(
        session_id=view.session_id, status=view.status, mode=view.mode, epoch=view.epoch,
        total_epochs=view.total_epochs, workers=workers, time_elapsed_s=view.elapsed_s, estimated_completion=done,
        metrics={"global_loss": m.get("loss"), "global_accuracy": m.get("val_accuracy", m.get("accuracy")),
                 "validation_accuracy": m.get("val_accuracy"), "validation_loss": m.get("val_loss"),
                 "perplexity": m.get("val_perplexity"), "convergence_rate": rate},
    )
    return {"training_sessions": [summary], "worker_stats": workers, "parameter_server_stats": servers,
            "aggregator_stats": aggregators, "convergence_rate": rate, "estimated_completion": done,
            "throughput": r.Throughput(samples_per_s=m.get("samples_per_s"), tokens_per_s=m.get("tokens_per_s"))}


def distributed_config(job: Any, roles: list[str], idle: set[int], workers: int) -> r.DistributedConfig:
    """The session's ``distributed_config``: ``roles`` of every rank, ``idle`` the ranks without a part."""
    def count(role: str) -> int:
        return sum(1 for i, x in enumerate(roles) if x == role and i not in idle)

    servers = count("parameter_server")
    if job.mode == "federated":
        rule = job.aggregation_rule if job.aggregation_rule != "fedavg" else (
            "krum or the coordinate median (by worker count)" if job.consensus == "byzantine"
            else "neighbour averaging" if job.consensus == "gossip" else "federated averaging")
        strategy = f"{rule} under {job.consensus}" + (f", the global model sharded over {servers} parameter "
                                                       "server(s)" if servers else "")
        frequency = f"every round (after {job.local_epochs} local epoch(s) on each worker)"
    elif job.mode == "parameter_server":
        strategy, frequency = f"gradients to {servers} parameter server(s), each stepping its shard", "every step"
    else:
        strategy, frequency = f"gradient all-reduce over the {job.topology} topology", "every step"
    return r.DistributedConfig(workers=workers, parameter_servers=servers, aggregators=count("aggregator"),
                               validators=count("validator"), strategy=strategy, sync_frequency=frequency)
