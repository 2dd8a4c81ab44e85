"""Roles and consensus cooperating on real node processes (in-memory client, real nodes)."""

from __future__ import annotations

import anyio
import pytest
from conftest import assert_noisy_worker_outvoted, err, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio


async def test_proof_of_learning_leaves_out_a_noisy_worker(home):
    """One noisy worker of four: its update is scored on the validation split (judged by the worker
    with the validation capability) and left out, the honest three are committed, and its reputation falls."""
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "pol", "topology": "star", "architecture": "mlp",
                                                         "consensus": "proof-of-learning"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "aggregator"})
        judge = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker",
                                                          "capabilities": ["training", "validation"]}))["node_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": 2})
        noisy_id = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "behavior": "gaussian_noise",
                                                             "behavior_scale": 50}))["node_id"]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 5, "local_epochs": 1,
            "batch_size": 8, "learning_rate": 0.01, "wait": True})
        assert run["status"] == "completed", run
        live = run["result"]
        assert_noisy_worker_outvoted(live, noisy_id)
        assert live["consensus"]["excluded_updates"] >= 1 and live["consensus"]["rejected_rounds"] == 0, live
        judged = {node for node, stats in live["nodes"].items() if "candidate_val_loss" in stats}
        assert judged == {judge}  # the worker with the validation capability judged, not the aggregator
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def test_synchronous_epochs_are_committed_by_proof_of_learning(home):
    """Sync data parallel under proof-of-learning: a diverging epoch is rolled back (the run never
    ends worse than it started), a learning one is committed; raft is refused with a sentence; the
    node with the checkpoint_creation capability writes the checkpoints; continue_session adds epochs."""
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "sync-pol", "topology": "mesh",
                                                         "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker"})
        writer = (await ok(client, "neural_node_deploy", {
            "cluster_id": cid, "role": "worker",
            "capabilities": ["training", "inference", "checkpoint_creation"]}))["node_id"]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        base = {"cluster_id": cid, "dataset": "digits", "batch_size": 32, "wait": True}
        text = await err(client, "neural_train_distributed", {**base, "epochs": 1, "consensus": "raft"})
        assert "raft" in text and "federated=true" in text

        diverging = await ok(client, "neural_train_distributed", {**base, "epochs": 2, "optimizer": "adam",
                                                                  "learning_rate": 1.0})
        assert diverging["status"] == "completed", diverging
        status = await ok(client, "neural_training_status", {"session_id": diverging["session_id"]})
        assert diverging["result"]["consensus"]["rejected_rounds"] == 2
        losses = [row[-1] for row in status["history"]["val_loss"]]
        assert len(losses) == 2 and losses[0] == losses[1] < 2.5  # the initial model's loss (ln 10 = 2.30), kept

        learning = await ok(client, "neural_train_distributed", {**base, "epochs": 3, "learning_rate": 0.01})
        assert learning["result"]["metrics"]["val_accuracy"] >= 0.90
        assert learning["result"]["consensus"]["rejected_rounds"] == 0
        status = await ok(client, "neural_training_status", {"session_id": learning["session_id"]})
        assert status["checkpoints"] and {c["node_id"] for c in status["checkpoints"]} == {writer}

        more = await ok(client, "neural_train_distributed", {**base, "epochs": 2, "learning_rate": 0.01,
                                                             "continue_session": learning["session_id"]})
        assert more["status"] == "completed" and more["config"]["epochs"] == 5, more
        status = await ok(client, "neural_training_status", {"session_id": more["session_id"]})
        assert [row[0] for row in status["history"]["val_accuracy"]] == [4, 5]
        assert more["result"]["metrics"]["val_accuracy"] >= learning["result"]["metrics"]["val_accuracy"] - 0.02
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


@pytest.mark.slow
@pytest.mark.long  # the default run covers the aggregator in tests/workers/test_training.py
async def test_the_aggregator_validates_commits_and_checkpoints_each_sync_epoch(home):
    """A dedicated aggregator in a sync run (the parameter-server case: tests/workers/test_training.py):
    it validates every epoch's model on the whole validation split, proof-of-learning judges on its
    figures, it writes the checkpoints (the best kept), and status / events show what it did, measured."""
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "agg", "architecture": "mlp"}))["cluster_id"]
        aggregator = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "aggregator"}))["node_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": 2})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "batch_size": 32, "learning_rate": 0.01, "epochs": 3,
            "checkpoint_best": True, "max_checkpoints": 1, "wait": True})
        assert run["status"] == "completed", run["result"]["error"]
        assert run["config"]["mode"] == "sync" and aggregator not in run["message"]  # not named idle
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        stats = {a["node_id"]: a for a in status["aggregator_stats"]}[aggregator]
        assert stats["consensus_rounds"] == 3 and stats["avg_consensus_ms"] > 0, stats
        assert stats["checkpoints_created"] >= 1 and stats["rejected_rounds"] == 0, stats
        session = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
        judged = [value for _, _, value in session["history"]["judged_val_accuracy"]]
        assert len(judged) == 3 and judged[-1] >= 0.85, judged  # the whole split (359 digits), per epoch
        assert session["checkpoints"] and {c["node_id"] for c in session["checkpoints"]} == {aggregator}
        events = await ok(client, "execution_stream_subscribe", {"deployment_id": run["session_id"], "wait_s": 0})
        epochs = [e for e in events["events"] if e["kind"] == "epoch_completed"]
        assert len(epochs) == 3 and all(e["data"]["judged_val_loss"] > 0 for e in epochs), epochs
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


@pytest.mark.slow
async def test_a_worker_deployed_mid_run_joins_at_the_next_boundary(home):
    """Elastic scale-out: a worker deployed while a session runs takes part from the next stop
    check on, with an event naming it; the model carries over (through the boundary's checkpoint)."""
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "elastic", "topology": "mesh",
                                                         "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": 2})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 8,
                                                            "batch_size": 8, "learning_rate": 0.01})
        sid = run["session_id"]
        for _ in range(600):  # wait for the first epoch
            status = await ok(client, "neural_training_status", {"session_id": sid})
            if status["history"].get("val_accuracy"):
                break
            await anyio.sleep(0.5)
        added = await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker"})
        assert added["group"]["action"] == "at_next_boundary", added["group"]
        for _ in range(1200):
            status = await ok(client, "neural_training_status", {"session_id": sid})
            if status["status"] != "running":
                break
            await anyio.sleep(0.5)
        assert status["status"] == "completed", status.get("error")
        events = await ok(client, "execution_stream_subscribe", {"deployment_id": sid, "wait_s": 0})
        rescaled = [e for e in events["events"] if e["kind"] == "session_rescaled"]
        assert len(rescaled) == 1 and added["node_id"] in rescaled[0]["message"]
        assert status["live"]["nodes"][added["node_id"]]["samples_processed"] > 0  # it trained
        assert status["live"]["metrics"]["val_accuracy"] >= 0.90
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def _federated_digits(client, servers: int, workers: int = 2, **options) -> tuple[dict, dict, list[str]]:
    """A federated digits run (``workers`` workers, an aggregator, ``servers`` parameter servers):
    (the finished session's reply, the cluster status, the servers' node ids)."""
    cid = (await ok(client, "neural_cluster_init", {"name": f"fed-ps{servers}", "topology": "star",
                                                     "architecture": "mlp"}))["cluster_id"]
    await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "aggregator"})
    ps = [n["node_id"] for n in (await ok(client, "neural_node_deploy", {
        "cluster_id": cid, "role": "parameter_server", "count": servers}))["nodes"]] if servers else []
    await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": workers})
    await ok(client, "neural_cluster_connect", {"cluster_id": cid})
    run = await ok(client, "neural_train_distributed", {
        "cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 3, "local_epochs": 1,
        "batch_size": 16, "learning_rate": 0.01, "seed": 7, "wait": True, **options})
    status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
    history = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
    await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
    return {**run, "history": history["history"]}, status, ps


async def test_parameter_servers_hold_the_global_model_in_federated_runs(home):
    """Two parameter servers hold the federated global model in shards: the aggregator hands them
    each round's aggregate, the members pull the candidate from them, the verdict is theirs to keep.
    Same seed without servers (plain FedAvg): the same rounds, the same figures."""
    async with Client(build_server(Settings.from_env(home))) as client:
        run, status, ps = await _federated_digits(client, servers=2)
        assert run["status"] == "completed", run
        dc = run["distributed_config"]
        assert (dc["workers"], dc["parameter_servers"], dc["aggregators"]) == (2, 2, 1), dc
        assert "sharded over 2 parameter server(s)" in dc["strategy"]
        assert run["result"]["metrics"]["val_accuracy"] >= 0.90, run["result"]["metrics"]
        servers = {s["node_id"]: s for s in status["parameter_server_stats"]}
        assert set(servers) == set(ps)
        for s in servers.values():  # every round's aggregate committed and served by each server
            assert s["gradient_updates"] == 3 and s["sync_latency_ms"] > 0 and s["memory_mb"] > 0, s
        plain, _, _ = await _federated_digits(client, servers=0)
        assert plain["status"] == "completed", plain
        assert plain["distributed_config"]["parameter_servers"] == 0
        with_ps, without = run["history"]["val_loss"], plain["history"]["val_loss"]
        assert [r[0] for r in with_ps] == [r[0] for r in without] == [1, 2, 3]
        for a, b in zip(with_ps, without):  # float rounding of the applied change only
            assert abs(a[-1] - b[-1]) <= 1e-3 * abs(b[-1]), (with_ps, without)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("options", [{"secure_aggregation": True}, {"consensus": "byzantine",
                                                                    "aggregation_rule": "median"}],
                         ids=["secure-aggregation", "byzantine-median"])
async def test_parameter_servers_with_secure_aggregation_and_robust_rules(home, options):
    """The servers hold the model while the aggregator combines masked updates (secure aggregation)
    or applies a robust rule: both train as without servers."""
    async with Client(build_server(Settings.from_env(home))) as client:
        run, status, ps = await _federated_digits(client, servers=2, workers=3, **options)
        assert run["status"] == "completed", run
        assert run["result"]["metrics"]["val_accuracy"] >= 0.85, run["result"]["metrics"]
        servers = {s["node_id"]: s for s in status["parameter_server_stats"]}
        assert set(servers) == set(ps) and all(s["gradient_updates"] == 3 for s in servers.values()), servers
