"""The training modes a node runs, as one table: mode -> process groups, device, loop.

The job's ``mode`` (chosen by the server: sync, parameter_server or federated) together
with its consensus selects a :class:`TrainingMode` (:func:`training_mode`); the engine creates
the mode's groups, picks the device and runs the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.comm import TopologyReducer

from .common import TrainedModel, TrainingError
from .coord import new_group, pg_timeout
from .federated import run_federated
from .gossip import run_gossip
from .ps import run_parameter_server
from .robust_sync import run_sync_robust
from .runtime import Ctx
from .setup import Plan
from .shards import federation_members
from .sync import run_sync


def _epoch_judge_group(plan: Plan, groups: dict[str, Any]) -> None:
    """The reporter and the dedicated aggregator: each epoch's model goes from one to the other."""
    if plan.epoch_judge is not None:
        groups["epoch_judge"] = new_group([plan.reporter, plan.epoch_judge])


def _sync_groups(plan: Plan, groups: dict[str, Any]) -> None:
    groups["workers"] = new_group(plan.workers)
    groups["active"] = groups["workers"] if plan.active == plan.workers else new_group(plan.active)
    groups["reducer"] = TopologyReducer(plan.job.topology, ranks=plan.workers, hub=plan.workers[0],
                                        timeout=pg_timeout())
    _epoch_judge_group(plan, groups)


def _hub_groups(plan: Plan, groups: dict[str, Any]) -> None:
    groups["active"] = new_group(plan.active)  # workers + hub: no DDP, no topology reducer


def _ps_groups(plan: Plan, groups: dict[str, Any]) -> None:
    groups["active"] = new_group(plan.active)
    groups["ps"] = {p: new_group([p] + plan.workers) for p in plan.ps}
    if len(plan.ps) > 1:
        groups["ps_all"] = new_group(plan.ps)
    _epoch_judge_group(plan, groups)


def _federated_groups(plan: Plan, groups: dict[str, Any]) -> None:
    groups["active"] = new_group(plan.active)
    if len(plan.workers) > 1:
        groups["workers"] = new_group(plan.workers)
    if plan.ps and plan.aggregator is not None:  # central federation with parameter servers
        members = federation_members(plan)
        groups["federation"] = new_group(members)  # who trains, aggregates and judges (not the servers)
        groups["shards"] = {p: new_group([p] + members) for p in plan.ps}  # a server serves its shard to them


@dataclass(frozen=True)
class TrainingMode:
    name: str
    make_groups: Callable[[Plan, dict[str, Any]], None]
    """Creates the mode's sub-groups; every rank calls it, so the order is the same everywhere."""
    uses_gpu: bool
    """Computes on the GPU pinned at join when the group runs nccl; the other modes exchange
    whole models through CPU code paths and compute on CPU."""
    adversaries: bool
    """Honours ``behaviors`` (the adversary simulation)."""
    loop: Callable[[Ctx], TrainedModel | None]


MODES: dict[str, TrainingMode] = {m.name: m for m in (
    TrainingMode("sync", _sync_groups, uses_gpu=True, adversaries=False, loop=run_sync),
    TrainingMode("sync-byzantine", _hub_groups, uses_gpu=False, adversaries=True, loop=run_sync_robust),
    TrainingMode("parameter_server", _ps_groups, uses_gpu=False, adversaries=False, loop=run_parameter_server),
    TrainingMode("federated", _federated_groups, uses_gpu=False, adversaries=True, loop=run_federated),
    TrainingMode("gossip", _federated_groups, uses_gpu=False, adversaries=True, loop=run_gossip),
)}


def training_mode(mode: str, consensus: str) -> TrainingMode:
    """The table entry for a job's mode under its consensus (byzantine sync aggregates
    gradients at a hub; gossip federated has no aggregator)."""
    if mode == "sync" and consensus == "byzantine":
        return MODES["sync-byzantine"]
    if mode == "federated" and consensus == "gossip":
        return MODES["gossip"]
    if mode in ("sync", "parameter_server", "federated"):
        return MODES[mode]
    raise TrainingError(f"unknown training mode {mode!r}; use sync, parameter_server or federated")


__all__ = ["MODES", "TrainingMode", "training_mode"]
