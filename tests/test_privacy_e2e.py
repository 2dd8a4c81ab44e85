"""Privacy through the tools on real node processes: local DP stops at its epsilon budget with the
spent epsilon in status, events and final metrics; secure aggregation trains as FedAvg does and
shows its cost, and recovers a worker killed mid-round; combinations that cannot hold are refused
before start."""

from __future__ import annotations

import os
import signal

import anyio
import pytest
from conftest import err, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server
from workers.data import load_dataset, partition, train_val_split
from workers.privacy import local_cost
from workers.protocol import DifferentialPrivacy

# Real node processes: each test is tens of seconds on an idle 2-core machine (minutes under load).
pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.privacyslow]


async def _cluster(client: Client, workers: int, **init: object) -> str:
    cid = (await ok(client, "neural_cluster_init", {"name": "private", "topology": "star",
                                                     "architecture": "mlp", **init}))["cluster_id"]
    await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "aggregator"})
    await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": workers})
    await ok(client, "neural_cluster_connect", {"cluster_id": cid})
    return cid


async def _kill_a_worker_in_round_2(client: Client, cid: str, session_id: str) -> tuple[dict, dict]:
    """SIGKILL the last worker once round 2 began (its keys are shared before training); returns the
    victim's node row and the session's status once it is no longer running."""
    for _ in range(1200):
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        if (status.get("current_epoch") or 0) >= 2:
            break
        await anyio.sleep(0.05)
    assert status["training"]["status"] == "running", "the session ended before the kill"
    victim = next(n for n in reversed(status["nodes"]) if n["role"] == "worker")
    os.kill(victim["pid"], signal.SIGKILL)
    for _ in range(1200):
        done = await ok(client, "neural_training_status", {"session_id": session_id})
        if done["status"] != "running":
            break
        await anyio.sleep(0.5)
    return victim, done


async def test_local_dp_stops_at_the_budget_and_reports_epsilon(home):
    dp = {"mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_epsilon": 3.0}
    # digits, 2 workers: the shards the nodes cut; the session spends what the smallest one spends
    ds = load_dataset("digits")
    train, _ = train_val_split(len(ds), 0.2, 0, stratify=ds.y)
    sizes = [len(part) for part in partition(ds.y[train], 2, "iid", 0.5, 0)]
    cost = local_cost(DifferentialPrivacy(**dp), min(sizes), 32, 1, max(sizes))
    allowed = cost.affordable_rounds(3.0, 10)
    assert 1 <= allowed < 10
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = await _cluster(client, 2)
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 10, "batch_size": 32,
            "learning_rate": 0.01, "differential_privacy": dp, "consensus": "raft", "wait": True})
        assert run["status"] == "completed", run
        status = await ok(client, "neural_training_status", {"session_id": run["session_id"]})
        final = status["final_metrics"]
        assert final["epochs_done"] == allowed
        assert "privacy budget" in final["end_reason"] and "target_epsilon 3" in final["end_reason"]
        eps = [v for _, _, v in status["history"]["dp_epsilon"]]
        assert len(eps) == allowed and eps == sorted(eps)
        assert eps[-1] == pytest.approx(cost.after(allowed), rel=1e-6) and eps[-1] <= 3.0
        assert final["dp_epsilon"] == pytest.approx(eps[-1]) and final["dp_delta"] == 1e-5
        # each worker's own accountant, stepped by its DP optimizer, agrees
        local = [n["dp_epsilon_local"] for n in final["nodes"].values() if "dp_epsilon_local" in n]
        assert len(local) == 2 and max(local) == pytest.approx(eps[-1], rel=1e-6)
        assert final["val_accuracy"] > 0.3  # DP-SGD learns digits well above chance (0.1) in 2 rounds
        events = (await ok(client, "execution_stream_subscribe", {"deployment_id": run["session_id"],
                                                                  "limit": 500}))["events"]
        rounds = [e for e in events if e["kind"] == "epoch_completed"]
        assert len(rounds) == allowed and all("dp_epsilon" in e["data"] for e in rounds)
        assert any("privacy budget" in e["message"] for e in events if e["kind"] == "session_completed")


async def test_secure_aggregation_trains_and_refusals_name_the_problem(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = await _cluster(client, 3)
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 6, "batch_size": 32,
            "learning_rate": 0.01, "secure_aggregation": True, "wait": True})
        assert run["status"] == "completed", run
        metrics = run["result"]["metrics"]
        assert metrics["val_accuracy"] >= 0.9
        # what secure aggregation cost per round, measured: the protocol's time and a worker's bytes
        assert metrics["secagg_ms"] > 0
        sent = [n["secagg_bytes_sent"] for n in run["result"]["nodes"].values() if n.get("secagg_bytes_sent")]
        assert len(sent) == 3 and min(sent) > 8 * 26_122  # masked 64-bit weights and the key messages
        assert metrics["secagg_bytes_per_worker"] == min(sent) and metrics["plain_bytes_per_worker"] == 4 * 26_122

        base = {"cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 2}
        text = await err(client, "neural_train_distributed", base | {"secure_aggregation": True,
                                                                     "aggregation_rule": "krum"})
        assert "aggregation_rule 'krum' needs each worker's own update" in text
        text = await err(client, "neural_train_distributed", base | {"secure_aggregation": True,
                                                                     "consensus": "byzantine"})
        assert "consensus 'byzantine'" in text
        text = await err(client, "neural_train_distributed", base | {"federated": False, "differential_privacy": {
            "mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0}})
        assert "federated mode only" in text
        text = await err(client, "neural_train_distributed", base | {"architecture": "rnn", "differential_privacy": {
            "mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0}})
        assert "nn.LSTM" in text and "local differential privacy" in text
        text = await err(client, "neural_train_distributed", base | {"differential_privacy": {
            "mode": "central", "noise_multiplier": 0.5, "max_grad_norm": 1.0, "target_epsilon": 1.0}})
        assert "above target_epsilon 1" in text
        text = await err(client, "neural_train_distributed", base | {"differential_privacy": {
            "mode": "local", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_epsilon": 1.0}})
        assert "one federated round of local DP-SGD" in text and "above target_epsilon 1" in text
        status = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        assert status["status"] == "connected"  # nothing changed by the refusals


@pytest.mark.parametrize(("auto_healing", "consensus"), [(False, "proof-of-learning"), (True, "raft")])
async def test_a_worker_killed_mid_round_is_recovered_and_the_session_completes(home, auto_healing, consensus):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = await _cluster(client, 3, auto_healing=auto_healing)
        # many local epochs: a round lasts seconds, so the kill lands inside round 2, after its key exchange
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 4, "local_epochs": 40,
            "batch_size": 32, "learning_rate": 0.01, "secure_aggregation": True, "consensus": consensus})
        victim, done = await _kill_a_worker_in_round_2(client, cid, run["session_id"])
        assert done["status"] == "completed", done.get("error")
        final = done["final_metrics"]
        assert final["epochs_done"] == 4 and final["val_accuracy"] > 0.8
        events = (await ok(client, "execution_stream_subscribe", {"deployment_id": run["session_id"],
                                                                  "limit": 500}))["events"]
        recovered = [e for e in events if e["kind"] == "secagg_dropout_recovered"]
        assert len(recovered) == 1 and victim["node_id"] in recovered[0]["message"]
        rnd = recovered[0]["data"]["round"]
        assert recovered[0]["data"]["dropped_node"] == victim["node_id"] and rnd == 2
        # the recovered round was committed and reported once, with the dropout counted; every round was
        history = done["history"]
        assert [e for e, _, _ in history["val_accuracy"]] == [1, 2, 3, 4]
        dropped = {e: v for e, _, v in history["secagg_dropped_workers"]}
        assert dropped[rnd] == 1 and all(v == 0 for e, v in dropped.items() if e != rnd)
        assert done["live"]["restarts"] == 1
        # the survivors went on alone, or with a fresh worker in the dead one's place (auto_healing)
        replacement = recovered[0]["data"]["replacement"]
        assert (replacement is not None) == auto_healing
        workers = [n["node_id"] for n in (await ok(client, "neural_cluster_status", {"cluster_id": cid}))["nodes"]
                   if n["role"] == "worker" and n["status"] == "running"]
        assert victim["node_id"] not in workers and len(workers) == (3 if auto_healing else 2)
        if consensus == "raft":  # the recovered round went through raft's majority like the others
            assert done["live"]["consensus"]["raft_commit_index"] == 4
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


async def test_a_dropout_below_the_threshold_fails_the_session_naming_it(home):
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = await _cluster(client, 2)  # threshold 2 of 2: no worker may drop out
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 3, "local_epochs": 40,
            "batch_size": 32, "learning_rate": 0.01, "secure_aggregation": True})
        victim, done = await _kill_a_worker_in_round_2(client, cid, run["session_id"])
        assert done["status"] == "failed"
        assert victim["node_id"] in done["error"]
        assert "only 1 of 2 workers survived" in done["error"] and "the threshold (2 of 2)" in done["error"]
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
