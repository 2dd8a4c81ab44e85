"""Who does what: capabilities that act and roles that would sit idle (pure planning, no processes)."""

from __future__ import annotations

import pytest

from workers.protocol import TrainJob, idle_role_reason
from workers.training.common import TrainingError
from workers.training.setup import make_plan


def _job(roles: list[str], caps: list[list[str]] | None = None, **kw) -> TrainJob:
    return TrainJob(session_id="s", mode=kw.pop("mode", "federated"), topology="mesh", dataset="digits",
                    architecture="mlp", roles=roles, capabilities=caps or [], **kw)


def test_default_capabilities_change_nothing() -> None:
    plan = make_plan(_job(["aggregator", "worker", "worker"], [["training", "inference"]] * 3), rank=0, world=3)
    assert plan.aggregator == 0 and plan.judges == [0] and plan.checkpointer == plan.reporter == 0


def test_validation_judges_and_checkpoint_creation_writes() -> None:
    caps = [["training"], ["training", "validation"], ["training", "checkpoint_creation"]]
    plan = make_plan(_job(["aggregator", "worker", "worker"], caps), rank=2, world=3)
    assert plan.judges == [1]  # the worker holding the validation capability, not the aggregator
    assert plan.checkpointer == 2 and plan.writes_checkpoints and plan.reporter == 0


def test_an_aggregating_capability_picks_the_aggregator() -> None:
    caps = [["training"], ["training"], ["gradient_aggregation"]]
    plan = make_plan(_job(["worker", "worker", "worker"], caps), rank=0, world=3)
    assert plan.aggregator == 2
    hub = make_plan(_job(["worker", "worker", "worker"], caps, mode="sync", consensus="byzantine"), rank=0, world=3)
    assert hub.aggregator == 2


def test_parameter_servers_do_not_write_the_global_model() -> None:
    caps = [["checkpoint_creation"], ["training"], ["training"]]
    plan = make_plan(_job(["parameter_server", "worker", "worker"], caps, mode="parameter_server"), rank=0, world=3)
    assert plan.checkpointer == plan.reporter == 1  # a server holds only its shard


@pytest.mark.parametrize("mode,roles", [("sync", ["worker", "aggregator", "worker"]),
                                        ("parameter_server", ["worker", "aggregator", "parameter_server", "worker"])])
def test_an_aggregator_judges_and_checkpoints_each_epoch_in_step_wise_modes(mode: str, roles: list[str]) -> None:
    plan = make_plan(_job(roles, mode=mode), rank=1, world=len(roles))
    assert plan.epoch_judge == plan.aggregator == plan.checkpointer == 1 and plan.is_active
    assert plan.judges == [1] and plan.reporter == 0  # the first worker still reports the summed figures
    byz = make_plan(_job(["worker", "aggregator", "worker"], mode="sync", consensus="byzantine"), rank=1, world=3)
    assert byz.epoch_judge is None and byz.aggregator == 1  # the byzantine hub aggregates gradients instead


def test_raft_outside_federated_is_refused() -> None:
    with pytest.raises(TrainingError, match="federated=true"):
        make_plan(_job(["worker", "worker"], mode="sync", consensus="raft"), rank=0, world=2)


def test_idle_roles_are_named_with_a_reason() -> None:
    assert idle_role_reason("aggregator", "sync", "proof-of-learning") is None  # it judges each epoch
    assert idle_role_reason("aggregator", "parameter_server", "proof-of-learning") is None
    assert idle_role_reason("aggregator", "sync", "byzantine") is None
    assert idle_role_reason("parameter_server", "federated", "proof-of-learning") is None  # holds model shards
    assert idle_role_reason("parameter_server", "federated", "byzantine") is None
    assert "gossip" in idle_role_reason("parameter_server", "federated", "gossip")
    assert idle_role_reason("validator", "federated", "proof-of-learning") is None
    assert idle_role_reason("validator", "sync", "proof-of-learning") is not None
    assert idle_role_reason("aggregator", "federated", "raft") is None


def test_parameter_servers_take_part_in_central_federated_runs_only() -> None:
    roles = ["aggregator", "parameter_server", "worker", "parameter_server", "worker"]
    plan = make_plan(_job(roles), rank=1, world=5)
    assert plan.is_active and plan.ps == [1, 3] and plan.aggregator == 0
    from workers.training.shards import federation_members
    assert federation_members(plan) == [0, 2, 4]  # the servers serve the members, they do not judge
    assert plan.checkpointer == 0  # a server holds only its shard
    gossip = make_plan(_job(roles, consensus="gossip"), rank=1, world=5)
    assert not gossip.is_active


def test_shard_layout_splits_the_flat_weights_by_whole_tensors() -> None:
    import torch
    from torch import nn

    from workers.training.common import flat_weights
    from workers.training.shards import ShardLayout

    class _Ctx:  # what ShardLayout reads
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        plan = make_plan(_job(["aggregator", "parameter_server", "worker", "parameter_server"]), rank=0, world=4)

    layout = ShardLayout(_Ctx)
    flat = flat_weights(_Ctx.model)
    assert sum(layout.numel.values()) == flat.numel() and all(n > 0 for n in layout.numel.values())
    rebuilt = torch.full_like(flat, float("nan"))
    for p in layout.servers:
        layout.put(rebuilt, p, layout.take(flat, p))
    assert torch.equal(rebuilt, flat)  # every value in exactly one shard
