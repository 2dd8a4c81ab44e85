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
    assert "parameter-server training" in idle_role_reason("parameter_server", "federated", "proof-of-learning")
    assert idle_role_reason("validator", "federated", "proof-of-learning") is None
    assert idle_role_reason("validator", "sync", "proof-of-learning") is not None
    assert idle_role_reason("aggregator", "federated", "raft") is None
