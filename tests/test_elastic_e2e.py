"""Elastic membership of a running session on real node processes: a node removed mid-run leaves at
the next boundary (scale-in), a parameter server deployed mid-run joins and the parameters re-split."""

from __future__ import annotations

import re

import anyio
import psutil
import pytest
from conftest import err, ok
from mcp import Client

from flow_nexus_server.config import Settings
from flow_nexus_server.server import build_server

pytestmark = pytest.mark.anyio


async def _first_epoch(client, sid: str, name: str = "val_accuracy") -> None:
    for _ in range(600):
        status = await ok(client, "neural_training_status", {"session_id": sid})
        if status["history"].get(name):
            return
        assert status["status"] == "running", status.get("error")
        await anyio.sleep(0.5)
    raise AssertionError("no epoch finished")


async def _until_ended(client, sid: str) -> dict:
    for _ in range(1200):
        status = await ok(client, "neural_training_status", {"session_id": sid})
        if status["status"] != "running":
            return status
        await anyio.sleep(0.5)
    raise AssertionError("the session did not end")


async def _rescaled(client, sid: str) -> list[dict]:
    events = await ok(client, "execution_stream_subscribe", {"deployment_id": sid, "wait_s": 0})
    return [e for e in events["events"] if e["kind"] == "session_rescaled"]


async def _scale_in(client, cid: str, sid: str, leaver: str) -> dict:
    """Remove ``leaver`` after the first epoch / round; the session must complete without it."""
    await _first_epoch(client, sid)
    removed = await ok(client, "neural_node_remove", {"node_id": leaver})
    assert removed["group"]["action"] == "at_next_boundary" and removed["process_gone"] is False, removed
    status = await _until_ended(client, sid)
    assert status["status"] == "completed", status.get("error")
    rescaled = await _rescaled(client, sid)
    assert len(rescaled) == 1 and f"{leaver} left" in rescaled[0]["message"], rescaled
    assert rescaled[0]["data"]["left"] == [leaver]
    assert leaver not in status["live"]["nodes"]  # the re-formed session ran without it
    cluster = await ok(client, "neural_cluster_status", {"cluster_id": cid})
    assert leaver not in {n["node_id"] for n in cluster["nodes"] if n["status"] != "removed"}
    assert not psutil.pid_exists(removed["pid"]) or psutil.Process(removed["pid"]).status() == "zombie"
    return status


@pytest.mark.slow
@pytest.mark.long
async def test_a_worker_removed_mid_run_leaves_a_sync_session_at_the_next_boundary(home):
    """Sync data parallel over three workers; one is removed after epoch 1: the other two re-form,
    re-shard the data, carry the model on and finish above the bar; its process is gone."""
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "scale-in", "topology": "mesh",
                                                         "architecture": "mlp"}))["cluster_id"]
        nodes = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": 3}))["nodes"]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 6,
                                                            "batch_size": 8, "learning_rate": 0.01})
        leaver = nodes[2]["node_id"]
        status = await _scale_in(client, cid, run["session_id"], leaver)
        assert set(status["live"]["nodes"]) == {nodes[0]["node_id"], nodes[1]["node_id"]}
        assert status["live"]["metrics"]["val_accuracy"] >= 0.90
        assert [row[0] for row in status["history"]["val_accuracy"]][-1] == 6  # every epoch ran
        log = (await ok(client, "neural_node_logs", {"node_id": nodes[0]["node_id"], "tail": 1000}))["log"]
        shards = [int(n.replace(",", "")) for n in re.findall(r"task \w+: ([\d,]+) training", log)]
        assert len(shards) == 2 and shards[1] > shards[0] * 1.4, shards  # re-sharded over two workers, not three
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


@pytest.mark.slow
@pytest.mark.long
async def test_a_worker_removed_mid_run_leaves_a_federated_session(home):
    """FedAvg with an aggregator and three workers; a worker removed after round 1 leaves at the
    round boundary and the rest complete the rounds. The last trainer cannot be removed."""
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "fed-scale-in", "topology": "star",
                                                         "architecture": "mlp"}))["cluster_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "aggregator"})
        workers = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": 3}))["nodes"]
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {
            "cluster_id": cid, "dataset": "digits", "federated": True, "rounds": 5, "local_epochs": 1,
            "batch_size": 8, "learning_rate": 0.01})
        status = await _scale_in(client, cid, run["session_id"], workers[2]["node_id"])
        assert status["live"]["metrics"]["val_accuracy"] >= 0.85
        assert [row[0] for row in status["history"]["val_accuracy"]][-1] == 5
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})


@pytest.mark.slow
@pytest.mark.long
async def test_a_parameter_server_added_mid_run_takes_a_share_of_the_parameters(home):
    """Parameter-server training with one server; a second deployed after epoch 1 joins at the
    boundary, the parameters re-split between both and both apply updates. The last server cannot
    be removed while the session runs."""
    async with Client(build_server(Settings.from_env(home))) as client:
        cid = (await ok(client, "neural_cluster_init", {"name": "ps-scale-out", "topology": "mesh",
                                                         "architecture": "mlp"}))["cluster_id"]
        first = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "parameter_server"}))["node_id"]
        await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "worker", "count": 2})
        await ok(client, "neural_cluster_connect", {"cluster_id": cid})
        run = await ok(client, "neural_train_distributed", {"cluster_id": cid, "dataset": "digits", "epochs": 6,
                                                            "batch_size": 8, "learning_rate": 0.01})
        sid = run["session_id"]
        assert run["config"]["mode"] == "parameter_server"
        await _first_epoch(client, sid)
        text = await err(client, "neural_node_remove", {"node_id": first})
        assert "last parameter server" in text
        added = (await ok(client, "neural_node_deploy", {"cluster_id": cid, "role": "parameter_server"}))
        assert added["group"]["action"] == "at_next_boundary", added["group"]
        status = await _until_ended(client, sid)
        assert status["status"] == "completed", status.get("error")
        rescaled = await _rescaled(client, sid)
        assert len(rescaled) == 1 and added["node_id"] in rescaled[0]["message"]
        assert status["live"]["metrics"]["val_accuracy"] >= 0.90
        cluster = await ok(client, "neural_cluster_status", {"cluster_id": cid})
        servers = {s["node_id"]: s for s in cluster["parameter_server_stats"]}
        assert set(servers) == {first, added["node_id"]}
        assert all(s["gradient_updates"] > 0 and s["sync_latency_ms"] > 0 for s in servers.values()), servers
        logs = await ok(client, "neural_node_logs", {"node_id": added["node_id"], "tail": 400})
        assert "parameter server for" in logs["log"]  # it served a shard
        await ok(client, "neural_cluster_terminate", {"cluster_id": cid})
